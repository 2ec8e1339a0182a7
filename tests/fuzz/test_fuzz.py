"""Fuzzing the readers that take files from outside: the DICOM header scan, the NIfTI header/volume reader and the
spec loader (targets.py), with atheris where installed (coverage-guided; see harness.py) and a byte mutator
elsewhere.

`make test` spends MEDXFER_FUZZ_SECONDS (default 60) in total, split over the targets; `make fuzz` spends 600 and
saves what it finds straight into tests/fuzz/regressions/<target>/. Every file there is replayed by
test_regressions_replay on every run: a crash, once found, stays fixed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import seeds  # noqa: E402
import targets  # noqa: E402

REGRESSIONS = HERE / "regressions"
SECONDS_ENV = "MEDXFER_FUZZ_SECONDS"
SAVE_ENV = "MEDXFER_FUZZ_SAVE"  # set by `make fuzz`: crashes go to tests/fuzz/regressions/ directly


def _regressions() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("case", _regressions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regressions_replay(case: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets.TARGETS[case.parent.name](case.read_bytes())


def test_every_regression_folder_names_a_target() -> None:
    assert {p.parent.name for p in _regressions()} <= set(targets.TARGETS)


def _budget() -> float:
    try:
        return float(os.environ.get(SECONDS_ENV, "60"))
    except ValueError:
        return 60.0


def _fuzz(target: str, seconds: int, tmp: Path) -> dict:
    corpus, seed_dir = tmp / target / "corpus", tmp / target / "seeds"
    corpus.mkdir(parents=True)
    seeds.write_seeds(target, seed_dir)
    art = (REGRESSIONS / target) if os.environ.get(SAVE_ENV) else (tmp / target / "crashes")
    art.mkdir(parents=True, exist_ok=True)
    before = set(art.iterdir())
    cmd = [
        sys.executable,
        str(HERE / "harness.py"),
        target,
        str(corpus),
        str(seed_dir),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={art}/",
        "-print_final_stats=1",
        "-timeout=10",  # seconds per input: a reader that hangs on a file is a finding too
        "-rss_limit_mb=3072",  # ... and so is one whose memory runs away
    ]
    if not os.environ.get(SAVE_ENV):
        # `make test` replays one fixed mutation sequence, so CI explores a prefix of what was checked here
        # (MEDXFER_FUZZ_SECONDS=120 clean, twice CI's budget); new ground is `make fuzz`'s job, with a fresh seed.
        cmd.append("-seed=1")
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 300
    )  # + start-up, slow on a loaded machine
    out = p.stdout + p.stderr
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    found = sorted(set(art.iterdir()) - before)
    return {
        "target": target,
        "engine": "atheris" if "libFuzzer" in out or "INFO: Seed" in out else "mutate.py",
        "seconds": seconds,
        "executions": int(m.group(1)) if m else None,
        "rc": p.returncode,
        "crashes": [str(f) for f in found],
        "tail": out[-3000:] if p.returncode else "",
    }


@pytest.mark.slow
def test_bounded_fuzz_finds_no_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget = _budget()
    if budget <= 0:
        pytest.skip(f"{SECONDS_ENV}=0")
    names = targets.available()
    share = max(1, int(budget / len(names)))
    results = [_fuzz(t, share, tmp_path) for t in names]
    with capsys.disabled():
        print("\nfuzz:", json.dumps([{k: v for k, v in r.items() if k != "tail"} for r in results]))
    bad = [r for r in results if r["rc"] != 0 or r["crashes"] or not r["executions"]]
    keep = "" if os.environ.get(SAVE_ENV) else f"; keep each one as a regression: copy it to {REGRESSIONS}/<target>/"
    assert not bad, "\n\n".join(f"{r['target']}: rc {r['rc']}, {r['crashes']}{keep}\n{r['tail']}" for r in bad)

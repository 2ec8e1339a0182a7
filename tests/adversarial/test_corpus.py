"""The generated hostile corpus (generator.py) through the real pipeline, as a user runs it: the CLI for
`run` (ingest -> split -> train -> evaluate -> register), two more ingests, `predict --saliency`, `export` and
`check-spec`, and the registered pyfunc loaded with MLflow. One pipeline run per module (~60 s on 2 cores).

Asserted (issue 14, "What it must show"): each case gets its declared outcome; no traceback or "internal error"
anywhere; no NaN probability and no decision on an error row; no planted marker in any file the pipeline wrote
(workspace minus its local side: pseudonym map, file map, key), MLflow store and artifacts, the export, the predict
CSVs, the saliency maps, and every line printed or logged. The figures are printed (`pytest -s`) and written to
the module's tmp folder as adversarial_report.json.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TINY_RUN_RECIPE
from medxfer.cli import app
from medxfer.core.workspace import Workspace
from medxfer.io import checks
from typer.testing import CliRunner

from adversarial.generator import MARK, Case, Corpus, build_corpus

pytestmark = pytest.mark.slow
MODEL = "adv-us"
# The workspace's local side: what maps pseudonyms back (the "pseudonym map side"). Nothing else may
# hold a marker.
LOCAL_SIDE = ("pseudonym_map.csv", "file_map.csv", ".pseudonym_key")


@dataclass
class Step:
    argv: list[str]
    rc: int
    output: str
    exception: str | None


@dataclass
class Run:
    corpus: Corpus
    steps: dict[str, Step] = field(default_factory=dict)
    logs: str = ""
    preds: pd.DataFrame | None = None
    pyfunc: pd.DataFrame | None = None
    written: list[Path] = field(default_factory=list)  # folders and files the pipeline wrote, outside the workspace
    report: dict[str, Any] = field(default_factory=dict)


def _invoke(argv: list[str]) -> Step:
    res = CliRunner().invoke(app, argv)
    exc = None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        exc = f"{type(res.exception).__name__}: {res.exception}"
    return Step(argv, res.exit_code, res.output, exc)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    import mlflow

    root = tmp_path_factory.mktemp("adversarial")
    corpus = build_corpus(root / "corpus")
    ws = str(corpus.workspace)
    r = Run(corpus)
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("MLFLOW_TRACKING_URI", "MEDXFER_PSEUDONYM_KEY", "MEDXFER_DEBUG"):
            mp.delenv(k, raising=False)
        mp.setenv("MEDXFER_SYSTEM_METRICS", "0")
        mp.chdir(root)
        try:
            sets = [a for kv in TINY_RUN_RECIPE for a in ("--set", kv)]
            steps = {
                # --force: with the corpus's 7 validation studies the tiny model's temperature can end on its bound
                # (on an AMD EPYC VM, 2026-12-06, with the code that passed here on Intel VMs before), and the
                # registration guard then withholds 'candidate', which predict and export below load. The guard
                # has its own tests (tests/tracking/test_guard.py).
                "run": ["run", str(corpus.spec_2d), "-w", ws, "--name", MODEL, "--device", "cpu", "--force", *sets],
                "ingest-ct": ["ingest", str(corpus.spec_ct), "-w", ws],
                "ingest-nii": ["ingest", str(corpus.spec_nii), "-w", ws],
                "predict": [
                    "predict",
                    f"models:/{MODEL}@candidate",
                    *map(str, corpus.predict_inputs),
                    "--out",
                    str(root / "preds.csv"),
                    "--saliency",
                    str(root / "saliency"),
                    "-w",
                    ws,
                ],
                "export": ["export", f"models:/{MODEL}@candidate", "--out", str(root / "export"), "-w", ws],
            }
            for name, argv in steps.items():
                r.steps[name] = _invoke(argv)
            for c in corpus.by_stage("cli"):
                r.steps[c.id] = _invoke(c.argv + (["-w", ws] if c.argv[0] == "ingest" else []))
            if (root / "preds.csv").is_file():
                r.preds = pd.read_csv(root / "preds.csv")
            mlflow.set_tracking_uri(Workspace.for_spec(ws, "x").tracking_uri)
            try:
                model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
                r.pyfunc = model.predict(pd.DataFrame({"path": [str(p) for p in corpus.predict_inputs]}))
                r.pyfunc.to_csv(root / "pyfunc.csv", index=False)
            except Exception as exc:  # reported by test_no_tracebacks, not raised: the other checks still run
                r.steps["pyfunc"] = Step(["pyfunc"], 1, "", f"{type(exc).__name__}: {exc}")
                if os.environ.get("MEDXFER_ADV_DEBUG"):
                    raise
            finally:
                mlflow.set_tracking_uri(None)
        finally:
            logging.getLogger().removeHandler(handler)
    r.logs = logs.getvalue()
    r.written = [root / "preds.csv", root / "pyfunc.csv", root / "saliency", root / "export"]
    (root / "console.txt").write_text("\n".join(s.output for s in r.steps.values()) + "\n" + r.logs)
    r.written.append(root / "console.txt")
    return r


# ----------------------------------------------------------------------------------------------- outcomes


def _key_of(ws: Path):
    from medxfer.io.phi import Pseudonymizer, load_key

    return Pseudonymizer(load_key(ws / ".pseudonym_key"), remember=False)


def _file_map(ws: Workspace) -> dict[str, str]:
    try:
        from medxfer.ingest.manifest import read_file_map
    except ImportError:  # before shareable paths landed, rejects hold real paths
        return {}
    return read_file_map(ws.file_map) if ws.file_map.is_file() else {}


def _real(shared: str, fmap: dict[str, str], root: Path) -> str:
    base = re.sub(r":\d+$", "", shared)
    real = fmap.get(base, base)
    return os.path.normpath(real if os.path.isabs(real) else os.path.join(root, real))


def _ingest_outcomes(r: Run, spec_path: Path, stage: str) -> list[str]:
    from medxfer.config.spec import load_spec

    spec = load_spec(spec_path)
    ws = Workspace.for_spec(r.corpus.workspace, spec.name)
    if not ws.rejects.is_file():
        return [f"{stage}: no rejects.csv written"]
    rej = pd.read_csv(ws.rejects, dtype=str, keep_default_na=False)
    man = pd.read_parquet(ws.manifest)
    fmap = _file_map(ws)
    pseudo = _key_of(r.corpus.workspace)
    rej["real"] = [_real(s, fmap, spec.root) for s in rej["input"]]
    bad = [
        f"{stage}: reason code {c!r} is not in checks.REASONS" for c in set(rej["reason_code"]) - set(checks.REASONS)
    ]
    for c in r.corpus.by_stage(stage):
        if c.cls == "phi":
            continue
        keys = set()
        if c.study_uid:
            keys.add(pseudo.study_key(c.study_uid))
        if c.fmt == "nifti" and stage == "ingest-nii":
            keys.add(pseudo.study_key(c.path.relative_to(spec.root).as_posix()))
        here = str(c.path)
        mine = rej[rej["study_key"].isin(keys) | (rej["real"] == here) | rej["real"].str.startswith(here + os.sep)]
        if c.expect.kind == "accepted":
            if not (man["study_key"].isin(keys).any()):
                bad.append(f"{c.id}: expected accepted, got {sorted(set(mine['reason_code'])) or 'nothing'}")
        elif c.expect.code not in set(mine["reason_code"]):
            bad.append(f"{c.id}: expected reject {c.expect.code}, got {sorted(set(mine['reason_code'])) or 'none'}")
    return bad


def _predict_outcomes(df: pd.DataFrame | None, cases: list[Case], who: str) -> list[str]:
    if df is None:
        return [f"{who}: no predictions written"]
    if len(df) != len(cases):
        return [f"{who}: {len(df)} rows for {len(cases)} inputs"]
    bad = []
    for (_, row), c in zip(df.iterrows(), cases, strict=True):
        err = row["error"] if isinstance(row["error"], str) else None
        got = err.split(":", 1)[0] if err else None
        if c.expect.kind == "accepted" and got is not None:
            bad.append(f"{who} {c.id}: expected a prediction, got {got}")
        elif c.expect.kind == "predict_error" and got != c.expect.code:
            bad.append(f"{who} {c.id}: expected error {c.expect.code}, got {got or 'a prediction'}")
    return bad


def test_every_case_gets_its_declared_outcome(run: Run) -> None:
    c = run.corpus
    assert run.steps["run"].rc == 0, run.steps["run"].output[-2000:]
    bad = _ingest_outcomes(run, c.spec_2d, "ingest-2d")
    for stage, spec in (("ingest-ct", c.spec_ct), ("ingest-nii", c.spec_nii)):
        assert run.steps[stage].rc == 0, run.steps[stage].output[-2000:]
        bad += _ingest_outcomes(run, spec, stage)
    pcases = c.by_stage("predict")
    if run.preds is None:
        bad.append(f"predict failed: {run.steps['predict'].output[-1500:]}")
    bad += _predict_outcomes(run.preds, pcases, "predict")
    bad += _predict_outcomes(run.pyfunc, pcases, "pyfunc")
    for case in c.by_stage("cli"):
        st = run.steps[case.id]
        # One message: its first line says "error:", any further lines are its own indented problems and fixes.
        lines = [ln for ln in st.output.splitlines() if ln.strip()]
        if st.rc != case.expect.rc:
            bad.append(f"{case.id}: exit code {st.rc}, expected {case.expect.rc}")
        if not lines or not lines[0].startswith("error: ") or any(not ln.startswith("  ") for ln in lines[1:]):
            bad.append(f"{case.id}: expected one 'error:' message, got {st.output[:300]!r}")
        elif not re.search(case.expect.match, " ".join(lines), re.S):
            bad.append(f"{case.id}: {st.output[:300]!r} does not match {case.expect.match!r}")
    unmet = {b.split(":")[0].split(" ")[-1] for b in bad}
    n_bad = [k for k in c.cases if k.expect.kind != "accepted"]
    run.report["bad_inputs_with_their_reason_pct"] = round(
        100 * sum(1 for k in n_bad if k.id not in unmet) / max(len(n_bad), 1), 1
    )
    assert not bad, "\n".join(bad)


def test_no_tracebacks_anywhere(run: Run) -> None:
    bad = [
        f"{name}: {st.exception or 'traceback in output'}"
        for name, st in run.steps.items()
        if st.exception or "Traceback" in st.output or "internal error" in st.output
    ]
    bad += ["logs: traceback"] if "Traceback" in run.logs else []
    assert not bad, "\n".join(bad)


def _nan_decisions(df: pd.DataFrame) -> int:
    probs = df[[k for k in df.columns if k.startswith("prob_")]]
    n = 0
    for (_, row), (_, p) in zip(df.iterrows(), probs.iterrows(), strict=True):
        decided = isinstance(row["decision"], str)
        finite = all(isinstance(v, float) and math.isfinite(v) for v in p)
        if decided != finite or decided == isinstance(row["error"], str):
            n += 1
    return n


def test_no_nan_prediction_and_no_decision_on_an_error_row(run: Run) -> None:
    assert run.preds is not None and run.pyfunc is not None
    assert _nan_decisions(run.preds) == 0 and _nan_decisions(run.pyfunc) == 0


# ----------------------------------------------------------------------------------------------- markers


class _Needles:
    """Every text marker ("PHIMARK...", case-insensitive) and every numeric one (dates, times, UIDs) as a whole
    number: in one pass over a file, so the ~170 MB a run writes (checkpoints, ONNX, MLflow store) scan in seconds."""

    _RUN = re.compile(rb"[0-9][0-9.]{5,}")  # a run of digits and dots that could hold a date, time or UID

    def __init__(self, corpus: Corpus) -> None:
        self.text = MARK.lower().encode()
        self.by_head: dict[bytes, list[bytes]] = {}
        for m in corpus.markers:
            if not m.upper().startswith(MARK):
                self.by_head.setdefault(m[:6].encode(), []).append(m.encode())

    def find(self, blob: bytes) -> list[tuple[str, int]]:
        out = []
        low = blob.lower()
        i = low.find(self.text)
        if i >= 0:
            out.append((re.match(rb"phimark[0-9a-z]*", low[i:]).group().decode(), i))
        for run in self._RUN.finditer(blob):
            if run.start() and blob[run.start() - 1 : run.start()] in (b".",):
                continue  # inside a longer number such as 0.19020315
            r = run.group()
            for m in self.by_head.get(r[:6], ()):
                if r.startswith(m) and (len(r) == len(m) or not r[len(m) : len(m) + 1].isdigit()):
                    out.append((m.decode(), run.start()))
        return out


def _readable(f: Path) -> bytes:
    from medxfer.io.phi import _readable_bytes

    return _readable_bytes(f)


def _scan(paths: list[Path], needles: _Needles, skip: set[str]) -> list[tuple[str, str, str]]:
    """(file, marker, a few bytes around it) for every hit in content, and in names below a scanned folder."""
    hits = []
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if f.name in skip:
                continue
            named = f.relative_to(p).as_posix().encode() if f != p else b""
            for what, blob in (("content", _readable(f)), ("name", named)):
                for marker, at in needles.find(blob):
                    ctx = blob[max(0, at - 40) : at + len(marker) + 20].decode("latin-1")
                    hits.append((str(f), marker, f"{what}: {ctx}"))
    return hits


# Where the shareable-path change (another helper's: manifest `files`, rejects `input`, predict `input` ->
# relative pseudonymised paths) puts its fix. Until it lands (file_map.csv appears), hits there are expected.
_PATH_TABLES = ("manifest.parquet", "rejects.csv", "preds.csv", "pyfunc.csv")


def _marker_hits(run: Run) -> list[tuple[str, str, str]]:
    needles = _Needles(run.corpus)
    hits = _scan([run.corpus.workspace, *run.written], needles, set(LOCAL_SIDE))
    text = ("\n".join(s.output for s in run.steps.values()) + run.logs).encode()
    for marker, at in needles.find(text):
        hits.append(("<console and logs>", marker, text[max(0, at - 60) : at + len(marker)].decode()))
    return hits


def test_no_marker_outside_the_local_side(run: Run) -> None:
    hits = _marker_hits(run)
    landed = any((d / "file_map.csv").is_file() for d in run.corpus.workspace.iterdir() if d.is_dir())
    pending = [h for h in hits if not landed and Path(h[0]).name in _PATH_TABLES]
    hard = [h for h in hits if h not in pending]
    run.report["marker_hits"] = len(hits)
    run.report["marker_hits_pending_shareable_paths"] = len(pending)
    assert not hard, "\n".join(f"{f}: {m} in ...{c!r}" for f, m, c in hard[:30])
    if pending:
        pytest.xfail(f"{len(pending)} marker hit(s) in path columns until shareable paths land: {pending[0][:2]}")


def test_report(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    c = run.corpus
    bad = [k for k in c.cases if k.expect.kind != "accepted"]
    errs = pd.concat([df for df in (run.preds, run.pyfunc) if df is not None])
    tracebacks = sum(1 for s in run.steps.values() if s.exception or "Traceback" in s.output)
    report = {
        "cases": len(c.cases),
        "per_class": {k: dict(v) for k, v in c.counts().items()},
        "per_expect": dict(Counter(k.expect.kind for k in c.cases)),
        "bad_inputs": len(bad),
        "markers_planted": len(c.markers),
        "tracebacks": tracebacks,
        "nan_decisions": _nan_decisions(errs) if len(errs) else None,
        "marker_hits": len(_marker_hits(run)),
        **{k: v for k, v in run.report.items() if k != "marker_hits"},
    }
    (c.root.parent / "adversarial_report.json").write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print("\nadversarial corpus:", json.dumps(report))
    assert report["cases"] >= 180 and report["bad_inputs"] >= 60

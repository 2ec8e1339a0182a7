"""The same spec, recipe and seed give the same model in a new process (TRIPOD+AI item 18: reproducibility).

Two fresh interpreters each run `medxfer ingest`, `split` and `train` on the same data in their own new
workspace. Everything that differs between two users' runs differs here too: the workspace path, the
secret pseudonym key (so every study key), PYTHONHASHSEED (set and dict order of strings), the working
directory. The weights that train ships (best.pt "model") and the last epoch's must be bit-identical: the
SHA-256 of their safetensors serialisation is compared, not a tolerance, because on the CPU every kernel
used is deterministic (train turns on torch.use_deterministic_algorithms there). So must the hand-off file
(the bundle's weights.safetensors, whose SHA-256 register tags): safetensors' own header order changed per
process until the bundle writer canonicalised it.

The recipe keeps the default's moving parts (pretrained weights, augmentation, focal loss with auto alpha,
discriminative LRs, warm-up) and shrinks only size and epochs, so a new source of randomness in any of
them fails this test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_dicom2d_dataset

pytestmark = pytest.mark.slow

RECIPE = [
    "epochs=2",
    "data.size=[64,64]",
    "data.batch_size=8",
    "optim.warmup_epochs=0.5",
    "evaluation.bootstrap=200",
]


def _medxfer(*args: str, cwd: Path, hashseed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "MEDXFER_SYSTEM_METRICS": "0"}
    for k in ("MEDXFER_PSEUDONYM_KEY", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    r = subprocess.run(
        [sys.executable, "-m", "medxfer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"medxfer {args[0]} failed:\n{r.stderr[-3000:]}"
    return r


def _weights_sha256(path: Path) -> str:
    from medxfer.training.checkpoint import load
    from safetensors.torch import save

    state = load(path)["model"]
    return hashlib.sha256(save({k: v.contiguous() for k, v in sorted(state.items())})).hexdigest()


def _train_in_new_process(ds, tmp: Path, hashseed: str) -> dict[str, str]:
    ws = tmp / f"work-{hashseed}"
    cwd = tmp / f"cwd-{hashseed}"
    cwd.mkdir()
    spec = str(ds.spec_path)
    _medxfer("ingest", spec, "--workspace", str(ws), cwd=cwd, hashseed=hashseed)
    _medxfer("split", spec, "--workspace", str(ws), cwd=cwd, hashseed=hashseed)
    sets = [a for item in RECIPE for a in ("--set", item)]
    out = _medxfer(
        "train", spec, "--workspace", str(ws), "--device", "cpu", "--json", *sets, cwd=cwd, hashseed=hashseed
    )
    summary = json.loads(out.stdout)
    best = Path(summary["checkpoint"])
    # The hand-off file too, written by a fresh process: its SHA-256 is what register tags as weights_sha256.
    bundle = tmp / f"bundle-{hashseed}"
    code = "import sys; from medxfer.handoff.bundle import write_bundle; write_bundle(sys.argv[1], None, sys.argv[2])"
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    subprocess.run([sys.executable, "-c", code, str(best), str(bundle)], check=True, env=env, timeout=300)
    ev = json.loads(
        _medxfer("evaluate", summary["run_id"], "--workspace", str(ws), "--json", cwd=cwd, hashseed=hashseed).stdout
    )
    return {
        "test": ev["test"],
        "file": hashlib.sha256((bundle / "weights.safetensors").read_bytes()).hexdigest(),
        "key": (ws / ".pseudonym_key").read_bytes().hex(),
        "best": _weights_sha256(best),
        "last": _weights_sha256(best.with_name("last.pt")),
        "val_auroc": summary["val"]["auroc"],
        "best_epoch": summary["best_epoch"],
    }


def test_same_spec_recipe_seed_same_weights_in_a_new_process(tmp_path: Path) -> None:
    ds = make_dicom2d_dataset(tmp_path / "data", n_studies=40, size=48)
    a = _train_in_new_process(ds, tmp_path, "1")
    b = _train_in_new_process(ds, tmp_path, "2")
    assert a["key"] != b["key"], "the two workspaces must have different pseudonym keys for this test to mean anything"
    assert a["last"] == b["last"], f"last-epoch weights differ between processes: {a['last']} vs {b['last']}"
    assert a["best"] == b["best"], f"shipped weights differ between processes: {a['best']} vs {b['best']}"
    assert a["file"] == b["file"], "the bundle's weights.safetensors differs although the weights do not"
    assert (a["val_auroc"], a["best_epoch"]) == (b["val_auroc"], b["best_epoch"])
    # And the same test metrics with the same patient-bootstrap CIs (they once followed the pseudonym order).
    assert a["test"] == b["test"]

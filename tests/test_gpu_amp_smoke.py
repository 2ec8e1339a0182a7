"""``python -m benchmarks.gpu_amp --smoke``: the GPU script's code, every section, on the CPU at tiny sizes.

No GPU is lent to most sessions, so this is what keeps the prepared script runnable: the AMP arms (fp32, bf16,
fp16 + GradScaler), GradScaler with frozen groups, torch.compile (dynamo, eager backend), the batched data path
against MONAI per sample, and the demo end to end all run here; only DDP (needs two GPUs) is skipped. Numbers
are meaningless; the result goes to a tmp folder. About 60-80 s of CPU on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_script_smoke_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MEDXFER_BENCH_RESULTS": str(tmp_path / "results"),
        "MEDXFER_BENCH_WORK": str(tmp_path / "work"),
        "MEDXFER_SYSTEM_METRICS": "0",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MEDXFER_PSEUDONYM_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_amp", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    path = tmp_path / "results" / "gpu_amp_smoke.json"
    assert path.is_file(), proc.stderr[-3000:]
    res = json.loads(path.read_text())
    assert proc.returncode == 0 and res["errors"] == [], (res["errors"], proc.stderr[-3000:])
    status = {k: v["status"] for k, v in res["sections"].items()}
    assert all(v == "ok" for k, v in status.items()), status
    rows = res["rows"]
    amp = [r for r in rows if r["section"] == "amp"]
    assert {(r["set"], r["precision"]) for r in amp} == {
        (s, p) for s in ("2D 32 px", "3D 16^3") for p in ("fp32", "bf16", "fp16 + GradScaler")
    }
    (frozen,) = [r for r in rows if r["section"] == "frozen_groups"]
    assert frozen["ok"] and frozen["frozen_params"] > 0 and frozen["frozen_params_moved"] == 0
    assert [r["torch_compile"] for r in rows if r["section"] == "compile"] == [False, True]
    assert len([r for r in rows if r["section"] == "data_path"]) == 2  # MONAI per sample, batched (CPU)
    (demo,) = [r for r in rows if r["section"] == "demo"]
    assert demo["wall_s"] > 0 and set(demo["stage_s"]) >= {"ingest", "train", "evaluate"}
    assert any("ddp: skipped" in n for n in res["notes"])

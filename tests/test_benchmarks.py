"""Smoke test for benchmarks/: every benchmark runs at its tiny size and writes a well-formed result.

Speed is never asserted here (that is what the benchmarks measure); only that each one still runs
and reports what the README table is built from. Results and scratch data go to tmp folders, so
the committed benchmarks/results are untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from benchmarks.run_all import BENCHMARKS

    results = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--tiny", "--results-dir", str(results), "--work-dir", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = {}
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        assert path.is_file(), f"{name} wrote no result JSON\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[name] = json.loads(path.read_text())
    return out


@pytest.mark.slow
def test_every_benchmark_runs_tiny_and_writes_its_result(tiny_results: dict[str, dict]) -> None:
    import torch

    from benchmarks.common import RESULT_KEYS

    for name, res in tiny_results.items():
        assert set(RESULT_KEYS) <= set(res), f"{name}: missing keys {set(RESULT_KEYS) - set(res)}"
        assert res["name"] == name and res["size"] == "tiny"
        for key in ("cpu_model", "logical_cores", "torch_threads", "gpu"):
            assert key in res["machine"], f"{name}: machine.{key} missing"
        assert res["versions"]["torch"], f"{name}: versions not recorded"
        if name == "gpu_amp" and not torch.cuda.is_available():
            assert res["status"] == "skipped" and "CUDA" in res["reason"]
            continue
        assert res["status"] == "ok", f"{name}: {res['status']}: {res['reason']}\n{res['notes']}"
        assert res["rows"], f"{name}: no table rows"
        assert res["ratios"], f"{name}: no ratios"
        for key, r in res["ratios"].items():
            assert {"value", "target", "met", "higher_is_better"} <= set(r), f"{name}: ratio {key} malformed"

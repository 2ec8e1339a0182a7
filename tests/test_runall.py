"""medxfer run: the chained stages, the machine-readable result (issue section 8) and the closing table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medxfer import tracking
from medxfer.cli import app
from medxfer.core import ui
from medxfer.runall import TEST_METRICS
from typer.testing import CliRunner


def test_summary_is_the_results_contract(registered) -> None:
    s = json.loads(json.dumps(registered.result.summary()))  # JSON-safe as it is
    assert s["run_id"] == registered.run_id and s["model_name"] == "tiny-us" and s["model_version"] == "1"
    assert set(s["test"]) == set(TEST_METRICS)
    for m, v in s["test"].items():
        assert set(v) == {"value", "ci_low", "ci_high"}, m
        if None not in (v["value"], v["ci_low"], v["ci_high"]):
            assert v["ci_low"] <= v["value"] <= v["ci_high"], m
    assert isinstance(s["threshold"], float) and 0 < s["threshold"] < 1
    assert list(s["stages"]) == ["ingest", "split", "train", "evaluate", "register"]
    # The summary agrees with what the store holds.
    run = tracking.get_run(registered.tracking_uri, registered.run_id)
    assert math.isclose(run["metrics"]["test/auroc"], s["test"]["auroc"]["value"], rel_tol=1e-9)
    assert run["tags"]["medxfer.registered"] == "tiny-us/1"


def test_json_on_stdout_table_and_ui_command_on_stderr(registered, capsys) -> None:
    ui.finish(registered.result, as_json=True)
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["run_id"] == registered.run_id
    assert " ui --workspace " in err.replace("\n", " ") and "test auroc" in err


def test_ui_command_runs_as_printed(monkeypatch, tmp_path) -> None:
    # `make demo` leaves medxfer in .venv/bin, not on PATH: the printed command names the script that exists.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cmd = tracking.ui_command("sqlite:////w/medxfer-work/mlflow.db")
    exe = cmd.split(" ui ")[0]
    assert Path(exe).is_file() and cmd.endswith(" ui --workspace /w/medxfer-work"), cmd
    assert "'sqlite:////a b/x.db'" in tracking.ui_command("sqlite:////a b/x.db")
    assert "http://127.0.0.1:5000" in tracking.ui_command("http://127.0.0.1:5000")


def test_bad_override_fails_before_any_stage(tiny_dicom2d) -> None:
    res = CliRunner().invoke(
        app,
        [
            "run",
            str(tiny_dicom2d.spec_path),
            "--workspace",
            str(tiny_dicom2d.workspace),
            "--set",
            "epochs=zero",
            "--json",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "epochs" in res.output and res.stdout.strip() == ""
    assert not any(tiny_dicom2d.workspace.rglob("manifest.parquet"))  # ingest never ran


def test_cli_ends_with_the_copyable_ui_command(registered, monkeypatch) -> None:
    import medxfer.runall

    # The stages are covered above; here only what the command prints around the result.
    monkeypatch.setattr(medxfer.runall, "run_all", lambda *a, **k: registered.result)
    res = CliRunner().invoke(app, ["run", str(registered.dataset.spec_path), "--json"], terminal_width=60)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model_version"] == registered.model_version
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"Review the run and the registered model: {tracking.ui_command(registered.tracking_uri)}"
    assert last.endswith(f" ui --workspace {registered.workspace}")


def test_the_run_table_fits_80_columns(registered, monkeypatch) -> None:
    import io

    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(width=80, file=out))
    ui.render_table(*registered.result.table())
    lines = out.getvalue().splitlines()
    long_values = {"  " + v for _, v in registered.result.table()[1] if len(v) > 78}
    assert all(len(ln.rstrip()) <= 80 for ln in lines if ln.rstrip() not in long_values), lines
    assert f"  {registered.result.ui_command}" in lines  # the command, whole on one line


def test_run_resume_continues_the_killed_run_then_evaluates_and_registers(tiny_dicom2d, monkeypatch) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from medxfer.core.workspace import Workspace
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    ds = tiny_dicom2d
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    recipe = ["epochs=2", "data.size=[32, 32]", "data.batch_size=8", "weights=none", "evaluation.bootstrap=20"]
    recipe += ["stages=[{epoch: 0, groups: all}]", "optim.warmup_epochs=0"]
    kill = Path(__file__).parent / "training" / "kill_train.py"
    killed = subprocess.run(
        [sys.executable, str(kill), "1", str(ds.spec_path), str(ds.workspace), *recipe],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    ws = Workspace.for_spec(ds.workspace, ds.spec.name)
    unfinished = tracking.find_unfinished_run(ws.tracking_uri, ds.spec.name)
    manifest_mtime = ws.manifest.stat().st_mtime_ns

    args = ["run", str(ds.spec_path), "-w", str(ds.workspace), "--resume", "--device", "cpu", "--name", "resumed"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["run_id"] == unfinished and s["model_name"] == "resumed" and s["model_version"] == "1"
    assert s["stages"]["ingest"]["skipped"] == "resume" and ws.manifest.stat().st_mtime_ns == manifest_mtime
    assert s["stages"]["train"]["device"] == "cpu"
    run = tracking.get_run(ws.tracking_uri, unfinished)
    assert run["tags"]["medxfer.registered"] == "resumed/1"
    assert any(k.startswith("test") and k.endswith("auroc") for k in run["metrics"])  # evaluated

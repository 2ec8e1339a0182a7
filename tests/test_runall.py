"""medxfer run: the chained stages, the machine-readable result (issue section 8) and the closing table."""

from __future__ import annotations

import json
import math

from medxfer import tracking
from medxfer.cli import app
from medxfer.core import ui
from medxfer.runall import TEST_METRICS, mlflow_ui_command
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
    assert math.isclose(run["metrics"]["test_auroc"], s["test"]["auroc"]["value"], rel_tol=1e-9)
    assert run["tags"]["medxfer.registered"] == "tiny-us/1"


def test_json_on_stdout_table_and_ui_command_on_stderr(registered, capsys) -> None:
    ui.finish(registered.result, as_json=True)
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["run_id"] == registered.run_id
    assert "mlflow ui --backend-store-uri" in err.replace("\n", " ") and "test auroc" in err


def test_ui_command_is_exact() -> None:
    assert (
        mlflow_ui_command("sqlite:////w/medxfer-work/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////w/medxfer-work/mlflow.db"
    )
    assert mlflow_ui_command("sqlite:////a b/mlflow.db") == "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    assert "http://127.0.0.1:5000" in mlflow_ui_command("http://127.0.0.1:5000")


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


def test_cli_ends_with_the_copyable_mlflow_ui_command(registered, monkeypatch) -> None:
    import medxfer.runall

    # The stages are covered above; here only what the command prints around the result.
    monkeypatch.setattr(medxfer.runall, "run_all", lambda *a, **k: registered.result)
    res = CliRunner().invoke(app, ["run", str(registered.dataset.spec_path), "--json"], terminal_width=60)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model_version"] == registered.model_version
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"Review the run and the registered model: mlflow ui --backend-store-uri {registered.tracking_uri}"

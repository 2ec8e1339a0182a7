"""MLflow tracking on a real sqlite store, through the `medxfer.tracking` facade."""

from __future__ import annotations

import subprocess
import sys

from medxfer import tracking as T


def test_tracker_logs_params_epoch_batches_artifacts_and_status(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = T.Tracker(uri, "demo", T.PHIGuard(), system_metrics=False)
    run_id = tr.start("demo-tiny", {T.TAG_ROLE: "main"})
    tr.log_params({f"p{i}": i for i in range(150)})  # more than one log_batch call's worth
    tr.log_epoch(0, {"train_loss": 1.0, "val_auroc": 0.5, "lr/head": 1e-3})
    tr.log_epoch(1, {"train_loss": 0.5, "val_auroc": 0.7, "lr/head": 5e-4})
    tr.log_text("a: 1\n", "recipe.yaml")
    tr.log_json({"x": 1}, "reports/split_counts.json")
    assert T.find_unfinished_run(uri, "demo") == run_id
    tr.end("finished")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[T.TAG_STATUS] == "finished"
    assert len(run.data.params) == 150
    assert [m.value for m in client.get_metric_history(run_id, "val_auroc")] == [0.5, 0.7]
    arts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "reports")}
    assert {"recipe.yaml", "reports/split_counts.json"} <= arts
    # artifacts live next to the sqlite store, not in ./mlruns of whatever folder the user ran from
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert T.find_unfinished_run(uri, "demo") is None
    assert T.ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"


def test_disabled_tracker_is_a_no_op(tmp_path) -> None:
    tr = T.Tracker(f"sqlite:///{tmp_path / 'x.db'}", "demo", T.PHIGuard(), enabled=False)
    assert tr.start("r", {}) is None
    tr.log_epoch(0, {"a": 1.0})
    tr.end()
    assert not (tmp_path / "x.db").exists()


def test_importing_tracking_loads_no_mlflow_and_no_matplotlib() -> None:
    """mlflow (~1 s to import) and matplotlib load on first use, so `medxfer --help` and untracked stages stay fast."""
    code = "import sys, medxfer.tracking; assert not {'mlflow', 'matplotlib'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

"""MLflow tracking on a real sqlite store, through the `medxfer.tracking` facade."""

from __future__ import annotations

import json
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
    assert T.ui_command(uri) == f"{T.medxfer_executable()} ui --workspace {tmp_path}"


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


def test_tag_names_are_mlflows_own() -> None:
    """The tag names spelt out in medxfer.tracking (so importing it loads no mlflow) are MLflow 3.17's constants."""
    from medxfer.tracking import tracker
    from mlflow.utils import mlflow_tags as MT

    assert tracker.TAG_NOTE == MT.MLFLOW_RUN_NOTE
    assert (tracker.TAG_SOURCE_NAME, tracker.TAG_SOURCE_TYPE) == (MT.MLFLOW_SOURCE_NAME, MT.MLFLOW_SOURCE_TYPE)
    assert (tracker.TAG_GIT_COMMIT, tracker.TAG_GIT_DIRTY) == (MT.MLFLOW_GIT_COMMIT, MT.MLFLOW_GIT_DIRTY)
    assert (tracker.TAG_USER, tracker.TAG_LOGGED_ARTIFACTS) == (MT.MLFLOW_USER, MT.MLFLOW_LOGGED_ARTIFACTS)
    assert tracker.TAG_DATASET_CONTEXT == MT.MLFLOW_DATASET_CONTEXT


def test_experiment_kind_descriptions_source_dataset_and_table(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = T.Tracker(uri, "demo", T.PHIGuard(), system_metrics=False)
    run_id = tr.start("demo-tiny", {T.TAG_ROLE: "main"})
    tr.describe_experiment("**demo**: binary classification")
    tr.describe("run note")
    tr.log_dataset("demo", "abc-def", {"train": {"neg": 3, "pos": 2}, "val": {"neg": 1, "pos": 1}})
    tr.log_table([{"metric": "auroc", "value": 0.9}], "evaluation/summary_table.json")
    tr.log_table([{"metric": "auroc", "value": 0.8}], "evaluation/summary_table.json")  # replaced, not appended
    tr.end("finished")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("demo")
    assert exp.tags[T.TAG_EXPERIMENT_KIND] == T.EXPERIMENT_KIND == "custom_model_development"
    assert exp.tags[T.TAG_NOTE].startswith("**demo**")
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags[T.TAG_NOTE] == "run note" and tags["mlflow.source.name"] == "medxfer train"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.loggedArtifacts"] == '[{"path": "evaluation/summary_table.json", "type": "table"}]'
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("demo", "abc-def") and "/" not in inp.dataset.source
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    got = T.download_run_artifact(uri, run_id, "evaluation/summary_table.json", tmp_path / "dl")
    assert json.loads(got.read_text()) == {"columns": ["metric", "value"], "data": [["auroc", 0.8]]}


def test_experiment_made_before_the_kind_tag_gets_it(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("old")
    assert T.experiment_id(uri, "old") == exp_id
    assert client.get_experiment(exp_id).tags[T.TAG_EXPERIMENT_KIND] == "custom_model_development"

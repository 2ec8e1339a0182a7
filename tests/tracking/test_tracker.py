"""MLflow tracking on a real sqlite store; the PHI guard refuses source paths and original identifiers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from medxfer.tracking import tracker as T


def _spec(root: Path) -> SimpleNamespace:
    return SimpleNamespace(
        root=root,
        labels_csv=root.parent / "labels.csv",
        spec_path=None,
        split=SimpleNamespace(pinned_test=None),
        classes=["benign", "malignant"],
        name="demo",
    )


def test_guard_refuses_paths_folder_names_and_originals(tmp_path) -> None:
    root = tmp_path / "src"
    files = [[str(root / "DOE_JANE_19700101" / "series1" / "IM0001.dcm")], [str(root / "benign" / "x.dcm")]]
    pmap = tmp_path / "pseudonym_map.csv"
    pmap.write_text("pseudonym,kind,original\npt-0123456789abcdef0123,pt,PAT998877\n")
    g = T.PHIGuard.for_training(_spec(root), files, pseudonym_map=pmap)
    for bad in (
        str(root),
        f"see {root}/x",
        str(root.parent / "labels.csv"),
        "DOE_JANE_19700101",
        "reader: doe_jane_19700101/",
        "id=PAT998877",
        "DOE_JANE_19700101/series1/IM0001.dcm",
    ):
        with pytest.raises(T.PHIRefused) as exc:
            g.check("param x", bad)
        assert bad not in str(exc.value)  # the refusal never repeats the value
    # class names, common words, hashes and numbers that happen to share a folder name are fine
    for ok in ("benign", "data.batch_size", "efficientnet_lite0", "0.001", "32", "a3f9c0ffee", "series"):
        assert g.check("param x", ok) == ok
    with pytest.raises(T.PHIRefused):
        g.check_tree("artifact", {"a": [{"b": "x PAT998877 y"}]})


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


def test_learning_curve_plot(tmp_path) -> None:
    hist = [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.1 / (e + 1),
            "val_auroc": 0.5 + e / 10,
            "val_balanced_accuracy": 0.5,
        }
        for e in range(3)
    ]
    out = T.plot_learning_curves(hist, [{"epoch": 1}], tmp_path / "curve.png", "auroc")
    assert out.stat().st_size > 1000

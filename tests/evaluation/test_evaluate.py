"""Evaluation: the pure core on synthetic outputs, and end to end on a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from evalfixtures import outputs
from medxfer.evaluation.evaluate import HEADLINE, compute_evaluation, metrics_for_mlflow, summary_table, summary_tags
from medxfer.stats.calibration import softmax
from sklearn import metrics as skm

CLASSES = ["benign", "malignant"]


def test_binary_core_contract() -> None:
    val, test = outputs(80, 1), outputs(120, 2)
    c = compute_evaluation(val, test, CLASSES, "malignant", "binary", n_bootstrap=150, seed=3)
    ev = c.evaluation
    assert set(ev["test"]) == set(HEADLINE)
    for name, m in ev["test"].items():
        assert set(m) == {"value", "ci_low", "ci_high"}
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    # Calibration helps on over-confident logits, and the probabilities are the calibrated ones.
    assert ev["temperature"] > 1.2
    assert ev["calibration"]["test"]["nll_after"] < ev["calibration"]["test"]["nll_before"]
    np.testing.assert_allclose(c.prob_test, softmax(test.logits, ev["temperature"]))
    # The threshold comes from validation and is applied to calibrated test probabilities.
    p_val = softmax(val.logits, ev["temperature"])[:, 1]
    fpr, tpr, _ = skm.roc_curve(val.y, p_val)
    pv = ev["threshold_policy"]
    assert pv["val_sensitivity"] + pv["val_specificity"] - 1 == pytest.approx((tpr - fpr).max())
    dec = c.prob_test[:, 1] >= ev["threshold"]
    assert ev["test"]["sensitivity"]["value"] == pytest.approx(dec[test.y == 1].mean())
    margin = test.logits[:, 1] - test.logits[:, 0]
    assert ev["test"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(test.y, margin))
    assert np.asarray(ev["confusion_matrix"]["test"]).sum() == test.y.size
    assert ev["bootstrap"]["n_resamples"] == 150 and ev["bootstrap"]["unit"] == "patient"
    json.dumps(ev, allow_nan=False)  # strictly JSON (no NaN)
    flat = metrics_for_mlflow(ev)
    assert {"test/auroc", "test/ece", "eval/threshold", "eval/temperature"} <= set(flat)
    assert {"test/auroc_ci_low", "test/auroc_ci_high"} <= set(summary_tags(ev))  # CIs: tags, not metrics
    table = {(r["split"], r["metric"]) for r in summary_table(ev)}
    assert {("test", "auroc"), ("val", "auroc"), ("test", "calibration_ece_after")} <= table


def test_positive_class_first_is_respected() -> None:
    """positive_class may be class index 0; scores and the threshold must follow it, not column 1."""
    val, test = outputs(80, 1), outputs(120, 2)
    c = compute_evaluation(val, test, ["pos", "neg"], "pos", "binary", n_bootstrap=50)
    ev = c.evaluation
    called = c.prob_test[:, 0] >= ev["threshold"]
    assert ev["test"]["sensitivity"]["value"] == pytest.approx(called[test.y == 0].mean())
    assert ev["test"]["specificity"]["value"] == pytest.approx((~called)[test.y == 1].mean())
    assert ev["test"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(test.y == 0, c.prob_test[:, 0]))
    assert ev["calibration"]["test"]["brier_after"] == pytest.approx(
        skm.brier_score_loss(test.y == 0, c.prob_test[:, 0])
    )


def test_sensitivity_target_policy() -> None:
    val, test = outputs(200, 4, signal=1.0), outputs(200, 5, signal=1.0)
    ev = compute_evaluation(
        val, test, CLASSES, "malignant", "binary", policy="sensitivity", target=0.95, n_bootstrap=50
    ).evaluation
    assert ev["threshold_policy"]["policy"] == "sensitivity"
    assert ev["threshold_policy"]["val_sensitivity"] >= 0.95


def test_multiclass_core() -> None:
    val, test = outputs(90, 1, k=3), outputs(150, 2, k=3)
    ev = compute_evaluation(val, test, ["a", "b", "c"], None, "multiclass", n_bootstrap=80).evaluation
    assert ev["threshold"] is None and ev["threshold_policy"]["policy"] == "argmax"
    assert set(ev["per_class"]["test"]) == {"a", "b", "c"}
    # per-class values go to the evaluation table, not to 3 one-point charts per class
    assert ("test", "a/auroc") in {(r["split"], r["metric"]) for r in summary_table(ev)}
    assert not [k for k in metrics_for_mlflow(ev) if k.count("/") > 1]
    p = softmax(test.logits, ev["temperature"])
    assert ev["test"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(test.y, p, multi_class="ovr"))
    assert ev["test"]["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(test.y, p.argmax(1)))


def test_transfer_gain_and_negative_transfer_flag() -> None:
    val, test = outputs(100, 1, signal=2.0), outputs(200, 2, signal=2.0)
    # A weak control on the same studies (same labels, weaker signal): clear positive transfer.
    weak_val, weak_test = outputs(100, 1, signal=0.3), outputs(200, 2, signal=0.3)
    ev = compute_evaluation(
        val,
        test,
        CLASSES,
        "malignant",
        "binary",
        n_bootstrap=200,
        control_val=weak_val,
        control_test=weak_test,
        control_kind="scratch",
        control_run_id="c" * 32,
    ).evaluation
    tr = ev["transfer"]
    assert tr["gain"]["value"] == pytest.approx(tr["main"] - tr["control"])
    assert tr["gain"]["ci_low"] > 0 and tr["verdict"] == "better" and tr["negative_transfer"] is False
    # The same model as its own control: gain 0, which is "not better" -> flagged.
    ev = compute_evaluation(
        val, test, CLASSES, "malignant", "binary", n_bootstrap=50, control_val=val, control_test=test
    ).evaluation
    assert ev["transfer"]["gain"]["value"] == 0 and ev["transfer"]["negative_transfer"] is True
    # A control that scored only some of the studies: compared on the common ones, the gap reported.
    part = test.subset(list(test.studies[:150]))
    ev = compute_evaluation(val, test, CLASSES, "malignant", "binary", n_bootstrap=50, control_test=part).evaluation
    assert ev["transfer"]["n_studies"] == 150 and ev["transfer"]["missing_in_control"] == 50


def test_data_conditions_raise_data_errors() -> None:
    from medxfer.core.errors import DataError

    val, test = outputs(80, 1), outputs(120, 2)
    with pytest.raises(DataError, match="set positive_class in the data spec"):
        compute_evaluation(val, test, CLASSES, None, "binary", n_bootstrap=10)
    other = outputs(40, 3, prefix="x")  # a control whose studies are not the main run's
    with pytest.raises(DataError, match="control arm scored none"):
        compute_evaluation(val, test, CLASSES, "malignant", "binary", n_bootstrap=10, control_test=other)


# ---------------------------------------------------------------------------- end to end on a tiny trained run


@pytest.mark.slow
def test_evaluate_end_to_end(evaluated_run) -> None:
    res = evaluated_run.result
    ev = json.loads(res.path.read_text())
    assert res.path == evaluated_run.workspace / "tiny-dicom2d" / "runs" / evaluated_run.run_id / "evaluation.json"
    assert ev["run_id"] == evaluated_run.run_id and ev["classes"] == ["neg", "pos"] and ev["positive_class"] == "pos"
    assert ev["counts"]["test"] == {"neg": 4, "pos": 4} and ev["evaluated"] == {"val": 8, "test": 8}
    assert ev["bootstrap"]["n_resamples"] == 200 and ev["bootstrap"]["unit"] == "patient"
    assert ev["threshold_policy"]["policy"] == "youden" and 0 <= ev["threshold"] <= 1
    assert any("test has 8 studies" in w for w in ev["warnings"])
    assert ev["tta"] == {"views": 2, "flip_dims": [[3]]}  # the default 2D recipe mirrors at test time
    # The control arm was evaluated on the same 8 test studies.
    tr = ev["transfer"]
    assert tr["control_run_id"] == evaluated_run.control_run_id and tr["control_kind"] == "scratch"
    assert tr["n_studies"] == 8 and tr["negative_transfer"] == (tr["gain"]["value"] <= 0 or tr["gain"]["ci_low"] <= 0)
    # --json contract (issue section 8).
    s = res.summary()
    assert s["run_id"] == evaluated_run.run_id and "threshold" in s
    assert set(s["test"]) == {
        "auroc",
        "auprc",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "ece",
        "brier",
    }
    assert all(set(m) == {"value", "ci_low", "ci_high"} for m in s["test"].values())
    json.dumps(s, allow_nan=False)
    title, rows = res.table()
    assert any(k == "test auroc" for k, _ in rows)
    # Predictions are keyed by pseudonyms only.
    preds = (res.path.parent / "evaluation" / "predictions.csv").read_text()
    assert preds.splitlines()[0].startswith("study_key,patient_key,split,label,prob_neg,prob_pos")


@pytest.mark.slow
def test_evaluation_is_logged_to_the_training_run(evaluated_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(evaluated_run.tracking_uri)
    run = client.get_run(evaluated_run.run_id)
    m = run.data.metrics
    ev = evaluated_run.result.evaluation
    assert m["test/auroc"] == pytest.approx(ev["test"]["auroc"]["value"])
    # CIs are tags next to their metric, not one-point charts
    tags = run.data.tags
    assert float(tags["test/auroc_ci_low"]) == pytest.approx(ev["test"]["auroc"]["ci_low"], rel=1e-5)
    assert m["eval/temperature"] == pytest.approx(ev["temperature"]) and "transfer/gain_ci_low" in tags
    assert "transfer/gain" in m and not [k for k in m if "ci_" in k]
    # Validation results do not land inside training's per-epoch val/ curves.
    assert len(client.get_metric_history(evaluated_run.run_id, "val/auroc")) == 1
    assert "**Evaluation**" in tags["mlflow.note.content"] and "auroc" in tags["mlflow.note.content"]
    assert run.data.tags["medxfer.evaluated"] == "true" and run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(evaluated_run.run_id, "evaluation")}
    assert {
        "evaluation/evaluation.json",
        "evaluation/roc.png",
        "evaluation/pr.png",
        "evaluation/reliability.png",
        "evaluation/confusion_matrix.png",
        "evaluation/predictions.csv",
    } <= arts


@pytest.mark.slow
def test_no_phi_in_evaluation_outputs(evaluated_run) -> None:
    from medxfer.io.phi import scan_for_phi

    run_dir = evaluated_run.result.path.parent
    hits = scan_for_phi([run_dir / "evaluation.json", run_dir / "evaluation"], evaluated_run.dataset.phi)
    assert hits == []
    assert "dicom" not in (run_dir / "evaluation.json").read_text().lower()  # no source paths


def test_unknown_run_is_a_clear_error(tmp_path) -> None:
    from medxfer.core.errors import MedxferError
    from medxfer.evaluation.evaluate import evaluate

    with pytest.raises(MedxferError, match="no MLflow run"):
        evaluate("0" * 32, tmp_path, n_bootstrap=10)


@pytest.mark.slow
def test_cli_json_is_one_object_on_stdout(evaluated_run) -> None:
    from medxfer.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(
        app,
        ["evaluate", evaluated_run.run_id, "--workspace", str(evaluated_run.workspace), "--bootstrap", "50", "--json"],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)  # exactly one JSON document, nothing else on stdout
    assert out["run_id"] == evaluated_run.run_id and out["bootstrap"]["n_resamples"] == 50
    assert set(out["test"]["auroc"]) == {"value", "ci_low", "ci_high"} and "threshold" in out
    assert "test auroc" in res.stderr  # the human table goes to stderr


@pytest.mark.slow
def test_phi_guard_knows_the_real_data_root(evaluated_run) -> None:
    """The spec in a checkpoint has a relative source root: the guard must resolve it like training did."""
    from medxfer.evaluation.evaluate import spec_from_checkpoint
    from medxfer.ingest.manifest import read_manifest
    from medxfer.tracking import PHIGuard
    from medxfer.training.checkpoint import load

    ws = evaluated_run.workspace / "tiny-dicom2d"
    spec = spec_from_checkpoint(load(ws / "runs" / evaluated_run.run_id / "best.pt"))
    guard = PHIGuard.for_training(spec, list(read_manifest(ws / "manifest.parquet")["files"]))  # real paths
    assert guard.problem("PLANTEDNAME_HELGA")  # a patient-named source folder
    assert guard.problem(str(evaluated_run.dataset.root / "x"))

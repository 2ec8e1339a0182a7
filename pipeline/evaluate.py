"""``medxfer evaluate RUN_ID``: honest test metrics for a trained run.

What it does, in order:

1. Finds the run in MLflow, loads its best checkpoint (the local run folder, else the run's
   ``checkpoints/best.pt`` artifact) and runs the deterministic eval transforms on the val and
   test studies of the run's split.
2. Fits temperature scaling on validation logits; every probability reported afterwards is
   calibrated. The binary operating threshold is chosen on the *calibrated* validation
   probabilities (Youden, or a target sensitivity/specificity from ``recipe.evaluation``), so the
   threshold in ``evaluation.json`` applies directly to what the deployed model outputs.
3. Test metrics with patient-level bootstrap 95% CIs (see :mod:`pipeline.metrics`); validation
   metrics as point values (the threshold was tuned there, CIs would flatter).
4. If training recorded a control arm (tag ``medxfer.control_run_id``), evaluates it on the same
   test studies and reports the AUROC transfer gain with a paired patient-level bootstrap CI.
   **Negative-transfer rule:** the flag is raised unless the pretrained model is shown better,
   i.e. when the gain's point estimate <= 0 or its 95% CI lower bound <= 0.
5. Logs everything to the **same** MLflow run as training (not a nested run): one place shows the
   learning curves and the final test numbers, and registration reads metrics from that run.
   Metrics ``test_<m>``, ``test_<m>_ci_low``, ``test_<m>_ci_high``, ``val_<m>``, ``calibration_*``,
   ``transfer_gain*``; tag ``medxfer.evaluated=true``; artifacts under ``evaluation/``
   (``evaluation.json``, ``predictions.csv`` keyed by pseudonyms only, and the PNG plots).
   Re-evaluating overwrites these values (MLflow keeps the metric history).
6. Writes ``<workspace>/<spec>/runs/<run_id>/evaluation.json`` (+ plots, predictions) locally.

``evaluation.json`` (format 1)::

    run_id, format, medxfer_version, task, classes, positive_class,
    test / val: {auroc, auprc, balanced_accuracy, sensitivity, specificity, ppv, npv, ece, brier:
                 {value, ci_low, ci_high}}   (val: CIs null; ece/brier after calibration)
    threshold (float, binary; null for multiclass = argmax), threshold_policy {policy, target, value,
    val_sensitivity, val_specificity, target_achieved}, temperature,
    calibration {method, temperature, converged, val_nll_before/after, n_bins, ece_definition,
                 val/test: {ece_before, ece_after, brier_before, brier_after, nll_before, nll_after}},
    per_class {val, test: {class: {auroc, auprc, sensitivity, specificity, ppv, npv, support}}} (multiclass),
    confusion_matrix {labels, test: [[...]] rows=true}, counts {split: {class: n}}, patients {split: n},
    bootstrap {n_resamples, n_skipped, n_patients, seed, unit, method, level},
    transfer (null or {control_run_id, control_kind, metric, main, control, gain {value, ci_low, ci_high},
              p_not_better, negative_transfer, verdict, rule, n_resamples, n_skipped, n_studies}),
    checkpoint {epoch, best_metric}, hashes, artifacts [file names]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.calibration import fit_temperature, softmax

FORMAT = 1
NEGATIVE_TRANSFER_RULE = ("flag when the pretrained (main) model is not shown better than the control: "
                          "AUROC gain point estimate <= 0 or its 95% paired patient-bootstrap CI lower bound <= 0")
HEADLINE = (*M.METRIC_NAMES, "ece", "brier")


def medxfer_version() -> str:
    try:
        return metadata.version("medxfer")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


@dataclass
class SplitOutputs:
    """Raw model outputs for the studies of one split, in one fixed order."""

    logits: np.ndarray  # (N, K)
    y: np.ndarray  # (N,) class indices
    patients: np.ndarray  # (N,) patient pseudonyms
    studies: np.ndarray  # (N,) study pseudonyms

    def subset(self, studies: Sequence[str]) -> SplitOutputs:
        pos = {s: i for i, s in enumerate(self.studies)}
        idx = np.array([pos[s] for s in studies], dtype=int)
        return SplitOutputs(self.logits[idx], self.y[idx], self.patients[idx], self.studies[idx])


@dataclass
class Computed:
    """``evaluation`` (the JSON dict) plus the arrays the plots and predictions table need."""

    evaluation: dict[str, Any]
    prob_test_raw: np.ndarray
    prob_test: np.ndarray
    prob_val: np.ndarray
    decision_test: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def _clean(obj: Any) -> Any:
    """JSON-safe: nan/inf -> None, numpy -> python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _calibration_block(y: np.ndarray, before: np.ndarray, after: np.ndarray, pos: int | None) -> dict[str, float]:
    if pos is not None:
        yb = (y == pos).astype(int)
        before, after = M.binary_prob(before, pos), M.binary_prob(after, pos)
    else:
        yb = y
    return {"ece_before": M.ece(yb, before), "ece_after": M.ece(yb, after), "brier_before": M.brier(yb, before),
            "brier_after": M.brier(yb, after), "nll_before": M.nll(yb, before), "nll_after": M.nll(yb, after)}


def _decision(prob: np.ndarray, threshold: float | None, pos: int | None) -> np.ndarray:
    if threshold is None or pos is None:
        return prob.argmax(axis=1)
    other = 1 - pos if prob.shape[1] == 2 else None
    positive = prob[:, pos] >= threshold
    return np.where(positive, pos, other if other is not None else prob.argmax(axis=1))


def compute_evaluation(val: SplitOutputs, test: SplitOutputs, classes: Sequence[str], positive_class: str | None,
                       task: str, policy: str = "youden", target: float | None = None, n_bootstrap: int = 1000,
                       seed: int = 0, control_val: SplitOutputs | None = None,
                       control_test: SplitOutputs | None = None, control_kind: str | None = None,
                       control_run_id: str | None = None) -> Computed:
    """Everything in ``evaluation.json`` that follows from the model outputs (pure numpy, no I/O)."""
    classes = list(classes)
    binary = task == "binary"
    pos = classes.index(positive_class) if binary and positive_class else None
    if binary and pos is None:
        raise ValueError("a binary task needs positive_class")

    fit = fit_temperature(val.logits, val.y)
    t = fit.temperature
    p_val_raw, p_val = softmax(val.logits), softmax(val.logits, t)
    p_test_raw, p_test = softmax(test.logits), softmax(test.logits, t)

    if binary:
        choice = M.choose_threshold(val.y == pos, p_val[:, pos], policy, target)
        threshold: float | None = choice.threshold
        threshold_policy = {**choice.as_dict()}
    else:
        threshold = None
        threshold_policy = {"policy": "argmax", "target": None, "value": None}

    stat = M.headline_statistic(threshold, pos if pos is not None else 1)
    boot = M.bootstrap(test.y, p_test, test.patients, stat, n_resamples=n_bootstrap, seed=seed)
    test_block = {k: boot.intervals[k].as_dict() for k in HEADLINE}
    val_point = stat(val.y, p_val)
    val_block = {k: {"value": val_point[k], "ci_low": None, "ci_high": None} for k in HEADLINE}

    decision = _decision(p_test, threshold, pos)
    evaluation: dict[str, Any] = {
        "format": FORMAT,
        "medxfer_version": medxfer_version(),
        "task": task,
        "classes": classes,
        "positive_class": positive_class if binary else None,
        "test": test_block,
        "val": val_block,
        "threshold": threshold,
        "threshold_policy": threshold_policy,
        "temperature": t,
        "calibration": {**fit.as_dict(), "n_bins": 15,
                        "ece_definition": ("positive-class probability vs observed frequency" if binary
                                           else "top-label confidence vs accuracy"),
                        "val": _calibration_block(val.y, p_val_raw, p_val, pos),
                        "test": _calibration_block(test.y, p_test_raw, p_test, pos)},
        "confusion_matrix": {"labels": classes, "rows": "true", "columns": "predicted",
                             "test": M.confusion_matrix(test.y, decision, len(classes)).tolist()},
        "bootstrap": {k: v for k, v in boot.as_dict().items() if k != "intervals"},
        "transfer": None,
    }
    if not binary:
        evaluation["per_class"] = {"val": M.multiclass_metrics(val.y, p_val, classes)["per_class"],
                                   "test": M.multiclass_metrics(test.y, p_test, classes)["per_class"]}
    if control_test is not None:
        evaluation["transfer"] = _transfer(test, p_test, control_val, control_test, pos, n_bootstrap, seed,
                                           control_kind, control_run_id)
    return Computed(_clean(evaluation), p_test_raw, p_test, p_val, decision)


def _transfer(test: SplitOutputs, p_test: np.ndarray, control_val: SplitOutputs | None, control_test: SplitOutputs,
              pos: int | None, n_bootstrap: int, seed: int, kind: str | None, run_id: str | None) -> dict[str, Any]:
    """Paired comparison on the studies both arms scored (normally all test studies)."""
    common = [s for s in test.studies if s in set(control_test.studies)]
    if not common:
        raise ValueError("the control arm scored none of the main run's test studies")
    main = test.subset(common)
    ctrl = control_test.subset(common)
    # Each arm is calibrated on its own validation outputs; binary AUROC does not depend on it, the
    # macro one-vs-rest AUROC of a multiclass model can.
    t_ctrl = fit_temperature(control_val.logits, control_val.y).temperature if control_val is not None else 1.0
    idx = {s: i for i, s in enumerate(test.studies)}
    pa = p_test[[idx[s] for s in common]]
    pb = softmax(ctrl.logits, t_ctrl)
    y = main.y
    if pos is not None:
        y = (y == pos).astype(int)
        pa, pb = M.binary_prob(pa, pos), M.binary_prob(pb, pos)
    res = M.paired_bootstrap_diff(y, pa, pb, main.patients, M.macro_auroc, n_resamples=n_bootstrap, seed=seed)
    gain = res["diff"]
    if not np.isfinite(gain.ci_low) or not np.isfinite(gain.value):
        verdict = "undetermined"
    elif gain.ci_low > 0:
        verdict = "better"
    elif gain.ci_high < 0:
        verdict = "worse"
    else:
        verdict = "not shown better"
    negative = bool(not np.isfinite(gain.ci_low) or gain.value <= 0 or gain.ci_low <= 0)
    return {"control_run_id": run_id, "control_kind": kind, "metric": "auroc" if pos is not None else "macro_auroc",
            "main": res["a"], "control": res["b"], "gain": gain.as_dict(), "p_not_better": res["p_not_better"],
            "negative_transfer": negative, "verdict": verdict, "rule": NEGATIVE_TRANSFER_RULE,
            "control_temperature": t_ctrl, "n_resamples": res["n_resamples"], "n_skipped": res["n_skipped"],
            "n_studies": len(common), "missing_in_control": int(test.studies.size - len(common))}


def write_plots(out_dir: Path, computed: Computed, test: SplitOutputs) -> list[Path]:
    from pipeline import plots

    ev = computed.evaluation
    classes = ev["classes"]
    pos = classes.index(ev["positive_class"]) if ev.get("positive_class") else None
    op = None
    if pos is not None:
        op = (ev["test"]["sensitivity"]["value"] or 0.0, ev["test"]["specificity"]["value"] or 0.0)
    if pos is not None:
        y_rel = (test.y == pos).astype(int)
        before, after = M.binary_prob(computed.prob_test_raw, pos), M.binary_prob(computed.prob_test, pos)
    else:
        y_rel, before, after = test.y, computed.prob_test_raw, computed.prob_test
    cm = np.asarray(ev["confusion_matrix"]["test"])
    return [
        plots.roc_plot(test.y, computed.prob_test, classes, pos, out_dir / "roc.png", operating_point=op),
        plots.pr_plot(test.y, computed.prob_test, classes, pos, out_dir / "pr.png"),
        plots.reliability_plot(y_rel, before, after, out_dir / "reliability.png"),
        plots.confusion_plot(cm, classes, out_dir / "confusion_matrix.png"),
    ]


def predictions_table(split: str, out: SplitOutputs, prob: np.ndarray, classes: Sequence[str],
                      decision: np.ndarray | None = None):
    """Per-study outputs keyed by pseudonyms only (no paths): for notebooks and error analysis."""
    import pandas as pd

    df = pd.DataFrame({"study_key": out.studies, "patient_key": out.patients, "split": split,
                       "label": [classes[i] for i in out.y]})
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, i]
    if decision is not None:
        df["decision"] = [classes[i] for i in decision]
    return df


def metrics_for_mlflow(ev: dict[str, Any]) -> dict[str, float]:
    """Flat metric names logged to the training run."""
    out: dict[str, float] = {}
    for split in ("test", "val"):
        for k, m in (ev.get(split) or {}).items():
            for part, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if m.get(part) is not None:
                    out[f"{split}_{k}{suffix}"] = float(m[part])
    if ev.get("threshold") is not None:
        out["threshold"] = float(ev["threshold"])
    out["temperature"] = float(ev["temperature"])
    for split in ("val", "test"):
        for k, v in (ev["calibration"].get(split) or {}).items():
            if v is not None:
                out[f"calibration_{split}_{k}"] = float(v)
    tr = ev.get("transfer")
    if tr:
        for part, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            if tr["gain"].get(part) is not None:
                out[f"transfer_gain{suffix}"] = float(tr["gain"][part])
        out["control_test_auroc"] = float(tr["control"])
        out["negative_transfer"] = float(tr["negative_transfer"])
    for c, m in ((ev.get("per_class") or {}).get("test") or {}).items():
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", c)
        for k in ("auroc", "sensitivity", "specificity"):
            if m.get(k) is not None:
                out[f"test_{safe}_{k}"] = float(m[k])
    return out


def dump_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    return path

"""``medxfer evaluate RUN_ID``: honest test metrics for a trained run.

What it does, in order:

1. Finds the run in MLflow, loads its best checkpoint (the local run folder, else the run's
   ``checkpoints/best.pt`` artifact) and runs the deterministic eval transforms on the val and
   test studies of the run's split.
2. Calibrates on validation logits: temperature alone, temperature plus a per-class bias (Platt scaling on the
   logit for two classes) or nothing, whichever has the lowest cross-validated NLL within validation
   (:func:`medxfer.stats.calibration.fit_calibration`); every probability reported afterwards is calibrated.
   The binary operating threshold is chosen on the *calibrated* validation probabilities (Youden, or a target
   sensitivity/specificity from ``recipe.evaluation``), so the threshold in ``evaluation.json`` applies
   directly to what the deployed model outputs.
3. Test metrics with patient-level bootstrap 95% CIs (see :mod:`medxfer.stats.metrics`); validation
   metrics as point values (the threshold was tuned there, CIs would flatter), but for AUROC's CI.
4. If training recorded a control arm (tag ``medxfer.control_run_id``), evaluates it on the same
   test studies and reports the AUROC transfer gain with a paired patient-level bootstrap CI.
   **Negative-transfer rule:** the flag is raised unless the pretrained model is shown better,
   i.e. when the gain's point estimate <= 0 or its 95% CI lower bound <= 0.
5. Logs everything to the **same** MLflow run as training (not a nested run): one place shows the
   learning curves and the final test numbers, and registration reads metrics from that run.
   Metrics ``test/<m>``, ``eval/threshold``, ``eval/temperature``, ``transfer/*``, ``eval/ood_threshold`` and
   ``test/ood_flag_rate`` (:func:`metrics_for_mlflow`);
   the 95% CIs as tags ``test/<m>_ci_low``/``_ci_high``; validation and calibration values in the table
   ``evaluation/summary_table.json``; the run description gains the headline test metrics; tag
   ``medxfer.evaluated=true``; artifacts under ``evaluation/``
   (``evaluation.json``, ``predictions.csv`` keyed by pseudonyms only, the PNG plots, and ``report.html``:
   one self-contained page for a reader without MLflow, :mod:`medxfer.evaluation.report`).
   Re-evaluating overwrites these values (MLflow keeps the metric history).
6. Writes ``<workspace>/<spec>/runs/<run_id>/evaluation.json`` (+ plots, predictions) locally.

A fold-ensemble run (``medxfer.training.ensemble.create_ensemble_run``: a k-fold split has no val rows) brings its
out-of-fold table (artifact ``oof/oof_predictions.csv``): those logits ARE the validation outputs, so the
calibration choice, the threshold and the validation AUROC CI the registration guard reads all come from them
(``validation_source: "out_of_fold"``, else ``"val_split"``); the test split is inferred with the ensemble. The OOD
statistics are fitted on the ensemble's features of the same non-test studies (``ood.fit_on`` says what that
means for the threshold). Its ``auto/race.json`` is copied into ``race``, its checkpoint's ``ensemble`` block into
``ensemble``; a control-run tag is not evaluated for it (the race compares the arms out of fold).

``evaluation.json`` (format 1)::

    run_id, format, medxfer_version, task, classes, positive_class,
    test / val: {auroc, auprc, balanced_accuracy, sensitivity, specificity, ppv, npv, ece, brier:
                 {value, ci_low, ci_high}}   (val: CIs null but for auroc; ece/brier after calibration)
    threshold (float, binary; null for multiclass = argmax), threshold_policy {policy, target, value,
    val_sensitivity, val_specificity, target_achieved}, temperature,
    bias (per class, added to logits / temperature),
    calibration {method, temperature, bias, cv_nll {method: NLL}, cv_folds, reason, n_bins, ece_definition,
                 val/test: {ece_before, ece_after, ece_debiased_before/after, brier_before, brier_after,
                 nll_before, nll_after}, methods {method: {temperature, bias, val, test}}},
    per_class {val, test: {class: {auroc, auprc, sensitivity, specificity, ppv, npv, support}}} (multiclass),
    confusion_matrix {labels, test: [[...]] rows=true}, counts {split: {class: n}}, patients {split: n},
    bootstrap {n_resamples, n_skipped, n_patients, seed, unit, method, level},
    transfer (null or {control_run_id, control_kind, metric, main, control, gain {value, ci_low, ci_high},
              p_not_better, negative_transfer, verdict, rule, n_resamples, n_skipped, n_studies}),
    warnings [plain-language caveats: small splits, separable validation, skipped resamples, ...],
    evaluated {val, test: studies scored}, failed_studies (null or {val, test}: unreadable now),
    checkpoint {epoch (counted from 1), best_metric, select_metric}, hashes, artifacts [file names],
    validation_source ("val_split" | "out_of_fold"), ensemble (fold ensembles: {members, folds, member_run_ids,
    best_epochs, best_metrics}), race (runs with auto/race.json: its content),
    ood {method, description, features, fit_on, percentile, threshold_rule, fitted, reason, file, sha256, threshold,
         n_fit, n_components, feature_dim, shrinkage, val_flag_rate (cross-fitted), test_flag_rate, test_flagged,
         n_test, val_scores/test_scores {median, p90, p99, max}}   (medxfer.evaluation.shift; arrays in `file`),
    subgroups {split, rule, min_studies, recorded, metrics, by {manufacturer, manufacturer_model:
               [{group, n_studies, counts, status ("ok" | "too few"), metrics, ood_flag_rate}]}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from medxfer.core.errors import DataError
from medxfer.core.jsonio import dump_json, json_safe, medxfer_version
from medxfer.evaluation import shift
from medxfer.stats import metrics as M
from medxfer.stats.calibration import METHODS as CALIBRATION_METHODS
from medxfer.stats.calibration import (
    as_logit_columns,
    calibrated_softmax,
    debiased_ece,
    fit_calibration,
    fit_method,
    fit_temperature,
    softmax,
)

FORMAT = 1
NEGATIVE_TRANSFER_RULE = (
    "flag when the pretrained (main) model is not shown better than the control: "
    "AUROC gain point estimate <= 0 or its 95% paired patient-bootstrap CI lower bound <= 0"
)
HEADLINE = (*M.METRIC_NAMES, "ece", "brier")


@dataclass
class SplitOutputs:
    """Raw model outputs for the studies of one split, in one fixed order."""

    logits: np.ndarray  # (N, K)
    y: np.ndarray  # (N,) class indices
    patients: np.ndarray  # (N,) patient pseudonyms
    studies: np.ndarray  # (N,) study pseudonyms
    # (N, D) penultimate features of the inference model (TTA views averaged), for the OOD statistics; None when
    # the model has none (a test's tiny net) or the outputs were made up.
    features: np.ndarray | None = None

    def subset(self, studies: Sequence[str]) -> SplitOutputs:
        pos = {s: i for i, s in enumerate(self.studies)}
        idx = np.array([pos[s] for s in studies], dtype=int)
        feats = None if self.features is None else self.features[idx]
        return SplitOutputs(self.logits[idx], self.y[idx], self.patients[idx], self.studies[idx], feats)


@dataclass
class Computed:
    """``evaluation`` (the JSON dict) plus the arrays the plots and predictions table need."""

    evaluation: dict[str, Any]
    prob_test_raw: np.ndarray
    prob_test: np.ndarray
    prob_val: np.ndarray
    decision_test: np.ndarray


def _calibration_block(y: np.ndarray, before: np.ndarray, after: np.ndarray, pos: int | None) -> dict[str, float]:
    if pos is not None:
        yb = (y == pos).astype(int)
        before, after = M.binary_prob(before, pos), M.binary_prob(after, pos)
    else:
        yb = y
    return {
        "ece_before": M.ece(yb, before),
        "ece_after": M.ece(yb, after),
        "ece_debiased_before": debiased_ece(yb, before),
        "ece_debiased_after": debiased_ece(yb, after),
        "brier_before": M.brier(yb, before),
        "brier_after": M.brier(yb, after),
        "nll_before": M.nll(yb, before),
        "nll_after": M.nll(yb, after),
    }


def _every_method(
    val: SplitOutputs, test: SplitOutputs, p_val_raw: np.ndarray, p_test_raw: np.ndarray, pos: int | None
) -> dict[str, Any]:
    """Each calibration method fitted on all of validation, with its ECE and Brier before/after on both splits:
    what the choice (made on cross-validated validation NLL only) was between."""
    out: dict[str, Any] = {}
    for m in CALIBRATION_METHODS:
        t, b = fit_method(m, as_logit_columns(val.logits), val.y)
        out[m] = {
            "temperature": t,
            "bias": [float(x) for x in b],
            "val": _calibration_block(val.y, p_val_raw, calibrated_softmax(val.logits, t, b), pos),
            "test": _calibration_block(test.y, p_test_raw, calibrated_softmax(test.logits, t, b), pos),
        }
    return out


def _decision(prob: np.ndarray, threshold: float | None, pos: int | None) -> np.ndarray:
    if threshold is None or pos is None:
        return prob.argmax(axis=1)
    other = 1 - pos if prob.shape[1] == 2 else None
    positive = prob[:, pos] >= threshold
    return np.where(positive, pos, other if other is not None else prob.argmax(axis=1))


def compute_evaluation(
    val: SplitOutputs,
    test: SplitOutputs,
    classes: Sequence[str],
    positive_class: str | None,
    task: str,
    policy: str = "youden",
    target: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    control_val: SplitOutputs | None = None,
    control_test: SplitOutputs | None = None,
    control_kind: str | None = None,
    control_run_id: str | None = None,
) -> Computed:
    """Everything in ``evaluation.json`` that follows from the model outputs (pure numpy, no I/O)."""
    classes = list(classes)
    binary = task == "binary"
    pos = classes.index(positive_class) if binary and positive_class else None
    if binary and pos is None:
        raise DataError(f"a binary task needs positive_class, one of {classes}; set positive_class in the data spec")

    fit = fit_calibration(val.logits, val.y, seed=seed)
    t = fit.temperature
    p_val_raw, p_val = softmax(val.logits), fit.probs(val.logits)
    p_test_raw, p_test = softmax(test.logits), fit.probs(test.logits)

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
    # AUROC alone gets a validation CI: it needs no threshold or temperature, so the bootstrap does not flatter
    # it the way it would the threshold metrics tuned on validation. The registration guard reads it: a CI that
    # includes 0.5 means validation shows no signal (the --limit 40, epochs=2 demo: AUROC 0.125).
    val_auroc = M.bootstrap(
        val.y, p_val, val.patients, _auroc_statistic(pos), n_resamples=n_bootstrap, seed=seed
    ).intervals["auroc"]
    val_block["auroc"] = val_auroc.as_dict()

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
        "bias": fit.bias,
        "calibration": {
            **fit.as_dict(),
            "n_bins": 15,
            "ece_definition": (
                "positive-class probability vs observed frequency" if binary else "top-label confidence vs accuracy"
            ),
            "ece_debiased_definition": "debiased L2 calibration error, Kumar et al. 2019 (same bins)",
            "val": _calibration_block(val.y, p_val_raw, p_val, pos),
            "test": _calibration_block(test.y, p_test_raw, p_test, pos),
            "methods": _every_method(val, test, p_val_raw, p_test_raw, pos),
        },
        "confusion_matrix": {
            "labels": classes,
            "rows": "true",
            "columns": "predicted",
            "test": M.confusion_matrix(test.y, decision, len(classes)).tolist(),
        },
        "bootstrap": {k: v for k, v in boot.as_dict().items() if k != "intervals"},
        "transfer": None,
    }
    if not binary:
        evaluation["per_class"] = {
            "val": M.multiclass_metrics(val.y, p_val, classes)["per_class"],
            "test": M.multiclass_metrics(test.y, p_test, classes)["per_class"],
        }
    evaluation["warnings"] = _warnings(val, test, evaluation, fit.temperature)
    if control_test is not None:
        evaluation["transfer"] = _transfer(
            test, p_test, control_val, control_test, pos, n_bootstrap, seed, control_kind, control_run_id
        )
    return Computed(json_safe(evaluation), p_test_raw, p_test, p_val, decision)


def _auroc_statistic(pos: int | None):
    """AUROC of the positive class (binary) or macro one-vs-rest (multiclass), as a bootstrap statistic."""
    return M.auroc_statistic(pos)  # batched over resamples (same numbers, ~10x faster)


def _warnings(val: SplitOutputs, test: SplitOutputs, ev: dict[str, Any], temperature: float) -> list[str]:
    """Plain-language caveats about this evaluation; shown in the terminal, the JSON and the model card."""
    out = []
    k = len(ev["classes"])
    for name, s in (("validation", val), ("test", test)):
        per_class = np.bincount(s.y, minlength=k)
        if s.y.size < 30 or per_class.min() < 10:
            out.append(
                f"{name} has {s.y.size} studies (fewest per class: {per_class.min()}): "
                + (
                    "the threshold and the temperature fitted on it are noisy"
                    if name == "validation"
                    else "expect wide confidence intervals"
                )
            )
    separated = (
        ev["val"]["auroc"]["value"] == 1.0 if ev["positive_class"] else bool((val.logits.argmax(1) == val.y).all())
    )
    if separated and temperature < 1.0:
        out.append(
            "validation is perfectly separated, so temperature scaling is ill-posed (its NLL keeps "
            f"falling as T -> 0); T = {temperature:.3g} sharpens probabilities, check the reliability plot"
        )
    cal = ev["calibration"]["val"]
    if cal["ece_after"] is not None and cal["ece_before"] is not None and cal["ece_after"] > cal["ece_before"]:
        out.append(
            f"temperature scaling lowered validation NLL but raised validation ECE "
            f"({cal['ece_before']:.3f} -> {cal['ece_after']:.3f})"
        )
    b = ev["bootstrap"]
    if b["n_skipped"] > 0.1 * max(b["n_resamples"], 1):
        out.append(f"{b['n_skipped']} of {b['n_resamples']} bootstrap resamples lacked a class and were skipped")
    if ev["threshold_policy"].get("target_achieved") is False:
        out.append(
            f"no validation threshold reaches {ev['threshold_policy']['policy']} "
            f"{ev['threshold_policy']['target']}; the strictest observed one is used"
        )
    return out


def _transfer(
    test: SplitOutputs,
    p_test: np.ndarray,
    control_val: SplitOutputs | None,
    control_test: SplitOutputs,
    pos: int | None,
    n_bootstrap: int,
    seed: int,
    kind: str | None,
    run_id: str | None,
) -> dict[str, Any]:
    """Paired comparison on the studies both arms scored (normally all test studies)."""
    common = [s for s in test.studies if s in set(control_test.studies)]
    if not common:
        raise DataError(
            "the control arm scored none of the main run's test studies (none could be read for it); "
            "check that the source files are still in place and rerun evaluate"
        )
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
    return {
        "control_run_id": run_id,
        "control_kind": kind,
        "metric": "auroc" if pos is not None else "macro_auroc",
        "main": res["a"],
        "control": res["b"],
        "gain": gain.as_dict(),
        "p_not_better": res["p_not_better"],
        "negative_transfer": negative,
        "verdict": verdict,
        "rule": NEGATIVE_TRANSFER_RULE,
        "control_temperature": t_ctrl,
        "n_resamples": res["n_resamples"],
        "n_skipped": res["n_skipped"],
        "n_studies": len(common),
        "missing_in_control": int(test.studies.size - len(common)),
    }


def write_plots(out_dir: Path, computed: Computed, test: SplitOutputs) -> list[Path]:
    from medxfer.stats import plots

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


def predictions_table(
    split: str, out: SplitOutputs, prob: np.ndarray, classes: Sequence[str], decision: np.ndarray | None = None
):
    """Per-study outputs keyed by pseudonyms only (no paths): for notebooks and error analysis."""
    import pandas as pd

    df = pd.DataFrame(
        {"study_key": out.studies, "patient_key": out.patients, "split": split, "label": [classes[i] for i in out.y]}
    )
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, i]
    if decision is not None:
        df["decision"] = [classes[i] for i in decision]
    return df


def metrics_for_mlflow(ev: dict[str, Any]) -> dict[str, float]:
    """The evaluation's metrics in the training run, grouped by prefix: ``test/<m>``, ``eval/threshold``,
    ``eval/temperature``, ``transfer/*``. One value each: CIs are tags; validation, calibration and per-class values
    a table (:func:`summary_tags`, :func:`summary_table`), not one-point charts (issue 15: 63 of them)."""
    out: dict[str, float] = {}
    for k, m in (ev.get("test") or {}).items():
        if m.get("value") is not None:
            out[f"test/{k}"] = float(m["value"])
    if ev.get("threshold") is not None:
        out["eval/threshold"] = float(ev["threshold"])
    out["eval/temperature"] = float(ev["temperature"])
    tr = ev.get("transfer")
    if tr:
        if tr["gain"].get("value") is not None:
            out["transfer/gain"] = float(tr["gain"]["value"])
        out["transfer/control_test_auroc"] = float(tr["control"])
        out["transfer/negative_transfer"] = float(tr["negative_transfer"])
    ood_block = ev.get("ood") or {}
    if ood_block.get("fitted"):
        out["eval/ood_threshold"] = float(ood_block["threshold"])
        out["test/ood_flag_rate"] = float(ood_block["test_flag_rate"])
    return out


def summary_tags(ev: dict[str, Any]) -> dict[str, str]:
    """95% CI bounds as run tags next to their metric (``test/auroc_ci_low``): the run overview lists them."""
    out: dict[str, str] = {}
    blocks = {f"test/{k}": m for k, m in (ev.get("test") or {}).items()}
    if ev.get("transfer"):
        blocks["transfer/gain"] = ev["transfer"]["gain"]
    for name, m in blocks.items():
        for part in ("ci_low", "ci_high"):
            if m.get(part) is not None:
                out[f"{name}_{part}"] = f"{float(m[part]):.6g}"
    return out


def summary_table(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (split, metric): value and CI; the calibration's before/after values as rows too."""
    rows: list[dict[str, Any]] = []
    for split in ("test", "val"):
        for k, m in (ev.get(split) or {}).items():
            cis = {"ci_low": m.get("ci_low"), "ci_high": m.get("ci_high")}
            rows.append({"split": split, "metric": k, "value": m.get("value"), **cis})
    for split in ("val", "test"):
        for k, v in (ev["calibration"].get(split) or {}).items():
            rows.append({"split": split, "metric": f"calibration_{k}", "value": v, "ci_low": None, "ci_high": None})
        for c, m in ((ev.get("per_class") or {}).get(split) or {}).items():
            for k in ("auroc", "sensitivity", "specificity"):
                if m.get(k) is not None:
                    rows.append({"split": split, "metric": f"{c}/{k}", "value": m[k], "ci_low": None, "ci_high": None})
    return rows


NOTE_EVALUATION = "\n\n**Evaluation** (`medxfer evaluate`)"


def evaluation_note(ev: dict[str, Any], previous: str = "") -> str:
    """The run's description with its evaluation paragraph (re)written: headline test metrics with 95% CIs."""

    def fmt(k: str) -> str | None:
        m = (ev.get("test") or {}).get(k) or {}
        if m.get("value") is None:
            return None
        ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m.get("ci_low") is not None else ""
        return f"{k} {m['value']:.3f}{ci}"

    heads = [t for t in map(fmt, ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "ece")) if t]
    n = (ev.get("evaluated") or {}).get("test")
    lines = [f"- test ({n} studies, patient-bootstrap 95% CI): " + "; ".join(heads)]
    if ev.get("threshold") is not None:
        policy = (ev.get("threshold_policy") or {}).get("policy", "")
        lines.append(
            f"- threshold {ev['threshold']:.4f} ({policy}, from {_fitted_on(ev)}), temperature {ev['temperature']:.3g}"
        )
    tr = ev.get("transfer")
    if tr:
        g = tr["gain"]
        ci = f" [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" if g.get("ci_low") is not None else ""
        lines.append(f"- transfer gain over {tr.get('control_kind')}: {g['value']:+.3f}{ci}; {tr.get('verdict', '')}")
    base = previous.split(NOTE_EVALUATION)[0]
    return base + NOTE_EVALUATION + "\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------- the stage


@dataclass
class EvalResult:
    run_id: str
    evaluation: dict[str, Any]
    path: Path
    tracking_uri: str
    logged: bool

    def summary(self) -> dict[str, Any]:
        ev = self.evaluation
        cal = ev["calibration"]
        return {
            "run_id": self.run_id,
            "task": ev["task"],
            "classes": ev["classes"],
            "positive_class": ev["positive_class"],
            "test": ev["test"],
            "threshold": ev["threshold"],
            "threshold_policy": ev["threshold_policy"],
            "temperature": ev["temperature"],
            "calibration": {"test": cal["test"], "val": cal["val"]},
            "val": ev["val"],
            "counts": ev.get("counts"),
            "bootstrap": ev["bootstrap"],
            "transfer": ev.get("transfer"),
            "failed_studies": ev.get("failed_studies"),
            "evaluation_json": str(self.path),
            "logged_to_mlflow": self.logged,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        ev = self.evaluation
        rows = [("run", self.run_id), ("test studies", _count_text(ev, "test"))]
        for k in HEADLINE:
            m, v = ev["test"][k], ev["val"][k]["value"]
            ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None else ""
            rows.append(
                (
                    f"test {k}",
                    (f"{m['value']:.3f}" if m["value"] is not None else "n/a")
                    + ci
                    + (f"   (val {v:.3f})" if v is not None else ""),
                )
            )
        if ev["threshold"] is not None:
            tp = ev["threshold_policy"]
            rows.append(
                (
                    "threshold",
                    f"{ev['threshold']:.4f} ({tp['policy']}"
                    + (f" {tp['target']}" if tp.get("target") else "")
                    + f", from {_fitted_on(ev)})",
                )
            )
        else:
            rows.append(("decision", "argmax"))
        c = ev["calibration"]["test"]
        rows.append(
            (
                "calibration",
                f"{ev['calibration'].get('method', 'temperature')}, T={ev['temperature']:.3f}; "
                f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}; "
                f"Brier {c['brier_before']:.3f} -> {c['brier_after']:.3f}",
            )
        )
        tr = ev.get("transfer")
        if tr:
            g = tr["gain"]
            rows.append(
                (
                    f"transfer vs {tr['control_kind'] or 'control'}",
                    f"AUROC gain {g['value']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]; "
                    + (f"NEGATIVE-TRANSFER FLAG ({tr['verdict']})" if tr["negative_transfer"] else "pretrained better"),
                )
            )
        o = ev.get("ood") or {}
        if o.get("fitted"):
            rows.append(
                (
                    "OOD flag",
                    f"score > {o['threshold']:.2f} ({o['n_fit']} val studies); flagged: val "
                    f"{100 * o['val_flag_rate']:.1f}% (cross-fitted), test {100 * o['test_flag_rate']:.1f}%",
                )
            )
        elif o:
            rows.append(("OOD flag", f"not fitted: {o.get('reason')}"))
        b = ev["bootstrap"]
        rows.append(("CIs", f"patient bootstrap, {b['n_resamples']} resamples, {b['n_skipped']} skipped"))
        if ev.get("failed_studies"):
            rows.append(("unreadable", json.dumps(ev["failed_studies"])))
        rows.append(("written", str(self.path)))
        return f"evaluate: {self.run_id[:12]}", rows


def _fitted_on(ev: dict[str, Any]) -> str:
    """Where the threshold and calibration were fitted, in words."""
    return "out-of-fold predictions" if ev.get("validation_source") == "out_of_fold" else "validation"


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _count_text(ev: dict[str, Any], split: str) -> str:
    counts = (ev.get("counts") or {}).get(split) or {}
    pts = (ev.get("patients") or {}).get(split)
    inner = ", ".join(f"{c} {n}" for c, n in counts.items())
    return f"{sum(counts.values())} ({inner})" + (f", {pts} patients" if pts is not None else "")


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def infer_split(
    model: Any, rows: Any, spec: Any, recipe: Any, device: str, description: str, batch_size: int = 16
) -> tuple[SplitOutputs, int]:
    """Deterministic preprocessing + forward pass for the studies in `rows` (manifest rows with split info).

    Returns the outputs of the studies that loaded and the number that failed: a study that ingest
    accepted but that cannot be read now (moved, changed) is counted and reported, not silently lost.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from medxfer.core import ui
    from medxfer.data.transforms import load_inference_tensor
    from medxfer.models.classifier import logits_and_features

    records = rows.to_dict("records")

    def load(r: dict[str, Any]):
        try:
            return load_inference_tensor(list(r["files"]), r["source_kind"], spec, recipe)
        except Exception:  # reported as a count; the exception text may name a source path
            return None

    logits: list[np.ndarray] = []
    feats: list[np.ndarray | None] = []
    keep: list[int] = []
    batch: list[Any] = []
    idx: list[int] = []
    failed = 0

    def flush() -> None:
        if batch:
            with torch.inference_mode():
                out, f = logits_and_features(model, torch.stack(batch).to(device, dtype=torch.float32))
            logits.append(out.float().cpu().numpy())
            feats.append(None if f is None else f.float().cpu().numpy())
            keep.extend(idx)
            batch.clear()
            idx.clear()

    def loaded():
        # A bounded window of loads in flight: volumes are large, never hold a whole split in memory.
        with ThreadPoolExecutor(max_workers=2) as pool:
            window = 2 * batch_size
            for start in range(0, len(records), window):
                yield from pool.map(load, records[start : start + window])

    for i, x in enumerate(ui.progress(loaded(), total=len(records), description=description)):
        if x is None:
            failed += 1
            continue
        if batch and tuple(x.shape) != tuple(batch[0].shape):
            flush()
        batch.append(x)
        idx.append(i)
        if len(batch) >= batch_size:
            flush()
    flush()
    k = int(getattr(model, "num_classes", 0)) or (logits[0].shape[1] if logits else 1)
    z = np.concatenate(logits) if logits else np.zeros((0, k))
    features = np.concatenate(feats) if feats and all(f is not None for f in feats) else None
    sel = [records[i] for i in keep]
    return SplitOutputs(
        z,
        np.array([int(r["label_index"]) for r in sel], dtype=int),
        np.array([str(r["patient_key"]) for r in sel]),
        np.array([str(r["study_key"]) for r in sel]),
        features,
    ), failed


def _run_file(ws: Any, uri: str, run_id: str, artifact: str, tmp: Path, download: bool = True) -> Path | None:
    """A run's file: the workspace run folder's copy, else (when `download`) its MLflow artifact; None if neither."""
    from medxfer import tracking

    local = ws.run_dir(run_id) / artifact
    if local.is_file():
        return local
    if not download:
        return None
    got = tracking.download_run_artifact(uri, run_id, artifact, tmp / "run-files" / Path(artifact).parent)
    return got if got is not None and got.is_file() else None


def oof_outputs(oof: Any, rows: Any, n_classes: int) -> tuple[SplitOutputs, int]:
    """(the out-of-fold table as validation outputs, in the split's row order; non-test studies it lacks).

    `oof`: columns ``study_key``, ``fold``, ``logit_0`` .. ``logit_{C-1}`` (raw logits of the fold model that did
    not train on the study). `rows`: :func:`_split_rows`'s rows. A table that names a test study, a study the split
    does not have, or a fold other than the study's own would evaluate on the wrong data: refused.
    """
    from medxfer.core.errors import StageError
    from medxfer.training.ensemble import OOF_FILE, check_oof

    oof = check_oof(oof, n_classes, what=OOF_FILE)
    keys = oof["study_key"]
    by_key = rows.assign(study_key=rows["study_key"].astype(str)).set_index("study_key")
    unknown = ~keys.isin(by_key.index)
    if unknown.any():
        raise StageError(
            f"{OOF_FILE} names {int(unknown.sum())} studies this workspace's split does not have; evaluate in the "
            "workspace the fold models were trained in (--workspace)"
        )
    split_of = by_key.loc[keys, "split"].to_numpy()
    if (split_of == "test").any():
        raise StageError(
            f"{OOF_FILE} has {int((split_of == 'test').sum())} test studies: out-of-fold predictions come from "
            "the non-test folds only; the test split must stay unseen until evaluation"
        )
    moved = int((oof["fold"].to_numpy(dtype=float) != by_key.loc[keys, "fold"].to_numpy(dtype=float)).sum())
    if moved:
        raise StageError(
            f"{OOF_FILE}: the fold of {moved} studies differs from the split's; the split changed since the fold "
            "models were trained. Rerun `run --auto`"
        )
    z = oof[[f"logit_{i}" for i in range(n_classes)]].to_numpy(dtype=np.float64)
    pos = {k: i for i, k in enumerate(keys)}
    nontest = rows[rows["split"] != "test"]
    ordered = nontest[nontest["study_key"].astype(str).isin(pos)]
    idx = np.array([pos[str(k)] for k in ordered["study_key"]], dtype=int)
    out = SplitOutputs(
        z[idx] if idx.size else np.zeros((0, n_classes)),
        ordered["label_index"].to_numpy(dtype=int),
        ordered["patient_key"].astype(str).to_numpy(),
        ordered["study_key"].astype(str).to_numpy(),
    )
    return out, int(len(nontest) - len(ordered))


def _one_based(index: Any) -> int | None:
    return None if index is None else int(index) + 1


def _split_rows(ws: Any, spec: Any, ckpt: dict[str, Any]):
    from medxfer.core.errors import StageError
    from medxfer.ingest.manifest import join

    if not ws.manifest.is_file() or not ws.splits.is_file():
        raise StageError(
            f"the workspace has no manifest/split for '{spec.name}'; evaluate needs the workspace the "
            "run was trained in (--workspace)"
        )
    report = json.loads(ws.split_report.read_text()) if ws.split_report.is_file() else {}
    trained_on = (ckpt.get("hashes") or {}).get("split")
    if trained_on and report.get("split_hash") and report["split_hash"] != trained_on:
        # A re-split can move training studies into test: numbers would be optimistic without warning.
        raise StageError(
            "the split changed since this run was trained (split hash differs); evaluating would "
            "mix training studies into the test set. Retrain, or restore the original split"
        )
    # The fixed val and test splits, in pixel-hash order as split deals them: the manifest is in pseudonym order,
    # which changes with the workspace key, and the bootstrap numbers patients by first appearance (two fresh
    # demo workspaces gave test AUROC CIs [0.851, 0.952] and [0.849, 0.950] from identical weights).
    joined = join(ws, select_fold=False)
    # The k-fold number of each non-test study (-1 elsewhere): an out-of-fold table is checked against it.
    rows = joined.rows.merge(joined.splits[["study_key", "fold"]], on="study_key", how="left")
    rows = rows.sort_values(["content_hash", "study_key"], na_position="last", kind="stable").reset_index(drop=True)
    counts: dict[str, dict[str, int]] = {}
    patients: dict[str, int] = {}
    for s in ("train", "val", "test"):
        g = rows[rows["split"] == s]
        counts[s] = {c: int((g["label_index"] == i).sum()) for i, c in enumerate(spec.classes)}
        patients[s] = int(g["patient_key"].nunique())
    return rows, counts, patients


def spec_from_checkpoint(ckpt: dict[str, Any]):
    """The run's DataSpec; relative source paths resolve against the spec file, as in training, so the PHI
    guard knows the real data root (a copy from MLflow has its paths masked, which is fine too)."""
    from medxfer.config.spec import DataSpec

    spec = DataSpec.model_validate({k: v for k, v in ckpt["spec"].items() if k != "spec_path"})
    if ckpt["spec"].get("spec_path") not in (None, "<local path>"):
        spec.spec_path = Path(ckpt["spec"]["spec_path"])
    return spec


def evaluate(run_id: str, workspace: Path, n_bootstrap: int | None = None, device: str | None = None) -> EvalResult:
    """Evaluate a training run end to end; see the module docstring for what is computed and where it goes.

    n_bootstrap: patient-level resamples; None takes the run's ``recipe.evaluation.bootstrap`` (1000 by default).
    """
    import tempfile

    import pandas as pd
    from medxfer import tracking
    from medxfer.config.recipe import recipe_from_dict
    from medxfer.core import ui
    from medxfer.core.errors import StageError
    from medxfer.core.workspace import Workspace
    from medxfer.data.transforms import inference_model, tta_views
    from medxfer.training import checkpoint as ckpt_io
    from medxfer.training import ensemble as ens_run

    uri = Workspace.for_spec(workspace, "_").tracking_uri
    run_id = tracking.sync_workspace(workspace, uri, run_id)  # what the run spooled reaches the server first
    run = tracking.get_run(uri, run_id)
    spec_name = run["tags"].get(tracking.TAG_SPEC) or run["experiment"]
    ws = Workspace.for_spec(workspace, spec_name)
    dev = _device(device)
    with tempfile.TemporaryDirectory() as tmp:
        model, ckpt = ckpt_io.load_for_inference(ckpt_io.best_path(ws, run_id, Path(tmp)), dev)
        spec = spec_from_checkpoint(ckpt)
        recipe = recipe_from_dict(ckpt["recipe"])
        rows, counts, patients = _split_rows(ws, spec, ckpt)
        wants_oof = bool(ckpt.get("ensemble")) or any(
            run["tags"].get(t) for t in (ens_run.TAG_ENSEMBLE, ens_run.TAG_AUTO)
        )
        oof_path = _run_file(ws, uri, run_id, ens_run.OOF_FILE, Path(tmp), download=wants_oof)
        race_path = _run_file(ws, uri, run_id, ens_run.RACE_FILE, Path(tmp), download=wants_oof)
        race = json.loads(race_path.read_text()) if race_path is not None else None
        test_rows = rows[rows["split"] == "test"]
        oof = None
        if oof_path is not None:
            oof, n_missing = oof_outputs(pd.read_csv(oof_path), rows, len(spec.classes))
            val_rows = rows[rows["study_key"].isin(set(oof.studies))]
            if n_missing:
                ui.warn(f"{n_missing} non-test studies have no out-of-fold prediction; they are not in validation")
        else:
            val_rows = rows[rows["split"] == "val"]
        if val_rows.empty or test_rows.empty:
            raise StageError(
                f"the split has {len(val_rows)} val and {len(test_rows)} test studies; evaluate needs "
                "both (k-fold splits without a test fraction cannot be evaluated here)"
            )
        source = f"{len(val_rows)} out-of-fold" if oof is not None else f"{len(val_rows)} val"
        ui.info(f"evaluating run {run_id[:12]} on {source} + {len(test_rows)} test studies ({dev})")
        model = inference_model(model, spec, recipe)
        if oof is not None:
            # The validation outputs ARE the out-of-fold logits (each from the fold model that did not train on
            # the study). The ensemble's pass over the same studies only gives the OOD statistics their features.
            fitted, val_failed = infer_split(model, val_rows, spec, recipe, dev, "non-test (OOD features)")
            val = oof.subset(list(fitted.studies))
            val.features = fitted.features
        else:
            val, val_failed = infer_split(model, val_rows, spec, recipe, dev, "val")
        test, test_failed = infer_split(model, test_rows, spec, recipe, dev, "test")
        control_kw: dict[str, Any] = {}
        control_id = run["tags"].get(tracking.TAG_CONTROL_RUN)
        if control_id and oof is not None:
            # The control would need its own out-of-fold outputs; an --auto run compares arms out of fold in its
            # race (race.json: transfer_gain), so this control tag is not evaluated a second time here.
            ui.info(f"control run {control_id[:12]} not evaluated: out-of-fold runs report transfer in race.json")
            control_id = None
        if control_id:
            cmodel, cckpt = ckpt_io.load_for_inference(ckpt_io.best_path(ws, control_id, Path(tmp)), dev)
            ui.info(f"control arm {control_id[:12]} ({cckpt.get('control') or 'control'}): same val/test studies")
            crecipe = recipe_from_dict(cckpt["recipe"])
            cmodel = inference_model(cmodel, spec, crecipe)
            cval, _ = infer_split(cmodel, val_rows, spec, crecipe, dev, "control val")
            ctest, _ = infer_split(cmodel, test_rows, spec, crecipe, dev, "control test")
            control_kw = {
                "control_val": cval,
                "control_test": ctest,
                "control_run_id": control_id,
                "control_kind": cckpt.get("control") or run["tags"].get(tracking.TAG_CONTROL),
            }
    if val.y.size == 0 or test.y.size == 0:
        raise StageError("no val or test study could be read; check that the source files are still in place")
    computed = compute_evaluation(
        val,
        test,
        spec.classes,
        spec.positive_class,
        spec.task,
        policy=recipe.evaluation.threshold,
        target=recipe.evaluation.target,
        n_bootstrap=recipe.evaluation.bootstrap if n_bootstrap is None else n_bootstrap,
        seed=recipe.seed,
        **control_kw,
    )
    ev = computed.evaluation
    best = ckpt.get("best") or {}
    views = tta_views(spec, recipe)
    ev = {
        "run_id": run_id,
        **ev,
        "counts": counts,
        "patients": patients,
        "evaluated": {"val": int(val.y.size), "test": int(test.y.size)},
        "tta": {"views": 1 + len(views), "flip_dims": [list(v) for v in views]},
        "failed_studies": {"val": val_failed, "test": test_failed} if val_failed or test_failed else None,
        "checkpoint": {
            # Counted from 1, as in MLflow's steps, the console and the model card (the loop's index + 1).
            "epoch": _one_based(best.get("epoch", ckpt.get("epoch"))),
            "best_metric": ckpt.get("best_metric"),
            "select_metric": recipe.select_metric,
        },
        "hashes": ckpt.get("hashes"),
        "validation_source": "out_of_fold" if oof is not None else "val_split",
    }
    if oof is not None:
        # What "val" means here: the out-of-fold studies, i.e. every non-test study that has an OOF prediction.
        ev["counts"] = {**counts, "val": {c: int((val.y == i).sum()) for i, c in enumerate(spec.classes)}}
        ev["patients"] = {**patients, "val": int(np.unique(val.patients).size)}
    if ckpt.get("ensemble"):
        ev["ensemble"] = json_safe(dict(ckpt["ensemble"]))
    if race is not None:
        ev["race"] = race
    ood_block, ood_stats, val_ood, test_ood = shift.ood_evaluation(
        val.features,
        test.features,
        seed=recipe.seed,
        fit_on=shift.FIT_ON_NON_TEST if oof is not None else "validation",
    )
    ev["ood"] = ood_block
    if ood_stats is None:
        ev["warnings"].append(f"no OOD statistics ({ood_block['reason']}): predict leaves ood_score/ood_flag empty")
    elif ood_stats.n_fit < 50:
        ev["warnings"].append(
            f"the OOD threshold comes from {ood_stats.n_fit} validation studies: its 99th percentile is close to "
            "their maximum, so expect more than 1% of new in-distribution studies flagged"
        )
    pos_index = spec.classes.index(spec.positive_class) if spec.task == "binary" and spec.positive_class else None
    ev["subgroups"] = shift.subgroup_metrics(
        test.studies,
        test.y,
        computed.prob_test,
        shift.scanner_of(test_rows),
        spec.classes,
        ev["threshold"],
        pos_index,
        None if ood_stats is None else ood_stats.flag(test_ood),
    )
    if val_failed or test_failed:
        ev["warnings"].append(
            f"{val_failed} val and {test_failed} test studies could not be read and are not in the metrics"
        )
    for w in ev["warnings"]:
        ui.warn(w)

    run_dir = ws.run_dir(run_id)
    out_dir = run_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out_dir, computed, test)
    preds = predictions_table("test", test, computed.prob_test, spec.classes, computed.decision_test)
    preds = pd.concat([predictions_table("val", val, computed.prob_val, spec.classes), preds], ignore_index=True)
    extra = []
    if ood_stats is not None:
        # val: cross-fitted scores (what the threshold was taken from); test: scored by the final statistics.
        preds["ood_score"] = np.concatenate([val_ood, test_ood])
        preds["ood_flag"] = preds["ood_score"] > ood_stats.threshold
        ev["ood"]["sha256"] = sha256_of(shift.write_ood_stats(ood_stats, out_dir / shift.OOD_FILE))
        extra.append(shift.OOD_FILE)
    else:
        (out_dir / shift.OOD_FILE).unlink(missing_ok=True)  # a re-evaluation must not leave stale statistics
    preds.to_csv(out_dir / "predictions.csv", index=False)
    ev["artifacts"] = sorted([p.name for p in plots] + ["predictions.csv", "evaluation.json", "report.html", *extra])
    path = dump_json(ev, run_dir / "evaluation.json")
    dump_json(ev, out_dir / "evaluation.json")
    _write_report(uri, run, ckpt, json.loads(path.read_text()), out_dir, plots)
    logged = _log_to_run(uri, run, spec, ws, ev, out_dir, rows)
    return EvalResult(run_id, json.loads(path.read_text()), path, uri, logged)


def _log_to_run(
    uri: str, run: dict[str, Any], spec: Any, ws: Any, ev: dict[str, Any], out_dir: Path, rows: Any
) -> bool:
    """Everything into the training run itself (see the module docstring for names)."""
    from medxfer import tracking

    guard = tracking.PHIGuard.for_training(spec, list(rows["files"]), pseudonym_map=ws.pseudonym_map)
    t = tracking.attach(uri, run["experiment"], run["run_id"], guard)
    t.log_epoch(0, metrics_for_mlflow(ev))
    t.log_table(summary_table(ev), "evaluation/summary_table.json")
    tags = {"medxfer.evaluated": "true", **summary_tags(ev)}
    tags[tracking.TAG_NOTE] = evaluation_note(ev, run["tags"].get(tracking.TAG_NOTE, ""))
    if ev.get("transfer"):
        tags["medxfer.negative_transfer"] = str(bool(ev["transfer"]["negative_transfer"])).lower()
    t.set_tags(tags)
    for f in sorted(out_dir.iterdir()):
        if f.suffix == ".html":
            # The page's words are guarded, not its inline images: base64 splits into thousands of random short
            # "words", any of which could equal a protected short ID and refuse the report for nothing.
            guard.check(f"artifact {f.name}", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", f.read_text()))
        t.log_file(f, "evaluation", text=f.suffix in (".json", ".csv"))
    return True


def _write_report(
    uri: str, run: dict[str, Any], ckpt: dict[str, Any], ev: dict[str, Any], out_dir: Path, plots: list[Path]
) -> Path:
    """``evaluation/report.html``: the page a reader without MLflow opens (medxfer.evaluation.report); logged
    with the other files of out_dir, through the PHI guard."""
    from medxfer.evaluation import modelcard, report

    _, card = modelcard.build_model_card(modelcard.run_info_from_checkpoint(ckpt, run["tags"]), ev)
    history = report.run_history(uri, run["run_id"], ckpt.get("history"))
    figures = {p.stem: p for p in plots}  # roc, pr, reliability, confusion_matrix: drawn from the arrays above
    return report.write_report(ev, history, card, out_dir / report.REPORT, figures)

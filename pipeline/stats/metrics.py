"""Classification metrics, operating thresholds and patient-level bootstrap CIs. Pure numpy.

Conventions used everywhere in medxfer's evaluation:

- ``y`` is an int array of class indices, ``prob`` an (N, K) array of class probabilities (K >= 2).
- Binary tasks: the score is ``prob[:, pos]`` and the decision is ``score >= threshold``.
  Multiclass tasks: the decision is ``argmax``; one-vs-rest versions of every metric are
  computed per class and macro-averaged (unweighted mean over classes).
- Undefined values (e.g. PPV with no predicted positives) are ``nan``, never 0, so they cannot
  masquerade as a bad result; JSON writers turn them into ``null``.
- Bootstrap CIs resample *patients* with replacement; every study of a drawn patient comes
  along (as many times as the patient was drawn). Studies of one patient are correlated, so
  resampling studies would understate the width of the interval. Percentile 95% CIs.
  Resamples lacking a class (AUROC undefined) are skipped and counted, not silently dropped.

AUROC and average precision are implemented here (tie-aware, checked against scikit-learn in
the tests) because the bootstrap calls them thousands of times and sklearn's input validation
dominates at these sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from medxfer.core.errors import DataError

METRIC_NAMES = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv")


# ---------------------------------------------------------------------------- rank metrics


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve for binary labels (1 = positive); ties count one half. nan if a class is absent."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # Average ranks over ties (Mann-Whitney U).
    ranks = np.empty(s.size, dtype=np.float64)
    _, first, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _operating_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(last index, true positives, threshold) per distinct score, highest first: the last index of each tie block."""
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s_desc))[0], s.size - 1]
    return last, np.cumsum(y_desc)[last], s_desc[last]


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as sklearn's average_precision_score (step-wise, no interpolation)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    last, tp, _ = _operating_points(y, s)
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with decisions ``score >= threshold``; the first point is (0, 0) at +inf."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    last, tp, thresholds = _operating_points(y, s)
    fp = (last + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thr = np.r_[np.inf, thresholds]
    return fpr, tpr, thr


def pr_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct score, highest threshold first, starting at recall 0."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    last, tp, _ = _operating_points(y, s)
    precision = tp / (last + 1)
    recall = tp / max(int(y.sum()), 1)
    return np.r_[0.0, recall], np.r_[1.0, precision]


# ---------------------------------------------------------------------------- threshold metrics


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def confusion_counts(y_true: np.ndarray, decision: np.ndarray) -> dict[str, int]:
    y = np.asarray(y_true).astype(bool)
    d = np.asarray(decision).astype(bool)
    return {"tp": int((y & d).sum()), "fp": int((~y & d).sum()), "tn": int((~y & ~d).sum()), "fn": int((y & ~d).sum())}


def rates(y_true: np.ndarray, decision: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and balanced accuracy of a binary decision."""
    c = confusion_counts(y_true, decision)
    sens = _ratio(c["tp"], c["tp"] + c["fn"])
    spec = _ratio(c["tn"], c["tn"] + c["fp"])
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"]),
        "balanced_accuracy": (sens + spec) / 2.0,
    }


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """All headline metrics of a binary classifier: rank metrics on ``score``, the rest at ``score >= threshold``."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    out = {"auroc": auroc(y, s), "auprc": average_precision(y, s)}
    out.update(rates(y, s >= threshold))
    return {k: out[k] for k in METRIC_NAMES}


def multiclass_metrics(y_true: np.ndarray, prob: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Macro (headline) and one-vs-rest per-class metrics; the decision is argmax.

    Returns ``{<metric>: macro value, ..., "per_class": {class: {<metric>: value}}}``. The macro
    balanced accuracy is the mean per-class recall (sklearn's ``balanced_accuracy_score``).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    k = p.shape[1]
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    pred = p.argmax(axis=1)
    per_class: dict[str, dict[str, float]] = {}
    for c in range(k):
        yc = y == c
        r = rates(yc, pred == c)
        per_class[names[c]] = {
            "auroc": auroc(yc, p[:, c]),
            "auprc": average_precision(yc, p[:, c]),
            "sensitivity": r["sensitivity"],
            "specificity": r["specificity"],
            "ppv": r["ppv"],
            "npv": r["npv"],
            "support": int(yc.sum()),
        }
    out: dict[str, Any] = {}
    for m in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv"):
        out[m] = _nanmean([per_class[n][m] for n in names])
    out["balanced_accuracy"] = out["sensitivity"]
    out = {m: out[m] for m in METRIC_NAMES}
    out["accuracy"] = float((pred == y).mean()) if y.size else float("nan")
    out["per_class"] = per_class
    return out


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def confusion_matrix(y_true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(pred), minlength=k * k).reshape(k, k)


# ---------------------------------------------------------------------------- calibration metrics


def ece(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins.

    Binary (K == 2): calibration of the positive-class probability (column 1), the number a
    clinician reads. Multiclass: top-label confidence vs accuracy (Guo et al. 2017).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    conf, hit = _reliability_inputs(y, p)
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=conf, minlength=n_bins) - np.bincount(bins, weights=hit, minlength=n_bins))
    return float(gap.sum() / counts.sum())


def _reliability_inputs(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.shape[1] == 2:
        return p[:, 1], (y == 1).astype(np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def reliability_curve(
    y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (mean predicted, observed frequency, count); empty bins are nan."""
    conf, hit = _reliability_inputs(np.asarray(y_true).astype(int), np.asarray(prob, dtype=np.float64))
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bins, weights=conf, minlength=n_bins) / counts
        freq = np.bincount(bins, weights=hit, minlength=n_bins) / counts
    return mean_p, freq, counts


def brier(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Binary: mean squared error of the positive-class probability. Multiclass: mean sum over classes
    of the squared error against the one-hot label (Brier's original definition)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def nll(y_true: np.ndarray, prob: np.ndarray) -> float:
    y = np.asarray(y_true).astype(int)
    p = np.clip(np.asarray(prob, dtype=np.float64)[np.arange(y.size), y], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


# ---------------------------------------------------------------------------- thresholds


@dataclass
class ThresholdChoice:
    threshold: float
    policy: str
    target: float | None
    val_sensitivity: float
    val_specificity: float
    achieved: bool = True  # False when no threshold reaches the target on validation

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.threshold,
            "policy": self.policy,
            "target": self.target,
            "val_sensitivity": self.val_sensitivity,
            "val_specificity": self.val_specificity,
            "target_achieved": self.achieved,
        }


def choose_threshold(
    y_true: np.ndarray, score: np.ndarray, policy: str = "youden", target: float | None = None
) -> ThresholdChoice:
    """Pick the operating threshold on validation scores (decision: ``score >= threshold``).

    youden: maximise sensitivity + specificity - 1 (ties: the higher threshold, i.e. fewer positives).
    sensitivity: the highest threshold whose sensitivity >= target (best specificity at that floor).
    specificity: the lowest threshold whose specificity >= target (best sensitivity at that floor).
    The threshold is an observed validation score, so it is reproducible from evaluation.json.
    """
    y = np.asarray(y_true).astype(int)
    if y.min(initial=1) == y.max(initial=0):
        raise DataError(
            "choosing a threshold needs both classes in the validation split; give the split more studies "
            "(a larger split.fractions.val in the data spec) and rerun split and train"
        )
    fpr, tpr, thr = roc_points(y, score)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point: it predicts no positives at all
    spec = 1.0 - fpr
    achieved = True
    if policy == "youden":
        i = int(np.argmax(tpr - fpr))
    elif policy == "sensitivity":
        if target is None:
            raise DataError("threshold policy 'sensitivity' needs a target; set evaluation.target in the recipe")
        ok = np.nonzero(tpr >= target - 1e-12)[0]
        i = int(ok[0])  # thresholds descend, so the first qualifying one is the highest
    elif policy == "specificity":
        if target is None:
            raise DataError("threshold policy 'specificity' needs a target; set evaluation.target in the recipe")
        ok = np.nonzero(spec >= target - 1e-12)[0]
        if ok.size:
            i = int(ok[-1])
        else:
            i, achieved = 0, False  # even the strictest observed threshold misses the target
    else:
        raise DataError(
            f"unknown threshold policy {policy!r}: set evaluation.threshold to youden, sensitivity or specificity"
        )
    return ThresholdChoice(float(thr[i]), policy, target, float(tpr[i]), float(spec[i]), achieved)


# ---------------------------------------------------------------------------- bootstrap


@dataclass
class Interval:
    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | None]:
        return {
            "value": _finite_or_none(self.value),
            "ci_low": _finite_or_none(self.ci_low),
            "ci_high": _finite_or_none(self.ci_high),
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


@dataclass
class BootstrapResult:
    intervals: dict[str, Interval]
    n_resamples: int
    n_skipped: int  # resamples lacking a class; excluded from every interval
    n_patients: int
    seed: int
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "intervals": {k: v.as_dict() for k, v in self.intervals.items()},
            "n_resamples": self.n_resamples,
            "n_skipped": self.n_skipped,
            "n_patients": self.n_patients,
            "seed": self.seed,
            "unit": "patient",
            "method": "percentile",
            "level": 0.95,
        }


def _patient_codes(patients: Sequence[Any]) -> tuple[np.ndarray, int]:
    """(patient number per study, number of patients), numbered in order of first appearance."""
    _, first, inverse = np.unique(
        np.asarray(patients, dtype=object).astype(str), return_index=True, return_inverse=True
    )
    codes = np.argsort(np.argsort(first))[inverse]
    return codes, int(codes.max()) + 1 if codes.size else 0


def patient_resample_indices(
    patients: Sequence[Any], n_resamples: int, seed: int
) -> tuple[int, Callable[[], np.ndarray]]:
    """A generator of study-index arrays, each drawn by resampling patients with replacement.

    Patients are numbered in order of first appearance, not by sorted key: keys are pseudonyms, which depend on
    the workspace's secret key, and sorted codes drew other patients (and gave other CIs) in every workspace
    (demo test AUROC CI low 0.8495 in one workspace, 0.8498 in another, from bit-identical weights).
    """
    codes, n_pat = _patient_codes(patients)
    rng = np.random.default_rng(seed)
    studies = np.arange(codes.size)

    def draw() -> np.ndarray:
        # How often each patient was drawn becomes how often each of its studies appears.
        times = np.bincount(rng.integers(0, n_pat, n_pat), minlength=n_pat)
        return np.repeat(studies, times[codes])

    return n_pat, draw


def bootstrap(
    y_true: np.ndarray,
    prob: np.ndarray,
    patients: Sequence[Any],
    statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Patient-level percentile bootstrap of every value ``statistic(y, prob)`` returns.

    The point estimate is the statistic on the full data. A resample in which any class of
    ``prob``'s columns is missing from ``y`` is skipped and counted in ``n_skipped``.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    point = statistic(y, p)
    k = p.shape[1] if p.ndim == 2 else 2
    batch = getattr(statistic, "batch", None)
    n_pat, skipped, outs = _resample(
        y,
        k,
        patients,
        n_resamples,
        seed,
        lambda idx: statistic(y[idx], p[idx]),
        None if batch is None else lambda w: batch(y, p, w),
    )
    samples = {name: _flat(o[name] for o in outs) for name in point}
    alpha = (1.0 - level) / 2.0
    intervals = {}
    for name, v in point.items():
        arr = samples[name]
        arr = arr[np.isfinite(arr)]
        if arr.size == 0 or not np.isfinite(v):
            lo = hi = float("nan")
        else:
            lo, hi = (float(x) for x in np.quantile(arr, [alpha, 1.0 - alpha]))
        intervals[name] = Interval(float(v), lo, hi)
    return BootstrapResult(intervals, n_resamples, skipped, n_pat, seed, samples)


def paired_bootstrap_diff(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    patients: Sequence[Any],
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """metric(a) - metric(b) on the same studies, with a paired patient-level bootstrap CI.

    Both arms see the identical resample each time, so study difficulty cancels and the interval
    is much tighter than comparing two independent CIs. Also reports the one-sided bootstrap
    fraction of resamples in which a is not better (diff <= 0).
    """
    y = np.asarray(y_true).astype(int)
    pa, pb = np.asarray(prob_a, dtype=np.float64), np.asarray(prob_b, dtype=np.float64)
    k = pa.shape[1]
    ma, mb = metric(y, pa), metric(y, pb)
    batch = getattr(metric, "batch", None)
    n_pat, skipped, outs = _resample(
        y,
        k,
        patients,
        n_resamples,
        seed,
        lambda idx: metric(y[idx], pa[idx]) - metric(y[idx], pb[idx]),
        None if batch is None else lambda w: batch(y, pa, w) - batch(y, pb, w),
    )
    d = _flat(outs)
    d = d[np.isfinite(d)]
    alpha = (1.0 - level) / 2.0
    lo, hi = (float(x) for x in np.quantile(d, [alpha, 1.0 - alpha])) if d.size else (float("nan"),) * 2
    return {
        "a": ma,
        "b": mb,
        "diff": Interval(ma - mb, lo, hi),
        "p_not_better": float(np.mean(d <= 0)) if d.size else float("nan"),
        "n_resamples": n_resamples,
        "n_skipped": skipped,
        "n_patients": n_pat,
        "seed": seed,
    }


# ---------------------------------------------------------------------------- batched bootstrap
#
# A patient resample is the original studies with integer multiplicities (how often each study's patient was
# drawn), so every metric above is a weighted sum over the ORIGINAL studies: sort once, then array operations on
# a (resamples, studies) weight chunk instead of argsort/unique/bincount per resample (compute_evaluation with
# 78 val / 156 test studies and a control arm: 0.33-0.45 -> 0.055 ms per resample, 1000 resamples). Counts
# are integers held exactly in float64, so AUROC (a half-integer U over an integer product), the confusion
# rates and the skip decisions are bit-identical to the per-resample path; AUPRC, ECE and Brier only sum the
# same terms in another order (differences <= 2e-16, tests/stats/test_bootstrap_fast.py).

_CHUNK_CELLS = 2_000_000  # resamples x studies per chunk: ~16 MB of float64 weights


def _patient_weights(patients: Sequence[Any], n_resamples: int, seed: int) -> tuple[int, Callable[[int], np.ndarray]]:
    """Like :func:`patient_resample_indices`, but each draw is a study-weight row; same RNG calls, same order."""
    codes, n_pat = _patient_codes(patients)
    rng = np.random.default_rng(seed)
    left = [n_resamples]

    def draw(n: int) -> np.ndarray:
        n = min(n, left[0])
        left[0] -= n
        # One (n, n_pat) call consumes the generator exactly as n calls of n_pat draws (bounded integers are
        # drawn one after another; tests/stats/test_bootstrap_fast.py compares with the per-resample loop).
        picks = rng.integers(0, n_pat, (n, n_pat)) + n_pat * np.arange(n)[:, None]
        times = np.bincount(picks.ravel(), minlength=n * n_pat).reshape(n, n_pat).astype(np.float64)
        return times[:, codes]

    return n_pat, draw


def _resample(
    y: np.ndarray,
    k: int,
    patients: Sequence[Any],
    n_resamples: int,
    seed: int,
    one: Callable[[np.ndarray], Any],
    rows: Callable[[np.ndarray], Any] | None,
) -> tuple[int, int, list[Any]]:
    """(patients, skipped resamples, outputs) of the patient bootstrap: ``rows(w)`` on chunks of study-weight rows
    when the statistic has a batched form, else ``one(idx)`` on each resample's study indices (the reference the
    batched forms are tested against); a resample lacking any of the k classes is skipped either way."""
    if rows is not None and y.size:
        n_pat, weights = _patient_weights(patients, n_resamples, seed)
        keep, outs = _batched(y, k, weights, rows)
        return n_pat, int((~keep).sum()), outs
    n_pat, draw = patient_resample_indices(patients, n_resamples, seed)
    outs, skipped = [], 0
    for _ in range(n_resamples):
        idx = draw()
        if np.unique(y[idx]).size < k:
            skipped += 1
            continue
        outs.append(one(idx))
    return n_pat, skipped, outs


def _flat(outs: Iterable[Any]) -> np.ndarray:
    """float64 values of :func:`_resample`'s outputs, in resample order (a chunk's array or one resample's value)."""
    return np.concatenate([np.empty(0), *(np.atleast_1d(o) for o in outs)])


def _batched(
    y: np.ndarray, k: int, weights: Callable[[int], np.ndarray], compute: Callable[[np.ndarray], Any]
) -> tuple[np.ndarray, list[Any]]:
    """Run ``compute`` on the kept rows of every weight chunk; a row lacking any of k classes is skipped."""
    onehot = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)
    chunk = max(1, _CHUNK_CELLS // max(y.size, 1))
    keeps, out = [], []
    while True:
        w = weights(chunk)
        if w.shape[0] == 0:
            break
        keep = (_wsum(w, onehot) > 0).sum(axis=1) >= k
        keeps.append(keep)
        if keep.any():
            out.append(compute(w[keep]))
    return (np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)), out


def _wsum(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Weighted sums per resample row. einsum, not ``@``: BLAS threads cost more than these tiny products on a
    loaded 2-core box (0.13 vs 0.04 ms per resample, 156 test studies), and einsum's fixed summation order
    keeps the results independent of the chunk size and the BLAS build."""
    return np.einsum("rn,n...->r...", w, x)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _rank_metrics_w(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, with_ap: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(AUROC, average precision or None) per weight row, as :func:`auroc` / :func:`average_precision`."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    starts = np.r_[0, np.nonzero(np.diff(s[order]))[0] + 1]  # ascending tie blocks
    ws = w[:, order]
    pb = np.add.reduceat(ws * y[order], starts, axis=1)  # positive weight per tie block, exact integers
    nb = np.add.reduceat(ws, starts, axis=1) - pb
    n_pos, n_neg = pb.sum(axis=1), nb.sum(axis=1)
    # Mann-Whitney U with ties counted one half: each positive beats the negatives below and half its own block.
    u = (pb * (np.cumsum(nb, axis=1) - nb + 0.5 * nb)).sum(axis=1)
    auc = _safe_div(u, n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    if not with_ap:
        return auc, None
    tp = np.cumsum(pb[:, ::-1], axis=1)  # highest score first, as _operating_points
    tot = np.cumsum((pb + nb)[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tot > 0, tp / np.where(tot > 0, tot, 1.0), 0.0)  # empty blocks add 0 recall
        recall = tp / n_pos[:, None]
    step = np.diff(np.concatenate([np.zeros((w.shape[0], 1)), recall], axis=1), axis=1)
    ap = np.where(n_pos > 0, np.sum(np.where(n_pos[:, None] > 0, step, 0.0) * precision, axis=1), np.nan)
    return auc, ap


def _rates_w(y: np.ndarray, d: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    y, d = np.asarray(y).astype(bool), np.asarray(d).astype(bool)
    tp, fp = _wsum(w, (y & d).astype(np.float64)), _wsum(w, (~y & d).astype(np.float64))
    tn, fn = _wsum(w, (~y & ~d).astype(np.float64)), _wsum(w, (y & ~d).astype(np.float64))
    sens, spec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "balanced_accuracy": (sens + spec) / 2.0,
    }


def _ece_brier_w(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """(ECE, Brier) per weight row, as :func:`ece` / :func:`brier` on the resample."""
    conf, hit = _reliability_inputs(y, p)
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    onehot = np.zeros((y.size, n_bins))
    onehot[np.arange(y.size), bins] = 1.0
    counts = _wsum(w, onehot)
    gap = np.abs(_wsum(w, onehot * conf[:, None]) - _wsum(w, onehot * hit[:, None]))
    binary = p.shape[1] == 2
    err = (p[:, 1] - (y == 1)) ** 2 if binary else np.sum((p - np.eye(p.shape[1])[y]) ** 2, axis=1)
    n = w.sum(axis=1)
    return gap.sum(axis=1) / counts.sum(axis=1), _wsum(w, err) / n


def _nanmean_rows(cols: Sequence[np.ndarray]) -> np.ndarray:
    arr = np.stack(cols, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(arr)
        total = np.where(ok, arr, 0.0).sum(axis=1)
        return np.where(ok.any(axis=1), total / ok.sum(axis=1), np.nan)


def _binary_headline_w(yb: np.ndarray, p2: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    auc, ap = _rank_metrics_w(yb, p2[:, 1], w)
    out = {"auroc": auc, "auprc": ap, **_rates_w(yb, p2[:, 1] >= threshold, w)}
    e, b = _ece_brier_w(yb, p2, w)
    return {k: out[k] for k in METRIC_NAMES} | {"ece": e, "brier": b}


def _multiclass_headline_w(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    pred = p.argmax(axis=1)
    per: dict[str, list[np.ndarray]] = {m: [] for m in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")}
    for c in range(p.shape[1]):
        auc, ap = _rank_metrics_w(y == c, p[:, c], w)
        r = _rates_w(y == c, pred == c, w)
        per["auroc"].append(auc)
        per["auprc"].append(ap)
        for m in ("sensitivity", "specificity", "ppv", "npv"):
            per[m].append(r[m])
    out = {m: _nanmean_rows(v) for m, v in per.items()}
    out["balanced_accuracy"] = out["sensitivity"]
    e, b = _ece_brier_w(y, p, w)
    return {m: out[m] for m in METRIC_NAMES} | {"ece": e, "brier": b}


def _macro_auroc_w(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    if p.shape[1] == 2:
        return _rank_metrics_w(y == 1, p[:, 1], w, with_ap=False)[0]
    return _nanmean_rows([_rank_metrics_w(y == c, p[:, c], w, with_ap=False)[0] for c in range(p.shape[1])])


# ---------------------------------------------------------------------------- task-level helpers


def headline_statistic(
    threshold: float | None, positive_index: int = 1
) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """The statistic bootstrapped for the report: headline metrics plus ECE and Brier.

    Binary (threshold given): scores are ``prob[:, positive_index]`` and labels are 1 for the
    positive class. Multiclass (threshold None): macro one-vs-rest metrics at argmax.
    """

    def stat(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        if threshold is None:
            m = multiclass_metrics(y, p)
            out = {k: m[k] for k in METRIC_NAMES}
            return out | {"ece": ece(y, p), "brier": brier(y, p)}
        yb = (y == positive_index).astype(int)
        p2 = binary_prob(p, positive_index)
        return binary_metrics(yb, p2[:, 1], threshold) | {"ece": ece(yb, p2), "brier": brier(yb, p2)}

    def batch(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
        """``stat`` on every resample at once; ``w`` holds one row of study multiplicities per resample."""
        if threshold is None:
            return _multiclass_headline_w(y, p, w)
        return _binary_headline_w((y == positive_index).astype(int), binary_prob(p, positive_index), threshold, w)

    stat.batch = batch  # type: ignore[attr-defined]
    return stat


def auroc_statistic(pos: int | None) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """{"auroc": AUROC of class ``pos``}, or macro one-vs-rest for ``pos=None``, as a batched bootstrap statistic."""

    def stat(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        if pos is None:
            return {"auroc": macro_auroc(y, p)}
        return {"auroc": auroc(y == pos, p[:, pos])}

    def batch(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
        if pos is None:
            return {"auroc": _macro_auroc_w(y, p, w)}
        return {"auroc": _rank_metrics_w(y == pos, p[:, pos], w, with_ap=False)[0]}

    stat.batch = batch  # type: ignore[attr-defined]
    return stat


def binary_prob(prob: np.ndarray, positive_index: int) -> np.ndarray:
    """(N, 2) [negative, positive] probabilities for a 2-class ``prob`` whose positive column is given."""
    pos = np.asarray(prob, dtype=np.float64)[:, positive_index]
    return np.stack([1.0 - pos, pos], axis=1)


def macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC for binary (column 1 positive after :func:`binary_prob`) or macro one-vs-rest for K > 2."""
    if p.shape[1] == 2:
        return auroc(y == 1, p[:, 1])
    return _nanmean([auroc(y == c, p[:, c]) for c in range(p.shape[1])])


macro_auroc.batch = _macro_auroc_w  # type: ignore[attr-defined]

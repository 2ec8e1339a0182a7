"""Metric functions against scikit-learn and hand-computed cases; the patient-level bootstrap; thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from medxfer.core.errors import DataError
from medxfer.stats import metrics as M
from sklearn import metrics as skm


def _data(n: int = 200, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_metrics_match_sklearn(seed: int, ties: bool) -> None:
    y, s = _data(seed=seed, ties=ties)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_rank_metrics_hand_computed() -> None:
    # Pairs (pos, neg): (0.8,0.3)>, (0.8,0.4)>, (0.35,0.3)>, (0.35,0.4)< -> 3/4.
    y = np.array([1, 0, 1, 0])
    s = np.array([0.8, 0.3, 0.35, 0.4])
    assert M.auroc(y, s) == pytest.approx(0.75)
    # Ranked: 0.8(+) P=1 R=.5; 0.4(-); 0.35(+) P=2/3 R=1 -> AP = .5*1 + .5*2/3.
    assert M.average_precision(y, s) == pytest.approx(0.5 + 1 / 3)
    # A tie between a positive and a negative counts one half.
    assert M.auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(M.auroc([1, 1], [0.2, 0.3]))


def test_threshold_metrics_hand_computed() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.1, 0.3, 0.4])
    m = M.binary_metrics(y, s, threshold=0.5)  # tp=2 fn=1 fp=1 tn=4
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, s >= 0.5))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    # Nothing predicted positive: PPV is undefined (nan), not 0.
    assert np.isnan(M.binary_metrics(y, s, threshold=0.99)["ppv"])


def test_multiclass_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = M.multiclass_metrics(y, p, ["a", "b", "c"])
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    onehot = np.eye(3)[y]
    assert m["auprc"] == pytest.approx(skm.average_precision_score(onehot, p, average="macro"), abs=1e-12)
    pred = p.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    recalls = skm.recall_score(y, pred, average=None)
    for i, c in enumerate("abc"):
        assert m["per_class"][c]["sensitivity"] == pytest.approx(recalls[i])
        spec = ((pred != i) & (y != i)).sum() / (y != i).sum()
        assert m["per_class"][c]["specificity"] == pytest.approx(spec)
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    cm = M.confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred))


def test_calibration_metrics() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.1, 0.9]])
    assert M.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p[:, 1]))
    # Perfect calibration in each bin: ECE 0. All at 0.5 with half positive: ECE 0.
    assert M.ece(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)
    # Always 0.9 but only 50 % positive: ECE 0.4.
    assert M.ece(np.array([0, 1]), np.array([[0.1, 0.9], [0.1, 0.9]])) == pytest.approx(0.4)
    assert M.nll(y, p) == pytest.approx(skm.log_loss(y, p[:, 1]))


def test_roc_points_match_sklearn() -> None:
    y, s = _data(seed=5, ties=True)
    fpr, tpr, thr = M.roc_points(y, s)
    sf, st, sth = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sf)
    np.testing.assert_allclose(tpr, st)
    np.testing.assert_allclose(thr[1:], sth[1:])


# ---------------------------------------------------------------------------- thresholds


def test_youden_threshold_separates_perfectly() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = M.choose_threshold(y, s)
    assert t.threshold == pytest.approx(0.6)
    assert (t.val_sensitivity, t.val_specificity) == (1.0, 1.0)


def test_youden_is_the_max_of_j() -> None:
    y, s = _data(seed=7)
    t = M.choose_threshold(y, s, "youden")
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert t.val_sensitivity + t.val_specificity - 1 == pytest.approx((tpr - fpr).max())


def test_target_sensitivity_and_specificity() -> None:
    y, s = _data(n=400, seed=8)
    t = M.choose_threshold(y, s, "sensitivity", 0.9)
    sens = ((s >= t.threshold) & (y == 1)).sum() / (y == 1).sum()
    assert sens >= 0.9 and t.val_sensitivity == pytest.approx(sens)
    # The next higher observed score would miss the target: this is the best specificity at the floor.
    higher = np.unique(s[s > t.threshold]).min()
    assert ((s >= higher) & (y == 1)).sum() / (y == 1).sum() < 0.9

    t = M.choose_threshold(y, s, "specificity", 0.95)
    spec = ((s < t.threshold) & (y == 0)).sum() / (y == 0).sum()
    assert spec >= 0.95 and t.val_specificity == pytest.approx(spec)
    lower = np.unique(s[s < t.threshold]).max()
    assert ((s < lower) & (y == 0)).sum() / (y == 0).sum() < 0.95


def test_threshold_needs_both_classes() -> None:
    with pytest.raises(DataError, match="both classes"):
        M.choose_threshold(np.ones(4), np.linspace(0, 1, 4))
    with pytest.raises(DataError, match="evaluation.target"):
        M.choose_threshold(np.arange(4) % 2, np.linspace(0, 1, 4), "sensitivity")
    with pytest.raises(DataError, match="evaluation.threshold"):
        M.choose_threshold(np.arange(4) % 2, np.linspace(0, 1, 4), "f1")


# ---------------------------------------------------------------------------- bootstrap


def _auroc_stat(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"auroc": M.auroc(y == 1, p[:, 1])}


def _prob(s: np.ndarray) -> np.ndarray:
    return np.stack([1 - s, s], axis=1)


def test_bootstrap_resamples_patients_not_studies() -> None:
    """One patient with many identical studies: resampling studies treats them as independent
    evidence and gives a narrow CI; moving them as a unit (patients) gives a much wider one."""
    rng = np.random.default_rng(0)
    n_other = 40
    y = np.r_[np.zeros(30, int), rng.integers(0, 2, n_other)]
    # The heavy patient's 30 negative studies score high (hard negatives); its presence decides the AUROC.
    s = np.r_[np.full(30, 0.9), rng.random(n_other) * 0.5 + 0.5 * y[30:]]
    patients = np.r_[np.full(30, "pt-heavy"), [f"pt-{i}" for i in range(n_other)]]
    by_patient = M.bootstrap(y, _prob(s), patients, _auroc_stat, n_resamples=400, seed=1)
    by_study = M.bootstrap(y, _prob(s), np.arange(y.size).astype(str), _auroc_stat, n_resamples=400, seed=1)
    wp = by_patient.intervals["auroc"].ci_high - by_patient.intervals["auroc"].ci_low
    ws = by_study.intervals["auroc"].ci_high - by_study.intervals["auroc"].ci_low
    assert by_patient.n_patients == n_other + 1 and by_study.n_patients == y.size
    assert wp > 2 * ws


def test_patient_draw_keeps_studies_together() -> None:
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    _, draw = M.patient_resample_indices(patients, 50, seed=0)
    for _ in range(50):
        idx = draw()
        counts = np.bincount(idx, minlength=6)
        # All studies of a patient appear equally often.
        assert counts[0] == counts[1] == counts[2] and counts[4] == counts[5]
        assert counts[[0, 3, 4]].sum() == 3  # three patients drawn


def test_bootstrap_ci_contains_point_and_is_seeded() -> None:
    y, s = _data(n=150, seed=2)
    p = _prob(1 / (1 + np.exp(-s)))
    patients = np.arange(y.size) // 2  # two studies per patient
    stat = M.headline_statistic(threshold=0.5, positive_index=1)
    a = M.bootstrap(y, p, patients, stat, n_resamples=200, seed=4)
    b = M.bootstrap(y, p, patients, stat, n_resamples=200, seed=4)
    c = M.bootstrap(y, p, patients, stat, n_resamples=200, seed=5)
    assert set(a.intervals) == set(M.METRIC_NAMES) | {"ece", "brier"}
    for name, iv in a.intervals.items():
        assert iv.ci_low <= iv.value <= iv.ci_high, name
        assert b.intervals[name] == iv
    assert c.intervals["auroc"] != a.intervals["auroc"]
    assert a.intervals["auroc"].value == pytest.approx(skm.roc_auc_score(y, s))


def test_bootstrap_does_not_depend_on_how_patients_are_named() -> None:
    # Patient keys are pseudonyms: another workspace key renames every patient (and reorders them when sorted).
    y, s = _data(n=120, seed=3)
    p = _prob(1 / (1 + np.exp(-s)))
    patients = np.arange(y.size) // 3
    import hashlib

    renamed = np.array([hashlib.sha256(f"other-key-{q}".encode()).hexdigest()[:20] for q in patients])
    assert sorted(set(renamed)) != [renamed[i] for i in sorted(np.unique(patients, return_index=True)[1])]
    stat = M.headline_statistic(threshold=0.5, positive_index=1)
    a = M.bootstrap(y, p, patients.astype(str), stat, n_resamples=200, seed=0)
    b = M.bootstrap(y, p, renamed, stat, n_resamples=200, seed=0)
    assert a.intervals == b.intervals


def test_bootstrap_skips_resamples_lacking_a_class() -> None:
    # 2 patients positive out of 8: many resamples draw no positive patient.
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    s = np.linspace(1, 0, 8)
    res = M.bootstrap(y, _prob(s), [str(i) for i in range(8)], _auroc_stat, n_resamples=300, seed=0)
    expected_share = (6 / 8) ** 8  # chance no positive patient is drawn
    assert res.n_skipped == pytest.approx(300 * expected_share, rel=0.6)
    assert res.samples["auroc"].size == 300 - res.n_skipped


def test_paired_bootstrap_diff() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 200)
    good = _prob(1 / (1 + np.exp(-(rng.normal(size=200) + 2.0 * y))))
    weak = _prob(1 / (1 + np.exp(-(rng.normal(size=200) + 0.5 * y))))
    patients = np.arange(200) // 4
    res = M.paired_bootstrap_diff(y, good, weak, patients, M.macro_auroc, n_resamples=300, seed=0)
    d = res["diff"]
    assert d.value == pytest.approx(skm.roc_auc_score(y, good[:, 1]) - skm.roc_auc_score(y, weak[:, 1]))
    assert 0 < d.ci_low <= d.value <= d.ci_high
    assert res["p_not_better"] < 0.05
    # Identical arms: the difference is exactly 0 in every resample.
    same = M.paired_bootstrap_diff(y, good, good, patients, M.macro_auroc, n_resamples=50, seed=0)
    assert same["diff"].value == same["diff"].ci_low == same["diff"].ci_high == 0


def test_interval_json_uses_null_for_undefined() -> None:
    assert M.Interval(float("nan"), 0.1, float("nan")).as_dict() == {"value": None, "ci_low": 0.1, "ci_high": None}

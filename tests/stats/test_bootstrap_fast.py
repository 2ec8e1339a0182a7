"""The batched bootstrap (one weight matrix for all resamples) gives the per-resample loop's numbers.

The reference is the per-resample loop ``bootstrap`` / ``paired_bootstrap_diff`` still run for a statistic
without a ``batch`` (the loop they ran before the batched path, checked identical to it when it came): it
indexes each resample's studies and calls the scalar metrics, so it pins the same seed, draw order, skips,
metric values and CI quantiles, and the two paths cannot drift apart unnoticed.
"""

from __future__ import annotations

import numpy as np
import pytest
from medxfer.stats import metrics as M


def _per_resample(statistic):
    """``statistic`` without its ``batch``: the bootstraps then take their per-resample loop."""
    return lambda y, p: statistic(y, p)


def _old_bootstrap(y_true, prob, patients, statistic, n_resamples=1000, seed=0, level=0.95):
    return M.bootstrap(y_true, prob, patients, _per_resample(statistic), n_resamples, seed, level)


def _old_paired(y_true, prob_a, prob_b, patients, metric, n_resamples=1000, seed=0, level=0.95):
    return M.paired_bootstrap_diff(y_true, prob_a, prob_b, patients, _per_resample(metric), n_resamples, seed, level)


def _data(n: int, k: int, seed: int, decimals: int | None = 2):
    """Probabilities rounded to `decimals` (tie blocks), patients with 1-4 studies in shuffled order."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    if n < 20:  # one study per minority class: many resamples lack a class and are skipped
        y[:] = 0
        y[n - k + 1 :] = np.arange(1, k)
    z = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    if decimals is not None:
        p = np.round(p, decimals)
        p = p / p.sum(axis=1, keepdims=True)
    patients = np.array([f"pt-{i}" for i in rng.permutation(np.repeat(np.arange(n), rng.integers(1, 5, n)))[:n]])
    return y, p, patients


def _close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-12)


def _same_result(new: M.BootstrapResult, old: M.BootstrapResult):
    assert (new.n_resamples, new.n_skipped, new.n_patients, new.seed) == (
        old.n_resamples,
        old.n_skipped,
        old.n_patients,
        old.seed,
    )
    assert new.intervals.keys() == old.intervals.keys()
    for name in old.intervals:
        _close(new.samples[name], old.samples[name])
        a, b = new.intervals[name], old.intervals[name]
        _close([a.value, a.ci_low, a.ci_high], [b.value, b.ci_low, b.ci_high])


CASES = [
    # (n studies, classes, data seed, rounding, threshold): ties, continuous scores, tiny sets with skipped resamples
    (156, 2, 0, 2, 0.5),
    (156, 2, 1, None, 0.3),
    (12, 2, 2, 1, 0.9),  # high threshold: resamples with no predicted positive (PPV nan); some lack a class
    (90, 3, 3, 2, None),
    (9, 3, 4, 1, None),
]


@pytest.mark.parametrize(("n", "k", "seed", "dec", "thr"), CASES)
def test_headline_bootstrap_matches_loop(n, k, seed, dec, thr):
    y, p, pat = _data(n, k, seed, dec)
    stat = M.headline_statistic(thr, 1)
    assert hasattr(stat, "batch")
    new = M.bootstrap(y, p, pat, stat, n_resamples=300, seed=seed + 7)
    old = _old_bootstrap(y, p, pat, stat, n_resamples=300, seed=seed + 7)
    _same_result(new, old)
    if n < 20:
        assert old.n_skipped > 0  # the skip path is exercised


@pytest.mark.parametrize(("n", "k", "seed", "dec", "thr"), CASES)
def test_auroc_statistic_bit_identical(n, k, seed, dec, thr):
    y, p, pat = _data(n, k, seed, dec)
    pos = 1 if k == 2 else None
    stat = M.auroc_statistic(pos)
    new = M.bootstrap(y, p, pat, stat, n_resamples=300, seed=seed)
    old = _old_bootstrap(y, p, pat, stat, n_resamples=300, seed=seed)
    _same_result(new, old)
    if k == 2:  # binary AUROC is a half-integer over an integer: exactly the loop's float
        assert np.array_equal(new.samples["auroc"], old.samples["auroc"])
        assert new.as_dict() == old.as_dict()


@pytest.mark.parametrize(("n", "k", "seed", "dec", "thr"), CASES)
def test_paired_diff_matches_loop(n, k, seed, dec, thr):
    y, pa, pat = _data(n, k, seed, dec)
    _, pb, _ = _data(n, k, seed + 100, dec)
    new = M.paired_bootstrap_diff(y, pa, pb, pat, M.macro_auroc, n_resamples=300, seed=seed)
    old = _old_paired(y, pa, pb, pat, M.macro_auroc, n_resamples=300, seed=seed)
    assert {k_: v for k_, v in new.items() if k_ != "diff"} == pytest.approx(
        {k_: v for k_, v in old.items() if k_ != "diff"}, abs=1e-12, nan_ok=True
    )
    _close(
        [new["diff"].value, new["diff"].ci_low, new["diff"].ci_high],
        [old["diff"].value, old["diff"].ci_low, old["diff"].ci_high],
    )
    if k == 2:
        assert new["diff"] == old["diff"] and new["p_not_better"] == old["p_not_better"]


def test_chunks_do_not_change_draws(monkeypatch):
    """Chunking the weight matrix (large splits) keeps the RNG stream and the resample order."""
    y, p, pat = _data(60, 2, 5, 2)
    stat = M.headline_statistic(0.5, 1)
    whole = M.bootstrap(y, p, pat, stat, n_resamples=100, seed=1)
    monkeypatch.setattr(M, "_CHUNK_CELLS", 60 * 7)  # 7 resamples per chunk, the last one partial
    chunked = M.bootstrap(y, p, pat, stat, n_resamples=100, seed=1)
    for name in whole.samples:
        assert np.array_equal(whole.samples[name], chunked.samples[name], equal_nan=True)


@pytest.mark.parametrize("n_resamples", [0, 1, 40])
def test_degenerate_inputs_match_loop(n_resamples):
    """No resamples, or every resample skipped (a single patient holds the only positive and 2 negatives)."""
    y, p = np.array([0, 0, 1, 0, 0]), _data(5, 2, 0, 2)[1]
    pat = np.array(["a", "b", "c", "c", "d"])
    stat = M.headline_statistic(0.5, 1)
    _same_result(M.bootstrap(y, p, pat, stat, n_resamples), _old_bootstrap(y, p, pat, stat, n_resamples))
    one = np.array(["a"] * 5)  # one patient: every resample is the full set
    _same_result(M.bootstrap(y, p, one, stat, n_resamples), _old_bootstrap(y, p, one, stat, n_resamples))
    new = M.paired_bootstrap_diff(y, p, p[::-1], pat, M.macro_auroc, n_resamples)
    old = _old_paired(y, p, p[::-1], pat, M.macro_auroc, n_resamples)
    assert new.pop("diff").as_dict() == old.pop("diff").as_dict()
    assert new == pytest.approx(old, nan_ok=True)

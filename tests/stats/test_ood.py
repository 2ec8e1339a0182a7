"""OOD statistics alone (numpy): Ledoit-Wolf against sklearn, the score, cross-fitted calibration, storage."""

from __future__ import annotations

import numpy as np
import pytest
from medxfer.stats import ood


def _features(n: int, dim: int = 64, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Low-rank-plus-noise features, as pooled CNN features are: 6 strong directions, weak isotropic rest."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(6, dim))
    return rng.normal(size=(n, 6)) * 3.0 @ basis + rng.normal(scale=0.5, size=(n, dim)) + shift


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import ledoit_wolf

    for n, p in ((10, 30), (200, 8), (40, 40)):
        x = np.random.default_rng(n).normal(size=(n, p)) * np.linspace(0.2, 3.0, p)
        cov, shrink = ood.ledoit_wolf(x)
        ref_cov, ref_shrink = ledoit_wolf(x)
        assert shrink == pytest.approx(ref_shrink, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_score_separates_shifted_and_off_subspace_inputs():
    val = _features(80)
    stats, _ = ood.calibrate(val)
    new = stats.score(_features(500, seed=1))
    shifted = stats.score(_features(50, seed=2, shift=1.5))
    # Off the validation subspace only (same mean, same top directions): the residual term must see it.
    off = _features(50, seed=3) + np.random.default_rng(4).normal(scale=2.0, size=(50, 64))
    assert (stats.flag(shifted)).mean() == 1.0
    assert (stats.flag(stats.score(off))).mean() > 0.9
    assert np.median(new) < stats.threshold
    assert stats.score(np.full((1, 64), np.nan))[0] == np.inf


def test_cross_fitted_threshold_is_honest_on_new_studies():
    """99th percentile of cross-fitted validation scores: new in-distribution studies flagged at about 1%.

    An in-sample threshold (statistics and percentile from the same 80 points) flags far more; measured here.
    """
    val = _features(80)
    stats, cv = ood.calibrate(val)
    new = stats.score(_features(4000, seed=7))
    honest = ood.flag_rate(new, stats.threshold)
    in_sample = ood.flag_rate(new, float(np.percentile(stats.score(val), 99)))
    assert honest is not None and in_sample is not None
    assert honest < 0.06, honest
    assert in_sample > 3 * honest, (in_sample, honest)
    assert ood.flag_rate(cv, stats.threshold) <= 0.0125 + 1e-9


def test_round_trip_and_refusals():
    stats, _ = ood.calibrate(_features(30, dim=16))
    back = ood.OODStats.from_arrays(stats.to_arrays(), stats.metadata())
    x = _features(5, dim=16, seed=5)
    np.testing.assert_array_equal(back.score(x), stats.score(x))
    assert back.threshold == stats.threshold and back.n_components == stats.n_components <= 15
    with pytest.raises(ood.OODFitError):
        ood.calibrate(_features(ood.MIN_FIT - 1))
    with pytest.raises(ood.OODFitError):
        ood.fit(np.ones((10, 4)))
    with pytest.raises(ValueError, match="need"):
        stats.score(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="format"):
        ood.OODStats.from_arrays(stats.to_arrays(), {**stats.metadata(), "format": "other/9"})

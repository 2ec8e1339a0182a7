"""Temperature scaling lowers NLL and ECE on deliberately over-confident logits and keeps the ranking."""

from __future__ import annotations

import numpy as np
import pytest
from medxfer.stats import metrics as M
from medxfer.stats.calibration import fit_temperature, softmax


def _overconfident(n: int, seed: int, k: int = 2, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits drawn from a calibrated model, then multiplied by `scale` (true temperature = scale)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    calibrated = rng.normal(size=(n, k)) + 1.0 * np.eye(k)[y]
    return calibrated * scale, y


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_reduces_nll_and_ece(k: int) -> None:
    val_z, val_y = _overconfident(2000, seed=0, k=k)
    test_z, test_y = _overconfident(2000, seed=1, k=k)
    fit = fit_temperature(val_z, val_y)
    assert fit.temperature == pytest.approx(4.0, rel=0.15)
    assert fit.nll_after < fit.nll_before
    before, after = softmax(test_z), softmax(test_z, fit.temperature)
    assert M.nll(test_y, after) < M.nll(test_y, before)
    assert M.ece(test_y, after) < 0.5 * M.ece(test_y, before)
    assert M.brier(test_y, after) < M.brier(test_y, before)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))


def test_temperature_gradient_matches_finite_difference() -> None:
    from medxfer.stats.calibration import _nll_and_grad

    z, y = _overconfident(300, seed=2, k=3)
    u, h = np.array([0.3]), 1e-6
    _, g = _nll_and_grad(u, z, y)
    fd = (_nll_and_grad(u + h, z, y)[0] - _nll_and_grad(u - h, z, y)[0]) / (2 * h)
    assert g[0] == pytest.approx(fd, rel=1e-5)


def test_single_logit_column_is_sigmoid() -> None:
    z = np.array([[0.0], [2.0]])
    p = softmax(z)
    assert p[1, 1] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert fit_temperature(z, np.array([0, 1])).temperature > 0


# --------------------------------------------------------------------------- choosing among methods


def _shifted(n: int, seed: int, shift: float = 1.5, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits of a calibrated model, scaled by `scale` and shifted toward class 1 by `shift`: what focal
    loss with alpha and a prior-bias init leaves. One temperature cannot remove the shift."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    margin = rng.normal(size=n) + np.where(y == 1, 1.0, -1.0)
    z = np.stack([np.zeros(n), margin * scale + shift], axis=1)
    return z, y


def test_temperature_plus_bias_wins_on_shifted_logits_and_fixes_test_ece() -> None:
    from medxfer.stats.calibration import calibrated_softmax, debiased_ece, fit_calibration

    val_z, val_y = _shifted(300, seed=0)
    test_z, test_y = _shifted(2000, seed=1)
    fit = fit_calibration(val_z, val_y)
    assert fit.method == "temperature+bias" and fit.cv_nll["temperature+bias"] < fit.cv_nll["temperature"]
    t_only = fit_temperature(val_z, val_y).temperature
    e_t = M.ece(test_y, softmax(test_z, t_only))
    e_tb = M.ece(test_y, fit.probs(test_z))
    assert e_tb < 0.5 * e_t and e_tb < 0.05, (e_t, e_tb)
    assert fit.bias[0] == 0.0 and fit.bias[1] < 0  # the fitted bias undoes the +1.5 shift (in units of 1/T)
    # Binary: the calibrated score is monotone in the logit, so the ranking (AUROC) is unchanged.
    assert M.auroc(test_y == 1, fit.probs(test_z)[:, 1]) == pytest.approx(M.auroc(test_y == 1, test_z[:, 1]))
    np.testing.assert_allclose(calibrated_softmax(test_z, fit.temperature, np.array(fit.bias)), fit.probs(test_z))
    assert debiased_ece(test_y, fit.probs(test_z)) < debiased_ece(test_y, softmax(test_z, t_only))


def test_a_well_calibrated_model_keeps_the_simplest_method_and_tiny_sets_fall_back() -> None:
    from medxfer.stats.calibration import fit_calibration

    z, y = _overconfident(400, seed=3, scale=1.0)  # already calibrated: no method should earn its parameter
    assert fit_calibration(z, y).method == "temperature"
    tiny = fit_calibration(z[:5], np.array([0, 1, 0, 0, 0]))
    assert tiny.method == "temperature" and tiny.folds == 0 and "too few" in tiny.reason


def test_debiased_ece_is_near_zero_for_a_calibrated_model_where_the_plugin_ece_is_not() -> None:
    from medxfer.stats.calibration import debiased_ece

    rng = np.random.default_rng(0)
    p = rng.random(80)
    y = (rng.random(80) < p).astype(int)  # perfectly calibrated by construction, 80 studies
    prob = np.stack([1 - p, p], axis=1)
    assert M.ece(y, prob) > 0.05  # the plug-in estimate reads sampling noise as miscalibration
    assert debiased_ece(y, prob) < M.ece(y, prob) / 2

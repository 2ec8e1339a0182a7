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

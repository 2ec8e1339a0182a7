"""Calibration on validation logits: temperature scaling (Guo et al. 2017), temperature plus bias, and the choice.

softmax(logits / T) keeps the argmax and the ranking of every class score, so AUROC and the
multiclass decision are unchanged; only the probabilities move. We optimise log T with
L-BFGS on the mean negative log-likelihood, which keeps T positive without bounds.

softmax(logits / T + b) with a per-class bias b (b_0 = 0) is Platt scaling on the logit for two classes: still
monotone in the positive-class logit, so binary AUROC is unchanged; for K > 2 classes the bias can move the argmax.
:func:`fit_calibration` chooses among none, temperature and temperature+bias by cross-validated NLL within
validation; :func:`debiased_ece` is the small-sample estimate to report beside the plug-in ECE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from (N, K) logits; a single logit column is treated as sigmoid(z) for class 1."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll_and_grad(log_t: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    t = float(np.exp(log_t[0]))
    s = z / t
    s = s - s.max(axis=1, keepdims=True)
    lse = np.log(np.exp(s).sum(axis=1))
    nll = float(np.mean(lse - s[np.arange(y.size), y]))
    # With s = z / T and u = log T, ds/du = -s, so d nll / du = mean(s_y - sum_k p_k s_k)
    # (the max-shift cancels in that difference).
    p = np.exp(s - lse[:, None])
    grad = np.mean(s[np.arange(y.size), y] - (p * s).sum(axis=1))
    return nll, np.array([grad])


@dataclass
class TemperatureFit:
    temperature: float
    nll_before: float
    nll_after: float
    converged: bool

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "temperature": self.temperature,
            "val_nll_before": self.nll_before,
            "val_nll_after": self.nll_after,
            "converged": self.converged,
            "method": "temperature scaling, L-BFGS on validation NLL",
        }


# The search range of T. A fit that ends on a bound did not find an interior optimum: the registration guard
# refuses the `candidate` alias to such a model (the --limit 40, epochs=2 demo ran to T = 20).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits on (within 0.1% of) an end of :data:`TEMPERATURE_BOUNDS`."""
    lo, hi = TEMPERATURE_BOUNDS
    return temperature <= lo * 1.001 or temperature >= hi * 0.999


def as_logit_columns(logits: np.ndarray) -> np.ndarray:
    """(N, K) float64 logits; a single logit column (or a 1-D array) becomes [0, z], the binary softmax form."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1 or z.shape[1] == 1:
        z = np.concatenate([np.zeros((z.shape[0], 1)), z.reshape(-1, 1)], axis=1)
    return z


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, max_iter: int = 200) -> TemperatureFit:
    """The T minimising validation NLL of softmax(logits / T). T is clipped to [0.05, 20] to stay sane
    when validation is perfectly separable (the NLL then keeps falling as T -> 0)."""
    z = as_logit_columns(logits)
    y = np.asarray(y_true).astype(int)
    before, _ = _nll_and_grad(np.zeros(1), z, y)
    res = minimize(
        _nll_and_grad,
        x0=np.zeros(1),
        args=(z, y),
        jac=True,
        method="L-BFGS-B",
        bounds=[(np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1]))],
        options={"maxiter": max_iter},
    )
    t = float(np.exp(res.x[0]))
    after, _ = _nll_and_grad(res.x, z, y)
    if after > before:  # never make validation worse than leaving the model alone
        t, after = 1.0, before
    return TemperatureFit(t, before, after, bool(res.success))


# --------------------------------------------------------------------------- choosing a calibration method
#
# Focal loss with alpha and a prior-bias initialisation shifts the logit as well as scaling it; one temperature
# cannot undo a shift (the demo run: test ECE 0.175 -> 0.125 with T alone). Temperature plus a per-class bias
# (Platt scaling on the logit for two classes) can. The method is chosen by cross-validated NLL *within* the
# validation set, so the more flexible method has to earn its extra parameter on held-out studies; a tie within
# TIE_NLL goes to the simpler one. A monotone (isotonic) map is not offered: on 78 validation studies it has ~10
# steps fitted to a few dozen points, and it cannot be written into the exported ONNX program as an affine map.

# Uncalibrated is not a candidate: it is the "before" every report shows. On 80 nearly separable validation
# studies (tests/evalfixtures) cross-validation preferred it to T = 1.36 by 0.003 NLL, a noise-level margin.
METHODS = ("temperature", "temperature+bias")
TIE_NLL = 0.002
BIAS_BOUND = 10.0


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0, bias: np.ndarray | None = None) -> np.ndarray:
    """softmax(logits / T + bias): the one form every calibration method here takes (bias None = zeros)."""
    z = as_logit_columns(logits)
    z = z / temperature
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)[None, :]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], 1e-12, 1.0))))


def fit_method(method: str, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(T, bias) of one method fitted on (N, K) logits ``z``; bias[0] is 0 (softmax is shift-invariant)."""
    k = z.shape[1]
    if method == "none":
        return 1.0, np.zeros(k)
    if method == "temperature":
        return fit_temperature(z, y).temperature, np.zeros(k)
    lo, hi = TEMPERATURE_BOUNDS

    def loss(v: np.ndarray) -> float:
        return _nll(calibrated_softmax(z, float(np.exp(v[0])), np.concatenate([[0.0], v[1:]])), y)

    x0 = np.concatenate([[np.log(fit_temperature(z, y).temperature)], np.zeros(k - 1)])
    bounds = [(np.log(lo), np.log(hi))] + [(-BIAS_BOUND, BIAS_BOUND)] * (k - 1)
    res = minimize(loss, x0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 300})
    return float(np.exp(res.x[0])), np.concatenate([[0.0], res.x[1:]])


@dataclass
class CalibrationFit:
    method: str
    temperature: float
    bias: list[float]
    cv_nll: dict[str, float]  # mean held-out NLL per method, folds within validation
    folds: int
    reason: str

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return calibrated_softmax(logits, self.temperature, np.asarray(self.bias))

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "temperature": self.temperature,
            "bias": self.bias,
            "cv_nll": self.cv_nll,
            "cv_folds": self.folds,
            "reason": self.reason,
        }


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    fold = np.empty(y.size, dtype=int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(idx.size) % k
    return [np.flatnonzero(fold == f) for f in range(k)]


def fit_calibration(logits: np.ndarray, y_true: np.ndarray, folds: int = 5, seed: int = 0) -> CalibrationFit:
    """The calibration method with the lowest cross-validated NLL on validation, refitted on all of it."""
    z = as_logit_columns(logits)
    y = np.asarray(y_true).astype(int)
    smallest = int(np.bincount(y, minlength=z.shape[1]).min())
    k = min(folds, smallest)
    if k < 2:
        t, b = fit_method("temperature", z, y)
        why = f"a class has {smallest} validation studies: too few to cross-validate, temperature alone"
        return CalibrationFit("temperature", t, b.tolist(), {}, 0, why)
    cv: dict[str, float] = {}
    parts = _stratified_folds(y, k, seed)
    for m in METHODS:
        losses = []
        for held in parts:
            fit_idx = np.setdiff1d(np.arange(y.size), held)
            t, b = fit_method(m, z[fit_idx], y[fit_idx])
            losses.append(_nll(calibrated_softmax(z[held], t, b), y[held]) * held.size)
        cv[m] = round(float(np.sum(losses) / y.size), 6)
    best = min(METHODS, key=lambda m: cv[m])
    # Simplest method within TIE_NLL of the best: the extra parameter must pay for itself on held-out studies.
    chosen = next(m for m in METHODS if cv[m] <= cv[best] + TIE_NLL)
    t, b = fit_method(chosen, z, y)
    why = f"lowest {k}-fold cross-validated NLL on validation ({cv[chosen]:.4f}; " + ", ".join(
        f"{m} {v:.4f}" for m, v in cv.items()
    )
    why += f"; ties within {TIE_NLL} go to the simpler method)"
    return CalibrationFit(chosen, t, [float(x) for x in b], cv, k, why)


def debiased_ece(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """The debiased L2 calibration error of Kumar, Liang & Ma (2019, "Verified uncertainty calibration").

    The plug-in binned estimate is biased upward on small sets: each bin's observed frequency carries
    sampling noise ybar(1 - ybar)/(n_b - 1) that is counted as miscalibration. Subtracting it per bin
    gives an unbiased estimate of the squared error; we report its square root (0 when the estimate
    is negative, i.e. indistinguishable from perfectly calibrated). Same reliability inputs as ``ece``.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if p.shape[1] == 2:
        conf, hit = p[:, 1], (y == 1).astype(np.float64)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    if y.size == 0:
        return float("nan")
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        n = int(m.sum())
        ybar, pbar = hit[m].mean(), conf[m].mean()
        noise = ybar * (1 - ybar) / (n - 1) if n > 1 else 0.0
        total += n / y.size * ((pbar - ybar) ** 2 - noise)
    return float(np.sqrt(max(total, 0.0)))

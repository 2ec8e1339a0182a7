"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on validation logits.

softmax(logits / T) keeps the argmax and the ranking of every class score, so AUROC and the
multiclass decision are unchanged; only the probabilities move. We optimise log T with
L-BFGS on the mean negative log-likelihood, which keeps T positive without bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, max_iter: int = 200) -> TemperatureFit:
    """The T minimising validation NLL of softmax(logits / T). T is clipped to [0.05, 20] to stay sane
    when validation is perfectly separable (the NLL then keeps falling as T -> 0)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1 or z.shape[1] == 1:
        z = np.concatenate([np.zeros((z.shape[0], 1)), z.reshape(-1, 1)], axis=1)
    y = np.asarray(y_true).astype(int)
    before, _ = _nll_and_grad(np.zeros(1), z, y)
    res = minimize(
        _nll_and_grad,
        x0=np.zeros(1),
        args=(z, y),
        jac=True,
        method="L-BFGS-B",
        bounds=[(np.log(0.05), np.log(20.0))],
        options={"maxiter": max_iter},
    )
    t = float(np.exp(res.x[0]))
    after, _ = _nll_and_grad(res.x, z, y)
    if after > before:  # never make validation worse than leaving the model alone
        t, after = 1.0, before
    return TemperatureFit(t, before, after, bool(res.success))

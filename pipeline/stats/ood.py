"""Out-of-distribution scores from encoder features: Mahalanobis distance in a PCA space plus a residual term.

The statistics are fitted on the *validation* studies' pooled encoder features (the ones temperature scaling and
the threshold are fitted on; never the test split). numpy only, so it is testable alone and loads anywhere.

Score of a feature vector f (dimension D), with mean mu, the top-k principal directions V (k x D) of the fit
features, the Ledoit-Wolf shrinkage covariance C of their k coordinates, and the mean residual variance s2 per
left-out dimension of held-out points (probabilistic PCA's noise term, see `_cross_fit`)::

    z = V (f - mu);   r = (f - mu) - V^T z
    score = sqrt( z^T C^-1 z + |r|^2 / s2 )

The residual term matters: an image from another modality mostly moves features *off* the few directions the
validation set spans (with 80 validation studies and 1,280 features, k <= 40 of them), where a PCA-only distance
would not see it.

Flag threshold: the `percentile` (99th) of *cross-fitted* validation scores: each validation study is scored by
statistics fitted on the other folds. In-sample scores would be optimistic (a fit on 40 points puts each of them
close to its own mean and subspace) and so flag far more than 1% of new in-distribution studies; cross-fitting
makes the validation flag rate an honest estimate of the rate on new studies like them. The statistics that
score new inputs are then fitted on all validation studies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHOD = "mahalanobis_pca_ledoitwolf"
DESCRIPTION = (
    "Mahalanobis distance of the encoder's pooled features to the validation features, in their top principal "
    "components (Ledoit-Wolf shrinkage covariance) plus the residual off those components (probabilistic PCA)"
)
FORMAT = "medxfer-ood/1"
MAX_COMPONENTS = 32
MIN_FIT = 8  # fewer validation studies than this: no statistics (a covariance of 7 points says nothing)
PERCENTILE = 99.0
N_FOLDS = 5


class OODFitError(ValueError):
    """The features cannot be fitted (too few, not finite); the caller records "not fitted" and why."""


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance, shrinkage) of the rows of `x`: Ledoit & Wolf (2004), as sklearn.covariance.ledoit_wolf.

    The empirical covariance (1/n) shrunk toward mu * I, mu = its mean eigenvalue, with the shrinkage that
    minimises the expected Frobenius loss. Well-conditioned even when n < dimension.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = float(np.trace(emp)) / p
    if n < 2 or mu <= 0:
        return emp, 0.0
    x2 = xc**2
    beta_ = float(np.sum(x2.T @ x2)) / n
    delta_ = float(np.sum((xc.T @ xc) ** 2)) / n**2
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(emp)) + p * mu**2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if beta <= 0 or delta <= 0 else beta / delta
    return (1.0 - shrinkage) * emp + shrinkage * mu * np.eye(p), float(shrinkage)


@dataclass
class OODStats:
    """Fitted statistics; `score` maps (N, D) features to (N,) scores. `threshold` is NaN until calibrated."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    precision: np.ndarray  # (k, k), inverse Ledoit-Wolf covariance of the PCA coordinates
    residual_var: float  # s2; 0 = no residual term (k == D)
    shrinkage: float
    n_fit: int
    threshold: float = float("nan")
    percentile: float = PERCENTILE
    method: str = METHOD
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise ValueError(f"features of shape {f.shape}; these statistics need (N, {self.feature_dim})")
        d = f - self.mean
        z = d @ self.components.T
        m2 = np.einsum("ij,jk,ik->i", z, self.precision, z)
        if self.residual_var > 0:
            r = d - z @ self.components
            m2 = m2 + np.einsum("ij,ij->i", r, r) / self.residual_var
        out = np.sqrt(np.maximum(m2, 0.0))
        # A non-finite feature (a NaN pixel that reached the encoder) is as far out as it gets.
        out[~np.isfinite(f).all(axis=1)] = np.inf
        return out

    def residual_sq(self, features: np.ndarray) -> np.ndarray:
        d = np.asarray(features, dtype=np.float64) - self.mean
        r = d - (d @ self.components.T) @ self.components
        return np.einsum("ij,ij->i", r, r)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > self.threshold

    # -- storage: plain arrays + string metadata (the bundle writes them as safetensors)
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float64),
            "components": self.components.astype(np.float64),
            "precision": self.precision.astype(np.float64),
        }

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "method": self.method,
            "threshold": repr(float(self.threshold)),
            "percentile": repr(float(self.percentile)),
            "residual_var": repr(float(self.residual_var)),
            "shrinkage": repr(float(self.shrinkage)),
            "n_fit": str(int(self.n_fit)),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], metadata: dict[str, str]) -> OODStats:
        if metadata.get("format") != FORMAT:
            raise ValueError(f"OOD statistics format {metadata.get('format')!r}; this medxfer reads {FORMAT}")
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            components=np.asarray(arrays["components"], dtype=np.float64),
            precision=np.asarray(arrays["precision"], dtype=np.float64),
            residual_var=float(metadata["residual_var"]),
            shrinkage=float(metadata["shrinkage"]),
            n_fit=int(metadata["n_fit"]),
            threshold=float(metadata["threshold"]),
            percentile=float(metadata["percentile"]),
            method=metadata.get("method", METHOD),
        )


def n_components_for(n: int, dim: int, max_components: int = MAX_COMPONENTS) -> int:
    """k for a fit on n points: at most n/4, at most D.

    The tail eigenvalues of a PCA on few points are too small, so new points' coordinates there get huge
    Mahalanobis terms: on low-rank synthetic features with 80 validation points, k = n/2 flagged 0% of new
    in-distribution points (threshold too high), k = n/2 with 20 points 16%; n/5 gave 0.9% and 0.4% at 80 and 40.
    """
    return max(1, min(max_components, dim, n // 4))


def fit(features: np.ndarray, n_components: int | None = None, max_components: int = MAX_COMPONENTS) -> OODStats:
    """Statistics of the rows of `features` (N, D); threshold left NaN (see `calibrate`)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise OODFitError(f"need at least 2 feature rows to fit, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise OODFitError("features contain NaN/Inf")
    n, dim = f.shape
    k = min(n_components or n_components_for(n, dim, max_components), dim, n - 1)
    mean = f.mean(axis=0)
    d = f - mean
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    var = s**2 / n
    total = float(var.sum())
    if total <= 0:
        raise OODFitError("features are constant over the fit studies")
    # Drop directions with no variance: their Mahalanobis coordinate would be noise divided by ~0.
    k = max(1, min(k, int((var > 1e-10 * var[0]).sum())))
    comps = vt[:k]
    cov, shrink = ledoit_wolf(d @ comps.T)
    precision = np.linalg.pinv(cov, hermitian=True)
    left = dim - k
    resid = (total - float(var[:k].sum())) / left if left > 0 else 0.0
    # Floor: with n <= k + 1 the fit points have no residual at all, yet new points will.
    resid = max(resid, 1e-6 * total / dim) if left > 0 else 0.0
    return OODStats(mean, comps, precision, float(resid), shrink, n)


def cross_fit_scores(features: np.ndarray, n_components: int, n_folds: int = N_FOLDS, seed: int = 0) -> np.ndarray:
    """Each row scored by statistics fitted on the other folds (at most n folds: leave-one-out).

    `n_components` is the same for every fold and for the final fit, so the threshold scores what predict scores.
    """
    return _cross_fit(np.asarray(features, dtype=np.float64), n_components, n_folds, seed)[0]


def _cross_fit(f: np.ndarray, k: int, n_folds: int, seed: int) -> tuple[np.ndarray, float]:
    """(held-out scores, held-out residual variance per left-out dimension).

    The residual variance of the fit points themselves is too small when n < D (n points span n - 1 of the D
    dimensions; a new point has residual in all D - k): 20 synthetic validation points scored that way flagged 25%
    of new in-distribution points. So the residual variance is measured on held-out points, in two passes: the
    folds' held-out residuals give it, then every fold and the final fit score with it.
    """
    n, dim = f.shape
    folds = min(n_folds, n)
    order = np.random.default_rng(seed).permutation(n)
    parts = [(order[i::folds], np.setdiff1d(order, order[i::folds])) for i in range(folds)]
    fitted = [fit(f[rest], n_components=k) for _, rest in parts]
    resid = 0.0
    if dim > k:
        sq = [fs.residual_sq(f[held]) for (held, _), fs in zip(parts, fitted, strict=True)]
        resid = max(float(np.concatenate(sq).mean()) / (dim - fitted[0].n_components), 1e-12)
    out = np.empty(n)
    for (held, _), fs in zip(parts, fitted, strict=True):
        fs.residual_var = resid if fs.residual_var > 0 else 0.0
        out[held] = fs.score(f[held])
    return out, resid


def calibrate(
    features: np.ndarray,
    percentile: float = PERCENTILE,
    n_folds: int = N_FOLDS,
    seed: int = 0,
    max_components: int = MAX_COMPONENTS,
) -> tuple[OODStats, np.ndarray]:
    """(statistics fitted on all rows with the threshold set, the cross-fitted scores of the rows)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < MIN_FIT:
        raise OODFitError(f"{0 if f.ndim != 2 else f.shape[0]} validation studies; OOD statistics need {MIN_FIT}")
    if not np.isfinite(f).all():
        raise OODFitError("features contain NaN/Inf")
    n, dim = f.shape
    k = n_components_for(n - -(-n // min(n_folds, n)), dim, max_components)  # sized by the smallest fold fit
    scores, resid = _cross_fit(f, k, n_folds, seed)
    stats = fit(f, n_components=k)
    if stats.residual_var > 0:
        stats.residual_var = resid
    stats.threshold = float(np.percentile(scores, percentile))
    stats.percentile = float(percentile)
    return stats, scores


def flag_rate(scores: np.ndarray, threshold: float) -> float | None:
    s = np.asarray(scores, dtype=np.float64)
    return None if s.size == 0 else float((s > threshold).mean())

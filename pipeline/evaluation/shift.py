"""Domain shift in the evaluation: OOD statistics calibrated on validation, and metrics per scanner subgroup.

OOD (``evaluation.json`` key ``ood``; method in :mod:`medxfer.stats.ood`): the validation studies' penultimate
features (the inference model's: same deterministic preprocessing and test-time mirroring as predict) fit the
statistics; the threshold is the 99th percentile of cross-fitted validation scores. The fitted arrays go to
``evaluation/ood.safetensors`` next to ``evaluation.json`` (and the run's MLflow artifacts); the bundle copies them,
so predict, the pyfunc and a registered model score every input against them (``ood_score``, ``ood_flag``).

Subgroups (key ``subgroups``): test metrics per DICOM Manufacturer (0008,0070) and per Manufacturer +
ManufacturerModelName (0008,1090), which ingest records in the manifest (NIfTI has neither: one "(not recorded)"
group). :data:`SUBGROUP_RULE` says when a group gets numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from medxfer.stats import metrics as M
from medxfer.stats import ood

OOD_FILE = "ood.safetensors"
FEATURES = "pooled encoder features of the inference model (the head's input; test-time mirrored views averaged)"
MIN_SUBGROUP_STUDIES = 20
SUBGROUP_RULE = (
    f"a group gets metrics when it has >= {MIN_SUBGROUP_STUDIES} test studies and every class is present in it; "
    "otherwise it is listed as 'too few' (point estimates, no CIs: groups are small)"
)
NOT_RECORDED = "(not recorded)"
SUBGROUP_METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity")


def _quantiles(x: np.ndarray) -> dict[str, float] | None:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    q = np.percentile(x, [50, 90, 99])
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(x.max())}


FIT_ON_NON_TEST = (
    "the non-test studies, scored by the fold ensemble (its features are the mean of the members'); each of them "
    "was in the training data of all members but one, so their features sit closer together than a new study's "
    "and the threshold may flag more than 1% of new in-distribution studies: test_flag_rate shows how many"
)


def ood_evaluation(
    val_features: np.ndarray | None, test_features: np.ndarray | None, seed: int = 0, fit_on: str = "validation"
) -> tuple[dict[str, Any], ood.OODStats | None, np.ndarray | None, np.ndarray | None]:
    """(the ``ood`` block, fitted statistics or None, cross-fitted val scores, test scores).

    ``fit_on`` says what `val_features` are: "validation" (a val split), or :data:`FIT_ON_NON_TEST` for a fold
    ensemble, whose k-fold split has no study that no member trained on but the test split (never fitted on)."""
    block: dict[str, Any] = {
        "method": ood.METHOD,
        "description": ood.DESCRIPTION,
        "features": FEATURES,
        "fit_on": fit_on,
        "percentile": ood.PERCENTILE,
        "threshold_rule": f"{ood.PERCENTILE:g}th percentile of {ood.N_FOLDS}-fold cross-fitted "
        + ("validation" if fit_on == "validation" else "non-test")
        + " scores",
        "fitted": False,
        "reason": None,
        "file": None,
    }
    if val_features is None or test_features is None:
        block["reason"] = "the model gives no penultimate features"
        return block, None, None, None
    try:
        stats, val_scores = ood.calibrate(val_features, seed=seed)
    except ood.OODFitError as exc:
        block["reason"] = str(exc)
        return block, None, None, None
    test_scores = stats.score(test_features)
    block.update(
        fitted=True,
        threshold=stats.threshold,
        n_fit=stats.n_fit,
        n_components=stats.n_components,
        feature_dim=stats.feature_dim,
        shrinkage=stats.shrinkage,
        val_flag_rate=ood.flag_rate(val_scores, stats.threshold),
        test_flag_rate=ood.flag_rate(test_scores, stats.threshold),
        test_flagged=int(stats.flag(test_scores).sum()),
        n_test=int(test_scores.size),
        val_scores=_quantiles(val_scores),
        test_scores=_quantiles(test_scores),
        file=OOD_FILE,
    )
    return block, stats, val_scores, test_scores


def write_ood_stats(stats: ood.OODStats, path: Path) -> Path:
    """The arrays as safetensors (float64) with the scalars as string metadata, in the canonical header order:
    the same statistics give the same SHA-256 in every evaluation."""
    from medxfer.core.jsonio import canonical_safetensors
    from medxfer.core.workspace import atomic_path
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in stats.to_arrays().items()}
    blob = canonical_safetensors(save(arrays, metadata=stats.metadata()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path


def read_ood_stats(path: Path) -> ood.OODStats:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        meta = dict(fh.metadata() or {})
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return ood.OODStats.from_arrays(arrays, meta)


# ---------------------------------------------------------------------------- subgroups


def _label(v: Any) -> str:
    s = " ".join(str(v).split()) if v is not None and not (isinstance(v, float) and np.isnan(v)) else ""
    return s[:64] or NOT_RECORDED


def scanner_of(rows: Any) -> dict[str, tuple[str, str]]:
    """study_key -> (manufacturer, manufacturer model) from manifest rows (a manifest without them: not recorded)."""
    out: dict[str, tuple[str, str]] = {}
    cols = set(getattr(rows, "columns", []))
    for r in rows.to_dict("records"):
        man = _label(r.get("manufacturer")) if "manufacturer" in cols else NOT_RECORDED
        model = _label(r.get("manufacturer_model")) if "manufacturer_model" in cols else NOT_RECORDED
        out[str(r["study_key"])] = (man, model)
    return out


def subgroup_metrics(
    studies: np.ndarray,
    y: np.ndarray,
    prob: np.ndarray,
    scanners: dict[str, tuple[str, str]],
    classes: Sequence[str],
    threshold: float | None,
    positive_index: int | None,
    ood_flags: np.ndarray | None = None,
) -> dict[str, Any]:
    """Test metrics per manufacturer and per manufacturer + model, with :data:`SUBGROUP_RULE`."""
    k = len(classes)
    stat = M.headline_statistic(threshold, positive_index if positive_index is not None else 1)
    man = np.array([scanners.get(str(s), (NOT_RECORDED, NOT_RECORDED))[0] for s in studies], dtype=object)
    mod = np.array([scanners.get(str(s), (NOT_RECORDED, NOT_RECORDED))[1] for s in studies], dtype=object)
    both = np.array([f"{a} / {b}" for a, b in zip(man, mod, strict=True)], dtype=object)

    def table(keys: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for g in sorted(set(keys.tolist())):
            m = keys == g
            counts = np.bincount(y[m], minlength=k)
            enough = int(m.sum()) >= MIN_SUBGROUP_STUDIES and bool((counts > 0).all())
            row: dict[str, Any] = {
                "group": g,
                "n_studies": int(m.sum()),
                "counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
                "status": "ok" if enough else "too few",
                "metrics": None,
                "ood_flag_rate": None if ood_flags is None else float(ood_flags[m].mean()),
            }
            if enough:
                vals = stat(y[m], prob[m])
                row["metrics"] = {n: (None if vals.get(n) is None else float(vals[n])) for n in SUBGROUP_METRICS}
            out.append(row)
        return out

    recorded = bool(((man != NOT_RECORDED) | (mod != NOT_RECORDED)).any())
    return {
        "split": "test",
        "rule": SUBGROUP_RULE,
        "min_studies": MIN_SUBGROUP_STUDIES,
        "recorded": recorded,
        "metrics": list(SUBGROUP_METRICS),
        "by": {"manufacturer": table(man), "manufacturer_model": table(both)},
    }

"""Every figure medxfer draws, as PNG files: ROC, precision-recall, reliability diagram, confusion matrix
(evaluate), learning curves (train, from its tracking callback; the report), the transfer gain (the report) and
Grad-CAM overlays (predict).

The only module importing matplotlib; it forces the Agg backend so plotting works headless
(CI, servers) and never opens a window. Callers import it inside functions, so a stage that
draws nothing never loads matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from medxfer.stats import metrics as M  # noqa: E402


def _curves(
    y: np.ndarray, prob: np.ndarray, classes: Sequence[str], positive_index: int | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, binary truth, score) per curve: the positive class for binary, one-vs-rest per class otherwise."""
    if positive_index is not None:
        return [(classes[positive_index], (y == positive_index).astype(int), prob[:, positive_index])]
    return [(c, (y == i).astype(int), prob[:, i]) for i, c in enumerate(classes)]


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def roc_plot(
    y: np.ndarray,
    prob: np.ndarray,
    classes: Sequence[str],
    positive_index: int | None,
    path: Path,
    operating_point: tuple[float, float] | None = None,
    title: str = "ROC (test)",
) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, yb, s in _curves(y, prob, classes, positive_index):
        fpr, tpr, _ = M.roc_points(yb, s)
        ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{label} (AUROC {M.auroc(yb, s):.3f})")
    if operating_point is not None:  # (sensitivity, specificity) at the chosen threshold
        ax.plot(1 - operating_point[1], operating_point[0], "ko", label="operating threshold")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_plot(
    y: np.ndarray,
    prob: np.ndarray,
    classes: Sequence[str],
    positive_index: int | None,
    path: Path,
    title: str = "Precision-recall (test)",
) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, yb, s in _curves(y, prob, classes, positive_index):
        rec, prec = M.pr_points(yb, s)
        ax.plot(rec, prec, drawstyle="steps-post", label=f"{label} (AP {M.average_precision(yb, s):.3f})")
        ax.axhline(yb.mean() if yb.size else 0, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def reliability_plot(
    y: np.ndarray,
    prob_before: np.ndarray,
    prob_after: np.ndarray,
    path: Path,
    n_bins: int = 15,
    title: str = "Reliability (test)",
) -> Path:
    """Both inputs are (N, 2) [negative, positive] for binary (positive-class calibration) or (N, K)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    binary = prob_after.shape[1] == 2
    for name, p, style in (("before", prob_before, "o--"), ("after temperature", prob_after, "s-")):
        mean_p, freq, counts = M.reliability_curve(y, p, n_bins)
        ok = counts > 0
        ax.plot(mean_p[ok], freq[ok], style, ms=4, label=f"{name} (ECE {M.ece(y, p, n_bins):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    what = "predicted probability of the positive class" if binary else "confidence (top class)"
    ax.set(xlabel=what, ylabel="observed frequency" if binary else "accuracy", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def confusion_plot(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "Confusion matrix (test)") -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(classes)), labels=list(classes), rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def stage_boundaries(history: Sequence[dict[str, Any]], transitions: Sequence[dict[str, Any]] = ()) -> list[int]:
    """0-based epochs at which a new unfreezing stage began: from the history's ``stage`` column (so history.json
    alone is enough) and the unfreezer's transitions (a plateau trigger is recorded there first)."""
    out = {int(t["epoch"]) for t in transitions if t.get("epoch") is not None}
    prev = None
    for h in history:
        stage = h.get("stage")
        if stage is not None and prev is not None and stage != prev:
            out.add(int(h["epoch"]))
        prev = stage if stage is not None else prev
    first = int(history[0]["epoch"]) if history else 0
    return sorted(e for e in out if e > first)  # a stage starting at the first plotted epoch is no boundary


def best_epoch(history: Sequence[dict[str, Any]], select_metric: str) -> int | None:
    """The epoch training kept (0-based): training's own rule, the first maximum of the select metric
    (``-val_loss`` for loss), NaN worst."""
    best, at = -math.inf, None
    for h in history:
        v = h.get("val_loss" if select_metric == "loss" else f"val_{select_metric}")
        if v is None:
            continue
        v = -float(v) if select_metric == "loss" else float(v)
        v = v if math.isfinite(v) else -math.inf
        if at is None or v > best:
            best, at = v, int(h["epoch"])
    return at


def plot_learning_curves(
    history: list[dict[str, float]],
    transitions: list[dict[str, Any]],
    path: Path,
    select_metric: str,
    best: int | None = None,
) -> Path:
    """Loss and validation metrics per epoch (1-based on the axis); unfreezing-stage boundaries dashed, the
    kept (best) epoch starred. `best`: 0-based epoch; None recomputes it from the history with training's rule."""
    epochs = [int(h["epoch"]) + 1 for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))

    def series(key: str) -> list[float]:
        return [float(h[key]) if h.get(key) is not None else math.nan for h in history]

    ax1.plot(epochs, series("train_loss"), "o-", label="train")
    ax1.plot(epochs, series("val_loss"), "o-", label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    for key, label in (("val_auroc", "val AUROC"), ("val_balanced_accuracy", "val balanced acc.")):
        if any(key in h for h in history):
            ax2.plot(epochs, series(key), "o-", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1.02)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bounds = stage_boundaries(history, transitions)
    for ax in (ax1, ax2):
        for i, e in enumerate(bounds):
            # A new stage starts at 0-based epoch e, drawn at e + 1: the boundary sits halfway before it.
            ax.axvline(e + 0.5, color="grey", ls="--", lw=1.0, label="unfreezing stage" if i == 0 else None)
    best = best_epoch(history, select_metric) if best is None else int(best)
    if best is not None and best in [int(h["epoch"]) for h in history]:
        row = next(h for h in history if int(h["epoch"]) == best)
        key = "val_loss" if select_metric == "loss" else f"val_{select_metric}"
        ax = ax1 if select_metric == "loss" else ax2
        if row.get(key) is not None:
            ax.plot(
                [best + 1], [float(row[key])], "*", color="crimson", ms=14, zorder=5, label=f"best (epoch {best + 1})"
            )
        for a in (ax1, ax2):
            a.axvline(best + 1, color="crimson", ls=":", lw=0.8)
    ax1.legend(fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    note = "; dashed: unfreezing stages" if bounds else "; one unfreezing stage"
    ax2.set_title(f"selection: {select_metric}{note}; star: kept epoch", fontsize=9)
    return _save(fig, path)


def transfer_plot(transfer: dict[str, Any], path: Path, title: str = "Transfer gain (test)") -> Path:
    """Main vs control AUROC on the same test studies, and their paired gain with its 95% CI (zero line)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.6), gridspec_kw={"width_ratios": [1, 1.3]})
    kind = str(transfer.get("control_kind") or "control")
    vals = [transfer.get("main"), transfer.get("control")]
    ax1.barh([1, 0], [v if v is not None else 0 for v in vals], color=["tab:blue", "tab:grey"])
    ax1.set_yticks([1, 0], labels=["pretrained", kind])
    ax1.set(xlim=(0, 1), xlabel=str(transfer.get("metric") or "auroc").upper())
    for y, v in zip([1, 0], vals, strict=True):
        if v is not None:
            ax1.text(min(v, 0.85) + 0.02, y, f"{v:.3f}", va="center", fontsize=8)
    g = transfer.get("gain") or {}
    v, lo, hi = g.get("value"), g.get("ci_low"), g.get("ci_high")
    if v is not None:
        err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
        colour = "crimson" if transfer.get("negative_transfer") else "tab:green"
        ax2.errorbar([v], [0], xerr=err, fmt="o", color=colour, capsize=6, ms=8)
    ax2.axvline(0, color="grey", ls="--", lw=0.8)
    span = max(abs(x) for x in (v, lo, hi, 0.05) if x is not None) * 1.3
    ax2.set(xlim=(-span, span), yticks=[], xlabel="gain (pretrained - control), 95% CI")
    ax2.set_title(str(transfer.get("verdict") or ""), fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def overlay_plot(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> Path:
    """The image as stored (left) and with the map over it (right): a reader needs both to judge the map."""
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    shown = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    h, w = image.shape
    side = 3.2 * max(1.0, w / h)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(2 * side, 3.2 * max(1.0, h / w) + 0.5), dpi=100)
    for ax in (ax0, ax1):
        ax.imshow(shown, cmap="gray", interpolation="nearest")
        ax.axis("off")
    # Transparency follows the map: weak evidence stays see-through, strong evidence is opaque.
    ax1.imshow(cam, cmap="jet", alpha=0.6 * cam, vmin=0, vmax=1, interpolation="bilinear")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

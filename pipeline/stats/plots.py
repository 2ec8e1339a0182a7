"""Every figure medxfer draws, as PNG files: ROC, precision-recall, reliability diagram, confusion matrix
(evaluate), learning curves (train, through tracking) and Grad-CAM overlays (predict).

The only module importing matplotlib; it forces the Agg backend so plotting works headless
(CI, servers) and never opens a window. Callers import it inside functions, so a stage that
draws nothing never loads matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
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


def plot_learning_curves(
    history: list[dict[str, float]], transitions: list[dict[str, Any]], path: Path, select_metric: str
) -> Path:
    """Loss and validation metrics per epoch, with stage changes marked."""
    epochs = [int(h["epoch"]) + 1 for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_auroc"] for h in history], "o-", label="val AUROC")
    ax2.plot(epochs, [h["val_balanced_accuracy"] for h in history], "o-", label="val balanced acc.")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        for t in transitions:
            ax.axvline(int(t["epoch"]) + 0.5, color="grey", ls="--", lw=0.8)
    ax2.set_title(f"selection: {select_metric}; dashed: unfreezing stages", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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

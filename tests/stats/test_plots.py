"""Evaluation figures are valid PNG files for binary and multiclass tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from medxfer.stats import metrics as M
from medxfer.stats import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and b"IEND" in data[-12:] and len(data) > 1000


@pytest.mark.parametrize("k", [2, 3])
def test_plots_are_valid_pngs(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, 80)
    z = rng.normal(size=(80, k)) + 2 * np.eye(k)[y]
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    classes = [f"c{i}" for i in range(k)]
    pos = 1 if k == 2 else None
    out = [
        plots.roc_plot(y, p, classes, pos, tmp_path / "roc.png", operating_point=(0.8, 0.7)),
        plots.pr_plot(y, p, classes, pos, tmp_path / "pr.png"),
        plots.reliability_plot(y, p, np.sqrt(p) / np.sqrt(p).sum(1, keepdims=True), tmp_path / "rel.png"),
        plots.confusion_plot(M.confusion_matrix(y, p.argmax(1), k), classes, tmp_path / "cm.png"),
    ]
    for path in out:
        assert _is_png(path), path.name


def test_learning_curve_plot(tmp_path) -> None:
    hist = [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.1 / (e + 1),
            "val_auroc": 0.5 + e / 10,
            "val_balanced_accuracy": 0.5,
        }
        for e in range(3)
    ]
    out = plots.plot_learning_curves(hist, [{"epoch": 1}], tmp_path / "curve.png", "auroc")
    assert out.stat().st_size > 1000
    assert _is_png(out)


def test_saliency_overlay_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (24, 40))
    cam = np.clip(rng.random((24, 40)), 0, 1)
    out = plots.overlay_plot(image, cam, tmp_path / "0001.png", "#0001  Grad-CAM for 'pos'")
    assert _is_png(out)

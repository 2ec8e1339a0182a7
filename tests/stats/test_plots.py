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


def _history(stages: list[int], aurocs: list[float]) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.1 / (e + 1),
            "val_auroc": a,
            "val_balanced_accuracy": 0.5,
            "stage": s,
        }
        for e, (s, a) in enumerate(zip(stages, aurocs, strict=True))
    ]


def test_learning_curve_plot(tmp_path) -> None:
    hist = _history([0, 1, 1], [0.5, 0.6, 0.7])
    out = plots.plot_learning_curves(hist, [{"epoch": 1}], tmp_path / "curve.png", "auroc")
    assert _is_png(out)


def test_learning_curve_marks_stages_and_the_kept_epoch(tmp_path) -> None:
    """The title promises dashed stage boundaries: they come from the history's stage column alone."""
    hist = _history([0, 0, 1, 1, 2], [0.6, 0.9, 0.8, float("nan"), 0.9])
    assert plots.stage_boundaries(hist) == [2, 4]
    assert plots.stage_boundaries(hist, [{"epoch": 3}]) == [2, 3, 4]  # transitions count too
    assert plots.stage_boundaries(_history([0, 0], [0.5, 0.6])) == []
    # Training's rule: first maximum (a later tie does not replace it), NaN worst; loss: lowest.
    assert plots.best_epoch(hist, "auroc") == 1
    assert plots.best_epoch(hist, "loss") == 4
    import matplotlib.pyplot as plt

    captured = {}
    orig = plots._save

    def keep(fig, path):
        captured["fig"] = fig
        lines = [ln for ax in fig.axes for ln in ax.get_lines()]
        captured["dashed_x"] = sorted({ln.get_xdata()[0] for ln in lines if ln.get_linestyle() == "--"})
        captured["stars"] = [ln.get_xdata()[0] for ln in lines if ln.get_marker() == "*"]
        captured["title"] = fig.axes[1].get_title()
        return orig(fig, path)

    plots._save = keep
    try:
        out = plots.plot_learning_curves(hist, [], tmp_path / "curve.png", "auroc")
    finally:
        plots._save = orig
    assert _is_png(out)
    assert captured["dashed_x"] == [2.5, 4.5]  # new stage at 0-based epoch 2 is drawn at 3: boundary before it
    assert captured["stars"] == [2]  # the kept epoch (0-based 1), 1-based on the axis
    assert "dashed: unfreezing stages" in captured["title"]
    plt.close("all")
    # One stage: no dashed line is promised.
    plots._save = keep
    try:
        plots.plot_learning_curves(_history([0, 0], [0.5, 0.6]), [], tmp_path / "one.png", "auroc", best=0)
    finally:
        plots._save = orig
    assert "dashed" not in captured["title"] and captured["stars"] == [1]


def test_transfer_plot(tmp_path: Path) -> None:
    tr = {
        "control_kind": "scratch",
        "metric": "auroc",
        "main": 0.9,
        "control": 0.7,
        "gain": {"value": 0.2, "ci_low": -0.05, "ci_high": 0.4},
        "negative_transfer": True,
        "verdict": "not shown better",
    }
    assert _is_png(plots.transfer_plot(tr, tmp_path / "t.png"))


def test_saliency_overlay_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (24, 40))
    cam = np.clip(rng.random((24, 40)), 0, 1)
    out = plots.overlay_plot(image, cam, tmp_path / "0001.png", "#0001  Grad-CAM for 'pos'")
    assert _is_png(out)

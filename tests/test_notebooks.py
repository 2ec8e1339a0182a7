"""The notebooks in notebooks/ run top to bottom against a tiny registered run (nbclient), so they never rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from helpers import write_image2d, write_nifti
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _blob(positive: bool, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.normal(60, 12, (size, size))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        img += 120 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 8) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The notebook's own kernel name ("python3") resolves to this interpreter's kernel in the venv.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{out.get('ename')}: {out.get('evalue')}"
            text.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def _has_parameters_cell(nb: nbformat.NotebookNode) -> bool:
    return any("parameters" in c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code")


def test_review_a_run(registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDXFER_RUN_ID", registered.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.tracking_uri)
    nb = _execute("01-review-a-run.ipynb", tmp_path)
    assert _has_parameters_cell(nb)
    text = _outputs(nb)
    assert "train/loss" in text and "ci_low" in text and "ECE" in text
    assert f"models:/{registered.model_name}/{registered.model_version}" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, CI plot, reliability diagram, confusion matrix


def test_use_a_registered_model(registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new = tmp_path / "new"
    a = write_image2d(new / "a" / "IM1", _blob(True))
    b = write_nifti(new / "b.nii.gz", _blob(False).astype(np.float32), spacing=(0.5, 0.5))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.tracking_uri)
    monkeypatch.setenv("MEDXFER_MODEL_URI", f"models:/{registered.model_name}@candidate")
    monkeypatch.setenv("MEDXFER_INPUTS", os.pathsep.join([str(a.parent), str(b), str(new / "missing")]))
    monkeypatch.setenv("MEDXFER_OUT_DIR", str(tmp_path / "out"))
    nb = _execute("02-use-a-registered-model.ipynb", tmp_path)
    assert _has_parameters_cell(nb)
    text = _outputs(nb)
    assert "not_found" in text and registered.model_name in text
    assert sorted(p.name for p in (tmp_path / "out" / "saliency").iterdir()) == ["0001.png", "0002.png"]

"""Shared fixtures. Dataset builders live in tests/helpers.py (see its docstring for the full list)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Dataset, make_dicom2d_dataset, make_nifti3d_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests use the key-file path unless they set the variable themselves; a developer's own
    # MEDXFER_PSEUDONYM_KEY must not change test outcomes.
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)


@pytest.fixture
def tiny_dicom2d(tmp_path: Path) -> Dataset:
    """40 single-image US studies, 2 classes, 24 patients (some with several studies), planted PHI."""
    return make_dicom2d_dataset(tmp_path / "d2")


@pytest.fixture
def tiny_nifti3d(tmp_path: Path) -> Dataset:
    """40 NIfTI volumes of 12^3, 2 classes, labels keyed by path with a patient column."""
    return make_nifti3d_dataset(tmp_path / "n3")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (read-only real files); skips when this checkout has none."""
    if not (SHARED_DATA / "dicom").is_dir():
        pytest.skip(f"real DICOM data not found at {SHARED_DATA} (../shared/data next to the repo); "
                    "only present on the project's own machines")
    return SHARED_DATA

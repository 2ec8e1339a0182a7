"""Shared fixtures. Dataset builders live in tests/helpers.py (see its docstring for the full list)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        pytest.skip(
            f"real DICOM data not found at {SHARED_DATA} (../shared/data next to the repo); "
            "only present on the project's own machines"
        )
    return SHARED_DATA


# --- a tiny registered run (registry, predict, runall, notebook tests) ---------------------------------------------
# ONE end-to-end `run_all` (ingest -> split -> train -> evaluate -> register) per session, in an embedded sqlite
# store. 64 px, not 32: EfficientNet-Lite0's last feature map is 1x1 at 32 px and goes all-zero, so nothing learns.
TINY_RUN_RECIPE = [
    "epochs=2",
    "data.size=[64,64]",
    "data.batch_size=8",
    "optim.lr=3e-3",
    "optim.warmup_epochs=0",
    "stages=[{epoch: 0, groups: all}]",
    "data.augment={}",
    "evaluation.bootstrap=200",
]
TINY_MODEL_NAME = "tiny-us"


@dataclass
class RegisteredRun:
    dataset: Dataset
    workspace: Path
    tracking_uri: str
    run_id: str
    model_name: str
    model_version: str
    result: Any  # pipeline.runall.RunAllResult


@pytest.fixture(scope="session")
def registered_run(tmp_path_factory: pytest.TempPathFactory) -> RegisteredRun:
    """A learned 2D model (DICOM US, planted PHI) registered as `tiny-us` with alias candidate.

    Tests that use it must not depend on MLFLOW_TRACKING_URI: request `registered` instead, which unsets it.
    """
    from pipeline.runall import run_all

    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("registered") / "d2")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
        mp.setenv("MEDXFER_SYSTEM_METRICS", "0")  # no background sampler thread in a 2-core CI
        result = run_all(ds.spec, ds.workspace, overrides=TINY_RUN_RECIPE, name=TINY_MODEL_NAME)
    return RegisteredRun(
        ds, ds.workspace, result.tracking_uri, result.run_id, result.model_name, result.model_version, result
    )


@pytest.fixture
def registered(registered_run: RegisteredRun, monkeypatch: pytest.MonkeyPatch) -> RegisteredRun:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    return registered_run

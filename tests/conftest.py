"""Shared fixtures. Dataset builders live in tests/helpers.py (see its docstring for the full list)."""

from __future__ import annotations

import os
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
    result: Any  # medxfer.runall.RunAllResult


@pytest.fixture(scope="session")
def registered_run(tmp_path_factory: pytest.TempPathFactory) -> RegisteredRun:
    """A learned 2D model (DICOM US, planted PHI) registered as `tiny-us` with alias candidate.

    Tests that use it must not depend on MLFLOW_TRACKING_URI: request `registered` instead, which unsets it.
    """
    from medxfer.runall import run_all

    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("registered") / "d2")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
        mp.setenv("MEDXFER_SYSTEM_METRICS", "0")  # no background sampler thread in a 2-core CI
        # The toy task separates validation perfectly, so the temperature fit ends on its lower bound and the
        # registration guard withholds `candidate`: the tests of what comes after registration force it.
        result = run_all(ds.spec, ds.workspace, overrides=TINY_RUN_RECIPE, name=TINY_MODEL_NAME, force=True)
    return RegisteredRun(
        ds, ds.workspace, result.tracking_uri, result.run_id, result.model_name, result.model_version, result
    )


@pytest.fixture
def registered(registered_run: RegisteredRun, monkeypatch: pytest.MonkeyPatch) -> RegisteredRun:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    return registered_run


# --- a tiny trained + evaluated run (evaluate, bundle, export, modelcard tests) ----------------------------------
# A tiny trained + evaluated run built once per session with the real stages (ingest, split, train with a
# scratch control arm, evaluate), for tests of the stages that come after training.
#
#     def test_x(evaluated_run): evaluated_run.run_id, .workspace, .dataset (helpers.Dataset), .result (EvalResult)


@dataclass
class EvaluatedRun:
    run_id: str
    control_run_id: str | None
    workspace: Path
    dataset: Any
    result: Any  # medxfer.evaluation.evaluate.EvalResult
    tracking_uri: str


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> EvaluatedRun:
    from helpers import make_dicom2d_dataset
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.training.stage import train

    saved = {k: os.environ.pop(k, None) for k in ("MEDXFER_PSEUDONYM_KEY", "MLFLOW_TRACKING_URI")}
    os.environ["MEDXFER_SYSTEM_METRICS"] = "0"  # no background sampler thread in a 2-core CI
    try:
        ds = make_dicom2d_dataset(tmp_path_factory.mktemp("evaluated") / "d2")
        spec = ds.spec
        ingest(spec, ds.workspace)
        split(spec, ds.workspace)
        trained = train(
            spec,
            ds.workspace,
            recipe=None,
            weights=None,
            resume=False,
            control="scratch",
            device="cpu",
            overrides=[
                "epochs=1",
                "weights=none",
                "data.size=[32,32]",
                "data.batch_size=8",
                "stages=[{epoch: 0, groups: all}]",
            ],
        )
        summary = trained.summary()
        result = evaluate(summary["run_id"], ds.workspace, n_bootstrap=200, device="cpu")
    finally:
        os.environ.pop("MEDXFER_SYSTEM_METRICS", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    return EvaluatedRun(summary["run_id"], summary.get("control_run_id"), ds.workspace, ds, result, result.tracking_uri)

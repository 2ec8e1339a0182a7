"""A tiny trained + evaluated run built once per session with the real stages (ingest, split, train with a
scratch control arm, evaluate), for tests of the stages that come after training.

    def test_x(evaluated_run): evaluated_run.run_id, .workspace, .dataset (helpers.Dataset), .result (EvalResult)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class EvaluatedRun:
    run_id: str
    control_run_id: str | None
    workspace: Path
    dataset: Any
    result: Any  # pipeline.evaluate.EvalResult
    tracking_uri: str


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> EvaluatedRun:
    from helpers import make_dicom2d_dataset

    from pipeline.evaluate import evaluate
    from pipeline.ingest import ingest
    from pipeline.split import split
    from pipeline.train import train

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

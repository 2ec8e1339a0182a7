"""Look at it (issue 15): the real MLflow UI on the suite's registered run, photographed with headless Chromium by
docs/screenshots.py (the script that makes the README's pictures); the REST API confirms what the pictures show."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]


def _screenshots():
    spec = importlib.util.spec_from_file_location("medxfer_docs_screenshots", ROOT / "docs" / "screenshots.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


shots = _screenshots()


@pytest.fixture(scope="session")  # session scope, named first: checked before the registered run is trained
def browser() -> str:
    path = shots.chromium()
    if path is None:
        # CI installs it (.ci/run): missing there is a broken runner, not a reason to skip the check.
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(shots.CHROMIUM_MISSING)
        pytest.skip(shots.CHROMIUM_MISSING)
    return path


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


def test_ui_pages_render_what_the_store_holds(browser: str, registered, tmp_path: Path) -> None:
    with shots.serve_ui(registered.workspace, tmp_path / "ui.log") as (url, _):
        t = shots.find_target(url, registered.model_name)
        assert (t.run_id, t.model_version) == (registered.run_id, registered.model_version)

        exp = shots.api(url, "experiments/get", experiment_id=t.experiment_id)["experiment"]
        exp_tags = _tags(exp)
        # The kind tag: without it MLflow 3.17 files the experiment under GenAI (an "evaluation" run).
        assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
        assert "train/" in exp_tags["mlflow.note.content"]  # the experiment description says where the metrics are

        run = shots.api(url, "runs/get", run_id=t.run_id)["run"]
        tags = _tags(run["data"])
        spec_name = tags["medxfer.spec"]
        note = tags["mlflow.note.content"]
        assert note.startswith(f"**{spec_name}**")  # the run description the overview shows first
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"train/loss", "val/loss", "val/auroc", "test/auroc", "eval/threshold"} <= keys
        assert not {k for k in keys if "/" not in k}, "every metric in a prefix group (one UI section each)"
        inputs = run["inputs"]["dataset_inputs"]
        assert [(i["dataset"]["name"], _tags(i)["mlflow.data.context"]) for i in inputs] == [(spec_name, "training")]
        assert "evaluation/report.html" in {
            f["path"] for f in shots.api(url, "artifacts/list", run_id=t.run_id, path="evaluation")["files"]
        }

        model = shots.api(url, "registered-models/get", name=t.model_name)["registered_model"]
        description = model["description"]
        assert spec_name in description and "Intended use" in description

        taken = shots.take_all(url, t, tmp_path / "shots", browser, resize=False)

    assert set(taken) == set(shots.PAGES)
    for name, shot in taken.items():
        # A blank or half-drawn page has a handful of colours; a drawn one thousands (anti-aliased text).
        assert shots.distinct_colours(shot.png) > 500, f"{name} looks blank: {shot.png}"
    text = {name: " ".join(shot.text.split()) for name, shot in taken.items()}
    assert "Datasets" in text["run-overview"] and spec_name in text["run-overview"]
    assert "Model training" in text["run-overview"]  # the ML sidebar, not the GenAI one
    # One section per prefix: the search box (shots.SEARCH) keeps train/loss and val/loss.
    assert "train (1)" in text["model-metrics"] and "val (1)" in text["model-metrics"]
    assert description.splitlines()[0][:40] in text["registered-model"]
    assert "evaluation/report.html" in text["report"]
    # What the README shows: shrunk to 1200 px and well under 300 KB.
    png = taken["run-overview"].png
    shots.shrink(png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.width == shots.WIDTH
    assert png.stat().st_size < 300_000

"""A real `mlflow server` on 127.0.0.1: the pipeline logs to it over HTTP, and its REST API (what the UI reads)
shows the run's metrics, plots and model card, the registered version, its tags and its alias."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CHEAP_RUN, PHI, make_dicom2d_dataset, write_image2d

SERVER_RECIPE = ["epochs=1", *CHEAP_RUN, "evaluation.bootstrap=50"]
STARTUP_S = 120  # ~20 s on an idle 2-core machine; generous for a loaded CI runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_bytes(url: str, endpoint: str, **params: Any) -> bytes:
    q = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{endpoint}{q}", timeout=30) as r:
        return r.read()


def _get(url: str, endpoint: str, **params: Any) -> dict[str, Any]:
    return json.loads(_get_bytes(url, endpoint, **params))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(exe),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'store.db'}",
        "--artifacts-destination",
        str(tmp / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = (tmp / "server.log").open("w")
    # Own session: the server spawns a uvicorn worker; stopping the group stops both.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                _get(url, "/api/2.0/mlflow/experiments/search", max_results=1)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server not up after {STARTUP_S} s:\n{(tmp / 'server.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield url, tmp
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)  # a throwaway store: no need to wait out the job runner's shutdown
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server_run(mlflow_server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from medxfer.runall import run_all

    url, _ = mlflow_server
    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("server-data") / "d2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
        mp.setenv("MEDXFER_SYSTEM_METRICS", "0")
        result = run_all(ds.spec, ds.workspace, overrides=SERVER_RECIPE, name="server-us", force=True)
    return {"result": result, "dataset": ds, "summary": result.summary()}


def test_run_metrics_and_artifacts_are_served(mlflow_server, server_run) -> None:
    url, _ = mlflow_server
    run_id = server_run["summary"]["run_id"]
    assert server_run["summary"]["tracking_uri"] == url
    run = _get(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    # Grouped by prefix (the UI draws one section each), test CIs as tags rather than one-point charts.
    assert {
        "train/loss",
        "val/loss",
        "val/auroc",
        "lr/head",
        "time/epoch_s",
        "best/epoch",
        "test/auroc",
        "test/ece",
        "eval/threshold",
        "eval/temperature",
    } <= metrics
    assert not [k for k in metrics if "ci_" in k or ("/" not in k and not k.startswith("system"))], metrics
    history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val/loss")
    assert [m["step"] for m in history["metrics"]] == [1]  # one epoch, counted from 1 as the console counts it
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert float(tags["test/auroc_ci_low"]) <= float(tags["test/auroc_ci_high"])
    # The run overview: Source, Created by, description (written by train, completed by evaluate).
    assert tags["mlflow.source.name"] == "medxfer train" and tags["mlflow.source.type"] == "LOCAL"
    assert "mlflow.user" in tags and "mlflow.source.git.commit" in tags
    note = tags["mlflow.note.content"]
    assert "efficientnet_lite0" in note and "studies: " in note and "**Evaluation**" in note and "auroc" in note
    # The datasets panel: the spec's name, digested, studies per split and class, no paths.
    (inp,) = run["inputs"]["dataset_inputs"]
    assert inp["dataset"]["name"] == server_run["dataset"].spec.name and inp["dataset"]["digest"]
    assert "/" not in inp["dataset"]["source"].replace("mlflow.source.name", "")
    # A model-training experiment with the spec as its description (not the GenAI view).
    exp = _get(url, "/api/2.0/mlflow/experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    exp_tags = {t["key"]: t["value"] for t in exp["tags"]}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
    assert server_run["dataset"].spec.name in exp_tags["mlflow.note.content"]

    def listing(path: str) -> set[str]:
        files = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])
        return {Path(f["path"]).name for f in files}

    assert {"roc.png", "pr.png", "reliability.png", "confusion_matrix.png", "evaluation.json"} <= listing("evaluation")
    assert {"model_card.md", "model_card.json"} <= listing("model_card")
    assert any(n.endswith(".png") for n in listing("plots"))  # learning curves
    # What the UI's artifact viewer fetches:
    png = _get_bytes(url, "/get-artifact", path="evaluation/reliability.png", run_uuid=run_id)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    card = _get_bytes(url, "/get-artifact", path="model_card/model_card.md", run_uuid=run_id).decode()
    assert "server-us" in card and "AUROC" in card


def test_registered_version_alias_and_logged_model_are_served(mlflow_server, server_run) -> None:
    url, _ = mlflow_server
    s = server_run["summary"]
    rm = _get(url, "/api/2.0/mlflow/registered-models/get", name="server-us")["registered_model"]
    assert {"alias": "candidate", "version": s["model_version"]} in rm["aliases"]
    mv = _get(url, "/api/2.0/mlflow/model-versions/get", name="server-us", version=s["model_version"])
    mv = mv["model_version"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert mv["run_id"] == s["run_id"] and mv["status"] == "READY"
    assert {
        "test_auroc",
        "test_auroc_ci_low",
        "test_auroc_ci_high",
        "spec_hash",
        "labelled_content_hash",
        "split_hash",
        "git_commit",
        "weight_source",
    } <= set(tags)
    assert mv["description"].startswith("efficientnet_lite0")
    # Rounded to 4 significant digits (0.7500, not 0.749999), the exact values are in evaluation.json.
    assert all(
        len(tags[k].lstrip("0.").replace(".", "")) <= 4 for k in ("test_auroc", "test_auroc_ci_low", "threshold")
    )
    # The registered model itself: what it is for, and a few readable tags.
    assert "Intended use" in rm["description"] and "binary classifier" in rm["description"]
    rm_tags = {t["key"]: t["value"] for t in rm.get("tags", [])}
    assert rm_tags["task"] == "binary" and rm_tags["classes"] == "neg,pos" and rm_tags["dims"] == "2D"
    by_alias = _get(url, "/api/2.0/mlflow/registered-models/alias", name="server-us", alias="candidate")
    assert by_alias["model_version"]["version"] == s["model_version"]
    # The version's source is an MLflow 3 logged model linked to the training run.
    model_id = mv["source"].removeprefix("models:/")
    lm = _get(url, f"/api/2.0/mlflow/logged-models/{model_id}")["model"]
    assert lm["info"]["status"] == "LOGGED_MODEL_READY" and lm["info"]["source_run_id"] == s["run_id"]
    # ... which knows its registered version and carries the run's test metrics (the LoggedModel page agrees).
    lm_tags = {t["key"]: t["value"] for t in lm["info"]["tags"]}
    listed = [(v["name"], str(v["version"])) for v in json.loads(lm_tags["mlflow.modelVersions"])]
    assert listed == [("server-us", s["model_version"])]
    assert lm_tags["mlflow.source.name"] == "medxfer register"
    lm_metrics = {m["key"]: m["value"] for m in lm["data"]["metrics"]}
    run_metrics = {
        m["key"]: m["value"]
        for m in _get(url, "/api/2.0/mlflow/runs/get", run_id=s["run_id"])["run"]["data"]["metrics"]
    }
    assert lm_metrics["test/auroc"] == run_metrics["test/auroc"] and "eval/threshold" in lm_metrics
    # Copying them did not add points to the run's curves.
    one = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=s["run_id"], metric_key="test/auroc")
    assert len(one["metrics"]) == 1


def test_predict_downloads_the_model_over_http(
    mlflow_server, server_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd
    from medxfer.handoff.predict import predict

    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    study = write_image2d(tmp_path / "s" / "IM1")
    res = predict(
        "models:/server-us@candidate",
        [study, tmp_path / "nope"],
        tmp_path / "p.csv",
        workspace=server_run["dataset"].workspace,
    )
    df = pd.read_csv(tmp_path / "p.csv")
    assert res.model_version == server_run["summary"]["model_version"] and len(df) == 2
    assert df["error"].isna().tolist() == [True, False]


def test_no_phi_reaches_the_server(mlflow_server, server_run) -> None:
    from medxfer.io.phi import scan_for_phi

    _, tmp = mlflow_server
    assert scan_for_phi([tmp / "store.db", tmp / "artifacts"], PHI.values()) == []

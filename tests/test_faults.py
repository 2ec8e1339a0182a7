"""Concurrency and environment faults end in one line with the fix, never a traceback (issue 14).

Real parts throughout: `medxfer` processes racing on one workspace, a closed TCP port as the dead MLflow server,
a real sqlite store for the run left behind by a crash.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from helpers import make_dicom2d_dataset
from medxfer import tracking as T
from medxfer.core.errors import MedxferError, StageError
from medxfer.core.workspace import Workspace
from medxfer.tracking import tracker as tracker_mod
from medxfer.training import checkpoint as C


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medxfer", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _closed_port_uri() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused, as with a stopped server
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    mp = pytest.MonkeyPatch()
    mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("faults") / "d2", n_studies=20)
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    yield ds
    mp.undo()


def test_two_ingests_of_one_spec_at_once_both_succeed(tmp_path, monkeypatch):
    """Before: 2 of 12 pairs failed (FileNotFoundError on .scan_cache.tmp; "pseudonym key file is too short")."""
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=20)
    for i in range(3):
        ws = tmp_path / f"ws{i}"  # fresh each time: the key file is created by the race itself
        procs = [_cli("ingest", str(ds.spec.spec_path), "-w", str(ws)) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
        w = Workspace.for_spec(ws, ds.spec.name)
        assert len(pd.read_parquet(w.manifest)) == 20
        assert not [p.name for p in w.dir.iterdir() if p.name.endswith(".tmp")]


def test_dead_tracking_server_is_one_line_in_seconds(prepared, monkeypatch):
    uri = _closed_port_uri()
    for name in tracker_mod.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # a user's own setting is left alone
    t0 = time.monotonic()
    with pytest.raises(StageError) as err:
        T.Tracker(uri, "x", T.PHIGuard())
    assert time.monotonic() - t0 < 5  # MLflow's own retries took 256 s
    assert uri in str(err.value) and "unset MLFLOW_TRACKING_URI" in str(err.value)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == tracker_mod.HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]

    ds = prepared
    t0 = time.monotonic()
    p = _cli("train", str(ds.spec.spec_path), "-w", str(ds.workspace), env={"MLFLOW_TRACKING_URI": uri})
    out, errout = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in out + errout
    assert f"MLflow tracking server {uri} is not reachable" in errout
    assert time.monotonic() - t0 < 60


def test_resume_with_both_checkpoints_corrupt_ends_the_run_failed(prepared):
    from medxfer.training.stage import train

    ds = prepared
    ws = Workspace.for_spec(ds.workspace, ds.spec.name)
    # What a crash leaves: a RUNNING run whose two checkpoints were both cut short.
    crashed = T.Tracker(ws.tracking_uri, ds.spec.name, T.PHIGuard(), system_metrics=False)
    run_id = crashed.start("crashed", {T.TAG_ROLE: "main"})
    ws.run_dir(run_id).mkdir(parents=True)
    (ws.run_dir(run_id) / C.LAST).write_bytes(b"PK\x03\x04 cut")
    (ws.run_dir(run_id) / C.PREV).write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="no usable checkpoint.*marked FAILED"):
        train(ds.spec, ds.workspace, resume=True)
    run = T.get_run(ws.tracking_uri, run_id)
    assert run["status"] == "FAILED" and run["tags"][T.TAG_STATUS] == "failed"
    with pytest.raises(MedxferError, match="no unfinished"):
        train(ds.spec, ds.workspace, resume=True)  # a dead run is not offered again

"""`medxfer ui`: the real MLflow UI on a store a test wrote, started with medxfer's interpreter; the printed
command points there."""

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
from pathlib import Path

import pytest
from medxfer import tracking
from medxfer.cli import app
from typer.testing import CliRunner

STARTUP_S = 120  # ~20 s on an idle 2-core machine; generous for a loaded CI runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, **params: object) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


def test_ui_command_points_at_medxfer_ui(monkeypatch: pytest.MonkeyPatch) -> None:
    exe = str(Path(sys.executable).parent / "medxfer")
    monkeypatch.setenv("PATH", str(Path(exe).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert tracking.ui_command("sqlite:////w/medxfer-work/mlflow.db") == "medxfer ui --workspace /w/medxfer-work"
    assert tracking.ui_command("sqlite:////a b/mlflow.db") == "medxfer ui --workspace '/a b'"
    assert tracking.ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
    assert tracking.ui_command("sqlite:////x/other.db") == "MLFLOW_TRACKING_URI=sqlite:////x/other.db medxfer ui"
    # Not on PATH (a venv that is not activated, as after `make demo`): the script beside the interpreter.
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir("/")
    assert tracking.ui_command("sqlite:////w/medxfer-work/mlflow.db") == f"{exe[1:]} ui --workspace /w/medxfer-work"


def test_ui_without_a_store_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(app, ["ui", "--workspace", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "no MLflow store" in res.output and "--workspace" in res.output
    assert not (tmp_path / "nowhere").exists()  # nothing created on the way


def test_ui_serves_the_workspace_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medxfer.core.workspace import Workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "medxfer-work"
    ws.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No virtualenv on PATH, as for a user who did not activate it: a bare `mlflow ui` would not be found.
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if Path(sys.executable).parent != Path(p)
    )
    uri = Workspace.for_spec(ws, "_").tracking_uri
    assert uri == f"sqlite:///{ws / 'mlflow.db'}"
    t = tracking.Tracker(uri, "ui-spec", tracking.PHIGuard(), system_metrics=False)
    run_id = t.start("ui-run", {})
    t.log_epoch(0, {"val_auroc": 0.75})
    t.end()
    assert tracking.ui_command(uri) == f"{tracking.medxfer_executable()} ui --workspace {ws}"

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "medxfer", "ui", "--workspace", str(ws), "--port", str(port)]
    log = (tmp_path / "ui.log").open("w")
    # Own session: medxfer starts mlflow, which starts a uvicorn worker; stopping the group stops all three.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"medxfer ui exited with {proc.returncode}:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"medxfer ui not up after {STARTUP_S} s:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
            time.sleep(0.5)
        exps = _get(f"{url}/api/2.0/mlflow/experiments/search", max_results=10)["experiments"]
        assert "ui-spec" in {e["name"] for e in exps}
        run = _get(f"{url}/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["val_auroc"] == 0.75
        assert f"MLflow UI for {uri} at {url}" in (tmp_path / "ui.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
    # Stopped cleanly: the whole process group (medxfer, mlflow, its worker) is gone and the port is free again.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of `medxfer ui` outlived SIGTERM")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

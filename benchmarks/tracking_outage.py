"""Benchmark: the time a training run loses when its MLflow server dies mid-run. Target <= 10 s.

A real ``mlflow server`` (sqlite store, served artifacts) on loopback and a :class:`medxfer.tracking.Tracker`
with its workspace spool, logging one epoch's metrics per call as the Tracking callback does. The baseline is the
median of the same call while the server answers, measured in the same run. Then the server is SIGKILLed (its
whole process group, as a crash or an OOM kill): the next call pays MLflow's capped retries and switches the run
to the spool; the calls after it, and the run's end (which probes once whether the server is back), are local.
"Lost" = everything those calls took (gross: not net of what they cost online). Finally the server restarts on the same
port and store and the spool is replayed (timed; every step checked to be there once).

At the full size a second outage is measured with the server frozen (SIGSTOP: a host that vanished without a
TCP reset, packets black-holed): there each attempt waits out MLFLOW_HTTP_REQUEST_TIMEOUT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import common

TITLE = "Tracking outage: time a run loses when the MLflow server dies mid-run"
NAME = "tracking_outage"
TARGET_S = 10.0
# (online calls for the baseline, calls while the server is gone) per size
_PLAN = {"tiny": (3, 3), "quick": (10, 10), "full": (20, 20)}
METRICS = ("train/loss", "val/loss", "val/auroc", "val/balanced_accuracy", "lr/head", "time/epoch_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> float:
        t0 = time.perf_counter()
        argv = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'store.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return time.perf_counter() - t0
            except OSError:
                if self.proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    tail = (self.root / "server.log").read_text()[-500:]
                    raise common.Skip(f"mlflow server did not start: {tail}") from None
                time.sleep(0.3)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the worker may outlive the parent by a moment
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


def _epoch(step: int) -> dict[str, float]:
    return {k: 1.0 / (step + i + 1) for i, k in enumerate(METRICS)}


def outage(root: Path, n_online: int, n_gone: int, how: str) -> dict[str, Any]:
    """One run through an outage: baseline calls, the server killed (or frozen), calls into the spool, sync."""
    from medxfer import tracking

    server = _Server(root)
    startup_s = server.start()
    spool = tracking.Spool(root / "tracking-spool")
    t = tracking.Tracker(server.url, f"outage-{how}", tracking.PHIGuard(), system_metrics=False, spool=spool)
    t.start("outage", {tracking.TAG_ROLE: "main"})
    t.log_params({"lr": 0.001})
    online = []
    step = 0
    for _ in range(n_online):
        step += 1
        t0 = time.perf_counter()
        t.log_epoch(step, _epoch(step))
        online.append(time.perf_counter() - t0)
    base = common.median(online)
    server.signal(signal.SIGSTOP) if how == "frozen" else server.kill()
    gone = []
    for _ in range(n_gone):
        step += 1
        t0 = time.perf_counter()
        t.log_epoch(step, _epoch(step))
        gone.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    t.end("finished")
    end_s = time.perf_counter() - t0
    # Gross, not net of what the same calls cost online: on a loaded machine an answered call takes ~0.5 s, and
    # subtracting that would credit the outage with time it did not save.
    lost = sum(gone) + end_s
    if how == "frozen":
        server.signal(signal.SIGCONT)
        server.kill()
    server.start()
    t0 = time.perf_counter()
    rep = tracking.sync_spool(spool, server.url)
    sync_s = time.perf_counter() - t0
    from mlflow.tracking import MlflowClient

    steps = sorted(m.step for m in MlflowClient(server.url).get_metric_history(str(t.run_id), METRICS[0]))
    server.kill()
    return {
        "how": how,
        "baseline_call_s": base,
        "first_failed_call_s": gone[0],
        "spooled_call_s_median": common.median(gone[1:]) if len(gone) > 1 else None,
        "end_s": end_s,
        "lost_s": lost,
        "lost_net_s": lost - (n_gone + 1) * base,
        "sync_s": sync_s,
        "synced_entries": rep.entries,
        "steps_once": steps == list(range(1, step + 1)),
        "server_startup_s": startup_s,
    }


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.tracking.spool", "the tracking spool (medxfer.tracking.spool)")
    n_online, n_gone = _PLAN[size]
    t0 = time.perf_counter()
    from medxfer.tracking.tracker import HTTP_ENV_DEFAULTS

    settings = {k: os.environ.get(k, v) for k, v in HTTP_ENV_DEFAULTS.items()}
    cases = ["killed", "frozen"] if size == "full" else ["killed"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="medxfer-outage-", dir=common.work_dir()) as tmp:
        for how in cases:
            root = Path(tmp) / how
            root.mkdir()
            m = outage(root, n_online, n_gone, how)
            if not m["steps_once"]:
                result["status"], result["reason"] = "failed", f"{how}: a metric step was lost or doubled by sync"
            rows.append({"server": how, **{k: v for k, v in m.items() if k != "how"}})
    killed = rows[0]
    result["rows"] = rows
    result["ratios"]["seconds lost when the server is killed mid-run"] = common.ratio_entry(
        killed["lost_s"], TARGET_S, higher_is_better=False, what="s (target <= 10 s)"
    )
    result["ratios"]["first failed call / an answered call"] = common.ratio_entry(
        killed["first_failed_call_s"] / max(killed["baseline_call_s"], 1e-6), None, higher_is_better=False
    )
    result["notes"] += [
        f"MLflow client settings (medxfer's defaults unless set): {settings}",
        "MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) cost ~250 s per call to a dead server",
        "frozen (SIGSTOP) = a black-holed host: each attempt waits MLFLOW_HTTP_REQUEST_TIMEOUT; lower it if that "
        "matters more than slow uploads",
    ]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    common.script_main(run)

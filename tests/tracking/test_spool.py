"""Runs survive the tracking server: the spool's journal, its idempotent replay, and a server killed mid-epoch.

The unit tests replay into an embedded sqlite store (the same MlflowClient calls as over HTTP); the end-to-end
test kills a real ``mlflow server`` on PostgreSQL (tests/tracking/servers.py) during an epoch, lets the run finish
into the spool, restarts the server on the same port and store, runs ``medxfer sync`` and reads the run back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import CHEAP_RUN
from medxfer import tracking
from medxfer.tracking import spool as sp
from medxfer.tracking.spool import Journal, Spool
from medxfer.training.callbacks import Callback


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated empty sqlite store, copied per test: its migrations take ~8 s on a loaded 2-core machine."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    _client(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> str:
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _offline_run(uri: str, spool: Spool, epochs: int = 3) -> tracking.Tracker:
    t = tracking.Tracker(uri, "spool-exp", tracking.PHIGuard(), spool=spool, offline=True)
    t.start("spool-run", {tracking.TAG_ROLE: "main"})
    t.describe_experiment("the experiment")
    t.log_params({"lr": 0.001, "encoder": "tiny"})
    for step in range(1, epochs + 1):
        t.log_epoch(step, {"train/loss": 1.0 / step, "val/auroc": 0.5 + step / 10})
    t.log_text("hello\n", "reports/note.txt")
    t.log_dataset("spool-exp", "d" * 40, {"train": {"a": 3, "b": 2}})
    t.end("finished")
    return t


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _steps(client, run_id: str, key: str) -> list[tuple[int, int]]:
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_offline_run_is_journalled_in_order_then_replayed_once(tmp_path: Path, store: str) -> None:
    uri, spool = store, Spool(tmp_path / "tracking-spool")
    t = _offline_run(uri, spool)
    assert sp.is_local_id(t.run_id)
    assert _client(uri).get_experiment_by_name("spool-exp") is None  # the server was never asked
    entries = Journal(spool.root / str(t.run_id)).entries()
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    ops = [e["op"] for e in entries]
    assert ops[0] == "open" and ops[-1] == "end" and ops.count("batch") == 1 + 3 + 1  # params, 3 epochs, status tag
    assert ops.index("experiment_tag") < ops.index("artifact") < ops.index("dataset")
    spooled_ts = {e["metrics"][0][3]: e["metrics"][0][2] for e in entries if e["op"] == "batch" and e.get("metrics")}

    rep = tracking.sync_spool(spool, uri)
    server_id = rep.created[t.run_id]
    assert rep.runs == [server_id] and rep.skipped == 0 and not rep.left
    assert spool.resolve(str(t.run_id)) == server_id and not (spool.root / str(t.run_id)).exists()
    c = _client(uri)
    run = c.get_run(server_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "spool-run"
    assert run.info.start_time == entries[0]["start_time"] and run.info.end_time == entries[-1]["end_time"]
    assert run.data.params == {"lr": "0.001", "encoder": "tiny"}
    assert run.data.tags[tracking.TAG_STATUS] == "finished" and run.data.tags[sp.TAG_SPOOL_ID] == t.run_id
    # Every step once, with the time it was logged at (not the time of the replay).
    assert _steps(c, server_id, "train/loss") == sorted(spooled_ts.items())
    assert [a.path for a in c.list_artifacts(server_id, "reports")] == ["reports/note.txt"]
    assert c.get_experiment(run.info.experiment_id).tags[tracking.TAG_NOTE] == "the experiment"
    assert run.inputs.dataset_inputs[0].dataset.name == "spool-exp"
    # A second sync has nothing to send.
    again = tracking.sync_spool(spool, uri)
    assert again.runs == [] and again.entries == 0


@pytest.mark.parametrize("crash_at", [1, 3, 5])
def test_replay_killed_half_way_resumes_without_duplicates(
    tmp_path: Path, store: str, monkeypatch, crash_at: int
) -> None:
    """The replay dies after the server took an entry but before its ack (the worst moment); the next one
    re-sends that entry and must not double a metric point, clash on a param or create a second run."""
    uri, spool = store, Spool(tmp_path / "tracking-spool")
    t = _offline_run(uri, spool)
    real_ack, calls = Journal.ack, {"n": 0}

    def dying_ack(self: Journal, seq: int) -> None:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("replay killed")
        real_ack(self, seq)

    monkeypatch.setattr(Journal, "ack", dying_ack)
    with pytest.raises(KeyboardInterrupt):
        tracking.sync_spool(spool, uri)
    monkeypatch.setattr(Journal, "ack", real_ack)
    rep = tracking.sync_spool(spool, uri)
    c = _client(uri)
    runs = c.search_runs([c.get_experiment_by_name("spool-exp").experiment_id])
    assert len(runs) == 1, "a replay created the run twice"
    run_id = runs[0].info.run_id
    for key in ("train/loss", "val/auroc"):
        assert [s for s, _ in _steps(c, run_id, key)] == [1, 2, 3]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["lr"] == "0.001"
    assert not (spool.root / str(t.run_id)).exists() and spool.resolve(str(t.run_id)) == run_id
    # The re-sent entry (params at ack 3, epoch 2 at ack 5) was on the server already: left out, not doubled.
    assert rep.skipped == {1: 0, 3: 2, 5: 2}[crash_at]


def test_replay_killed_between_create_run_and_the_id_map_finds_its_run(tmp_path: Path, store: str, monkeypatch) -> None:
    uri, spool = store, Spool(tmp_path / "tracking-spool")
    t = _offline_run(uri, spool, epochs=1)
    real = Spool.map_run

    def dying(self: Spool, local: str, server: str) -> None:
        raise KeyboardInterrupt("killed before runs.json was written")

    monkeypatch.setattr(Spool, "map_run", dying)
    with pytest.raises(KeyboardInterrupt):
        tracking.sync_spool(spool, uri)
    monkeypatch.setattr(Spool, "map_run", real)
    rep = tracking.sync_spool(spool, uri)
    c = _client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("spool-exp").experiment_id])
    assert rep.created == {t.run_id: run.info.run_id}


def test_a_torn_last_line_is_never_replayed_and_the_journal_goes_on(tmp_path: Path) -> None:
    j = Journal(tmp_path / "run1")
    j.append({"op": "open", "uri": "x", "experiment": "e", "run_id": "run1", "local_id": "run1"})
    j.append({"op": "batch", "metrics": [["m", 1.0, 5, 1]]})
    with open(j.journal, "a") as f:
        f.write('{"seq": 2, "op": "batch", "metr')  # the process died mid-write
    assert [e["seq"] for e in Journal(j.dir).entries()] == [0, 1]
    assert j.dir.stat().st_mode & 0o777 == 0o700 and j.journal.stat().st_mode & 0o777 == 0o600


def test_what_counts_as_a_gone_server_and_no_credential_in_the_spool() -> None:
    from mlflow.exceptions import MlflowException

    gone = MlflowException(
        "API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='h', port=1): Max retries exceeded (Connection refused)"
    )
    assert sp.unreachable(gone) and sp.unreachable(ConnectionRefusedError())
    assert not sp.unreachable(MlflowException("Changing param values is not allowed", "INVALID_PARAMETER_VALUE"))
    assert not sp.unreachable(MlflowException("Permission denied", "PERMISSION_DENIED"))
    assert sp.safe_uri("https://alice:s3cret@mlflow.example.org:8443/x") == "https://mlflow.example.org:8443/x"
    assert sp.safe_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_a_spooled_run_refuses_phi_before_anything_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "tracking-spool")
    guard = tracking.PHIGuard(words=["PLANTED-ID-770011"])
    t = tracking.Tracker("sqlite:///unused.db", "e", guard, spool=spool, offline=True)
    t.start("r", {})
    with pytest.raises(tracking.PHIRefused):
        t.log_params({"note": "patient PLANTED-ID-770011"})
    assert "PLANTED-ID-770011" not in (spool.root / str(t.run_id) / sp.JOURNAL).read_text()


def test_the_next_stage_syncs_first_and_finds_an_offline_run_by_its_local_id(tmp_path: Path, store: str) -> None:
    """What evaluate and register call before they read a run: the spool goes out, the local id maps, and the
    run folder (named by the local id) is reachable under the server's id, where those stages look."""
    t = tracking.Tracker(store, "spec1", tracking.PHIGuard(), spool=Spool.for_workspace(tmp_path), offline=True)
    local = str(t.start("r", {tracking.TAG_SPEC: "spec1"}))
    (tmp_path / "spec1" / "runs" / local).mkdir(parents=True)
    (tmp_path / "spec1" / "runs" / local / "best.pt").write_bytes(b"weights")
    t.log_epoch(1, {"val/loss": 0.5})
    t.end("finished")
    server_id = tracking.sync_workspace(tmp_path, store, local)
    assert server_id != local and _client(store).get_run(server_id).info.status == "FINISHED"
    assert (tmp_path / "spec1" / "runs" / server_id / "best.pt").read_bytes() == b"weights"
    assert tracking.sync_workspace(tmp_path, store, server_id) == server_id  # nothing left: no server call needed


def test_a_dead_server_at_the_start_fails_at_once_naming_the_offline_flag(tmp_path: Path) -> None:
    import socket
    import time

    from medxfer.core.errors import StageError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends: connection refused
    t0 = time.monotonic()
    with pytest.raises(StageError, match=r"not reachable.*--offline-tracking") as err:
        tracking.Tracker(uri, "e", tracking.PHIGuard(), spool=Spool.for_workspace(tmp_path))
    assert uri in str(err.value) and time.monotonic() - t0 < 5
    assert not (tmp_path / sp.SPOOL_DIR).exists()  # refused, not silently spooled


def test_cli_has_sync_and_the_offline_flag() -> None:
    from medxfer.cli import app
    from typer.testing import CliRunner

    for cmd in (["train", "--help"], ["run", "--help"]):
        assert "--offline-tracking" in CliRunner().invoke(app, cmd).output
    assert "spooled" in CliRunner().invoke(app, ["sync", "--help"]).output


# --- end to end: a real server on PostgreSQL, killed during an epoch -------------------------------------------------
KILL_RECIPE = ["epochs=2", *CHEAP_RUN]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    from servers import tracking_stack

    with tracking_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


class KillServerDuringEpoch(Callback):
    """SIGKILL the whole server (no flush, as a crash or an OOM kill) at the first optimiser step of `epoch`."""

    def __init__(self, server, epoch: int):
        self.server, self.epoch, self.current, self.killed = server, epoch, -1, False

    def on_epoch_start(self, fit, epoch: int) -> None:
        self.current = epoch

    def on_step_end(self, fit, loss_sum, seen: int) -> None:
        if self.current == self.epoch and not self.killed:
            self.server.stop(kill=True)
            self.killed = True


def test_server_killed_mid_epoch_run_finishes_then_sync_restores_it_exactly(stack, tmp_path: Path, monkeypatch) -> None:
    from helpers import make_dicom2d_dataset
    from medxfer.cli import app
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.io.phi import scan_for_phi
    from medxfer.training.stage import train
    from servers import rest
    from typer.testing import CliRunner

    ds = make_dicom2d_dataset(tmp_path / "d2", n_studies=20)  # as tests/test_faults.py: the fewest that train
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    killer = KillServerDuringEpoch(stack.server, epoch=1)
    res = train(ds.spec, ds.workspace, overrides=KILL_RECIPE, callbacks=[killer])
    assert killer.killed and res.main.epochs == 2 and len(res.main.history) == 2  # training went on
    run_id = str(res.run_id)
    spool = Spool.for_workspace(ds.workspace)
    journal = spool.journal(run_id)
    ops = [e["op"] for e in journal.entries()]
    assert ops[0] == "open" and ops[-1] == "end" and "artifact" in ops  # epoch 2, curves, best.pt, the end
    # The spool holds no PHI and no credential of the stack.
    assert scan_for_phi(spool.root, ds.phi) == []
    assert scan_for_phi(spool.root, stack.secrets) == []
    # The run lost only what the one call that found the server gone cost (MLflow's capped retries: ~2.4 s).
    assert journal.entries()[0]["outage_s"] < 10

    # Server down: sync says so in one line; then back on the same port and store, and sync sends everything.
    out = CliRunner().invoke(app, ["sync", "--workspace", str(ds.workspace)])
    assert out.exit_code != 0 and "not reachable" in out.output and "Traceback" not in out.output
    stack.server.start()
    out = CliRunner().invoke(app, ["sync", "--workspace", str(ds.workspace), "--json"])
    assert out.exit_code == 0, out.output
    assert not journal.dir.exists()  # the run ended and every entry was acknowledged

    status, body = rest(stack.url, "/api/2.0/mlflow/runs/get", run_id=run_id)
    assert status == 200, body
    run = body["run"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert tags[tracking.TAG_STATUS] == "finished" and params["epochs"] == "2" and "model.encoder" in params
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/loss", "val/loss", "val/auroc", "lr/head", "best/epoch"} <= keys
    for key in sorted(keys):
        _, hist = rest(stack.url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)
        steps = sorted(m["step"] for m in hist["metrics"])
        if key.startswith("best/"):
            assert len(steps) == 1, (key, steps)
        else:
            assert steps == [1, 2], (key, steps)  # every epoch exactly once: none lost, none doubled

    def listing(path: str = "") -> set[str]:
        _, got = rest(stack.url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path)
        return {f["path"] for f in got.get("files", [])}

    assert {"recipe.yaml", "history.json", "plots", "checkpoints", "reports"} <= listing()
    assert "checkpoints/best.pt" in listing("checkpoints")
    assert any(p.endswith(".png") for p in listing("plots"))
    assert len(rest(stack.url, "/get-artifact", path="history.json", run_uuid=run_id)[1]) == 2  # the epochs' rows
    # Nothing of the planted PHI or the stack's credentials reached PostgreSQL either.
    assert scan_for_phi(stack.pg.dump("mlflow"), ds.phi) == []

"""The tracking spool: what a run could not send to MLflow, kept in the workspace until ``medxfer sync`` replays it.

A :class:`~medxfer.tracking.tracker.Tracker` with a spool sends to the server while it answers; from the first
call that finds it gone (refused, timed out, 5xx after MLflow's retries) every later call of that run is
appended here instead, in order, and training goes on. ``--offline-tracking`` spools from the start, under a
local run id (``offline-...``) that the replay maps to the run it creates on the server. Layout::

    <workspace>/tracking-spool/
        runs.json                  local run id -> the server's run id, once a replay created the run
        <key>/journal.jsonl        one entry per line, appended and fsync'd in the order the run made them
        <key>/acked                the seq of each entry the server acknowledged on replay (appended, fsync'd)
        <key>/files/<seq>/<name>   artifacts, copied when they were logged (the caller's temp file goes away)
        <key>/.lock                one replayer at a time (flock)

``<key>`` is the server's run id when the server went away mid-run, the local id when the run started offline.
Everything here passed the run's PHI guard before it was written (the same strings MLflow would have got), and
the tracking URI is recorded without user:password. mlflow is imported only by the replay.

Replay is idempotent, so a replay killed half-way is simply run again: an acknowledged entry is skipped; the one
entry that may have reached the server without its ack is re-sent so that it cannot duplicate anything: metric
points already on the server (same key, step and timestamp) and params with the same value are left out, tags
and artifacts overwrite themselves, and a run created offline carries ``medxfer.spool_id`` so it is found, not
created twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPOOL_DIR = "tracking-spool"
JOURNAL = "journal.jsonl"
ACKED = "acked"
RUN_MAP = "runs.json"
LOCAL_PREFIX = "offline-"
TAG_SPOOL_ID = "medxfer.spool_id"  # on a run created by a replay: the local id it was spooled under
# Tags whose value is a run id: a run spooled offline may name another one (a control arm names its parent).
RUN_ID_TAGS = ("mlflow.parentRunId", "medxfer.control_run_id")
# MLflow's log_batch limits (mlflow.utils.validation): per call, 1000 metrics, 100 params, 100 tags, 1000 in all
MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_TAGS_PER_CALL = 100
MAX_ENTITIES_PER_CALL = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def new_local_id() -> str:
    return LOCAL_PREFIX + uuid.uuid4().hex


def is_local_id(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(LOCAL_PREFIX)


def safe_uri(uri: str) -> str:
    """The URI without user:password (``http://u:p@host`` is a valid MLflow URI): the spool holds no credential."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def unreachable(exc: BaseException) -> bool:
    """True when `exc` says the server did not answer (refused, reset, timed out, 502/503/504 after MLflow's
    retries), not that it answered no: a refused param change or a 403 must still fail the call."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError", "RetryError"):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        msg = str(e)
        # mlflow.utils.rest_utils.http_request wraps every transport failure (and retries exhausted on 5xx) so.
        if msg.startswith("API request to") and ("failed with exception" in msg or "timeout exception" in msg):
            return True
        if getattr(e, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
            return True
        e = e.__cause__ or e.__context__
    return False


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _append_line(path: Path, line: str) -> None:
    """One whole line, on disk when this returns: a crash leaves at most a torn last line, which readers skip."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# --- one run's journal -----------------------------------------------------------------------------------------------
class Journal:
    """The spooled calls of one run, in order. Entries are dicts with ``seq`` and ``op`` (see :func:`apply`)."""

    def __init__(self, path: Path):
        self.dir = Path(path)
        self.key = self.dir.name
        self._seq: int | None = None

    @property
    def journal(self) -> Path:
        return self.dir / JOURNAL

    def exists(self) -> bool:
        return self.journal.is_file()

    def entries(self) -> list[dict[str, Any]]:
        if not self.journal.is_file():
            return []
        out = []
        for line in self.journal.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the torn last line of a crash mid-append: never acknowledged
                break
        return out

    def acked(self) -> set[int]:
        path = self.dir / ACKED
        if not path.is_file():
            return set()
        return {int(s) for s in path.read_text().split() if s.isdigit()}

    def ack(self, seq: int) -> None:
        _append_line(self.dir / ACKED, str(int(seq)))

    def open_entry(self) -> dict[str, Any]:
        entries = self.entries()
        if not entries or entries[0].get("op") != "open":
            raise ValueError(f"spool journal {self.journal} does not start with its run")
        return entries[0]

    def append(self, entry: Mapping[str, Any], files: Sequence[Path] = ()) -> dict[str, Any]:
        """Write `entry` (and copies of `files`, named in it as ``files``) as the next seq; returns what was written."""
        if self._seq is None:
            entries = self.entries()
            self._seq = (entries[-1]["seq"] + 1) if entries else 0
        seq = self._seq
        first = seq == 0
        if first:  # owner only, as the workspace's pseudonym key: run details stay the operator's
            self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
        out = {"seq": seq, **entry}
        if files:
            folder = self.dir / "files" / str(seq)
            folder.mkdir(parents=True, exist_ok=True)
            copied = []
            for f in files:
                dst = folder / Path(f).name
                shutil.copyfile(f, dst)
                os.chmod(dst, 0o600)
                with open(dst, "rb") as fh:
                    os.fsync(fh.fileno())
                copied.append(str(dst.relative_to(self.dir)))
            _fsync_dir(folder)
            out["files"] = copied
        _append_line(self.journal, json.dumps(out, sort_keys=True))
        if first:
            _fsync_dir(self.dir.parent)
        self._seq = seq + 1
        return out

    def pending(self) -> list[dict[str, Any]]:
        done = self.acked()
        return [e for e in self.entries() if e["seq"] not in done]

    def ended(self) -> bool:
        entries = self.entries()
        return bool(entries) and entries[-1].get("op") == "end"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the journal was finished and removed by another sync: nothing to lock
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a second `medxfer sync` waits for the first instead of racing it
            yield
        finally:
            os.close(fd)


# --- the spool folder ------------------------------------------------------------------------------------------------
class Spool:
    """``<workspace>/tracking-spool``: the journals of every run that spooled, and the local -> server id map."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_workspace(cls, workspace: str | Path) -> Spool:
        return cls(Path(workspace).resolve() / SPOOL_DIR)

    def journal(self, key: str) -> Journal:
        return Journal(self.root / key)

    def journals(self) -> list[Journal]:
        """Journals with an open entry, oldest run first (a control arm's parent is created before it)."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            j = Journal(d)
            if d.is_dir() and j.exists():
                try:
                    found.append((j.open_entry().get("created_ms", 0), j.key, j))
                except ValueError:
                    continue
        return [j for _, _, j in sorted(found, key=lambda t: (t[0], t[1]))]

    def pending(self, uri: str | None = None) -> list[Journal]:
        """Journals with entries the server has not acknowledged (only those spooled for `uri`, when given)."""
        target = None if uri is None else safe_uri(uri)
        return [j for j in self.journals() if j.pending() and target in (None, j.open_entry().get("uri"))]

    def run_map(self) -> dict[str, str]:
        path = self.root / RUN_MAP
        return json.loads(path.read_text()) if path.is_file() else {}

    def map_run(self, local_id: str, server_id: str) -> None:
        m = self.run_map()
        m[local_id] = server_id
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{RUN_MAP}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / RUN_MAP)

    def resolve(self, run_id: str) -> str:
        """The server's id of `run_id` (itself unless it is a local id that a replay mapped)."""
        return self.run_map().get(run_id, run_id) if is_local_id(run_id) else run_id


# --- applying entries (live, or replayed) ----------------------------------------------------------------------------
@dataclass
class Replay:
    """What one replay did; `skipped` counts metric points and params that the server already had."""

    runs: list[str] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # local id -> server id
    entries: int = 0
    metrics: int = 0
    skipped: int = 0
    left: list[str] = field(default_factory=list)  # journals not finished (e.g. the run is still training)
    elsewhere: dict[str, str] = field(default_factory=dict)  # run -> the other server it was spooled for

    def summary(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "created": self.created,
            "entries": self.entries,
            "metrics": self.metrics,
            "skipped_duplicates": self.skipped,
            "unfinished": self.left,
            "spooled_for_other_servers": self.elsewhere,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        other = [
            (f"run {k}", f"spooled for {u}: set MLFLOW_TRACKING_URI to it and sync") for k, u in self.elsewhere.items()
        ]
        if not self.runs:
            return "sync", [("spool", "nothing to send to this server"), *other]
        rows = [("runs", ", ".join(self.runs)), ("entries sent", str(self.entries))]
        rows.append(("metric points", f"{self.metrics} sent, {self.skipped} already on the server (left out)"))
        rows += [(f"created {local}", server) for local, server in self.created.items()]
        if self.left:
            rows.append(("still open", ", ".join(self.left) + " (still training, or ended without its last call)"))
        return "sync", rows + other


class _Seen:
    """What the server already holds for one run, read once per replay: metric (step, timestamp) per key, params."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self._metrics: dict[str, set[tuple[int, int]]] = {}
        self._params: dict[str, str] | None = None

    def metric_points(self, key: str) -> set[tuple[int, int]]:
        if key not in self._metrics:
            hist = self.client.get_metric_history(self.run_id, key)
            self._metrics[key] = {(int(m.step), int(m.timestamp)) for m in hist}
        return self._metrics[key]

    def params(self) -> dict[str, str]:
        if self._params is None:
            self._params = dict(self.client.get_run(self.run_id).data.params)
        return self._params


def apply(
    client: Any,
    run_id: str,
    entry: Mapping[str, Any],
    *,
    base: Path | None = None,
    experiment_id: Callable[[], str] | None = None,
    seen: _Seen | None = None,
    stats: Replay | None = None,
) -> None:
    """Send one entry to MLflow. Live calls pass files by their own path (`base` None); a replay passes its
    journal folder as `base` and a `seen` that leaves out what the server already has."""
    from mlflow.entities import Metric, Param, RunTag

    op = entry["op"]
    if op == "batch":
        params = dict(entry.get("params") or {})
        metrics = [tuple(m) for m in entry.get("metrics") or []]
        if seen is not None:
            have = seen.params() if params else {}
            kept = {k: v for k, v in params.items() if have.get(k) != v}
            n_before = len(metrics)
            metrics = [m for m in metrics if (int(m[3]), int(m[2])) not in seen.metric_points(m[0])]
            if stats is not None:
                stats.skipped += (len(params) - len(kept)) + (n_before - len(metrics))
            params = kept
        tags = [RunTag(k, v) for k, v in (entry.get("tags") or {}).items()]
        ms = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in metrics]
        for m, p, t in batch_calls(ms, [Param(k, v) for k, v in params.items()], tags):
            client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)
        if seen is not None:
            seen.params().update(params)
            for k, _v, ts, step in metrics:
                seen.metric_points(k).add((int(step), int(ts)))
        if stats is not None:
            stats.metrics += len(ms)
    elif op == "artifact":
        for f in entry["files"]:
            path = Path(f) if base is None else base / f
            client.log_artifact(run_id, str(path), artifact_path=entry.get("artifact_path"))
    elif op == "experiment_tag":
        assert experiment_id is not None
        client.set_experiment_tag(experiment_id(), entry["key"], entry["value"])
    elif op == "dataset":
        _log_dataset(client, run_id, entry)
    elif op == "status":
        client.update_run(run_id, status=entry["status"])
    elif op == "end":
        client.set_terminated(run_id, status=entry["status"], end_time=entry.get("end_time"))
    elif op != "open":
        raise ValueError(f"unknown spool entry {op!r}")


def batch_calls(metrics: Sequence[Any], params: Sequence[Any], tags: Sequence[Any]) -> list[tuple[list, list, list]]:
    """(metrics, params, tags) per log_batch call, each within MLflow's limits, as few calls as they allow."""
    calls = []
    m, p, t = list(metrics), list(params), list(tags)
    while m or p or t:
        cp, ct = p[:MAX_PARAMS_TAGS_PER_CALL], t[:MAX_PARAMS_TAGS_PER_CALL]
        cm = m[: min(MAX_METRICS_PER_CALL, MAX_ENTITIES_PER_CALL - len(cp) - len(ct))]
        calls.append((cm, cp, ct))
        m, p, t = m[len(cm) :], p[len(cp) :], t[len(ct) :]
    return calls


def _log_dataset(client: Any, run_id: str, entry: Mapping[str, Any]) -> None:
    """The run's datasets panel (see Tracker.log_dataset), rebuilt from the rows the entry carries."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    source = CodeDatasetSource(tags={"mlflow.source.name": entry.get("source", "medxfer split")})
    with warnings.catch_warnings():  # MLflow warns about int columns that could hold missing values
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_pandas(
            pd.DataFrame(entry["rows"]), source=source, name=entry["name"], digest=entry["digest"][:36]
        )
        entity = ds._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", entry["context"])])])


# --- replay ----------------------------------------------------------------------------------------------------------
def _server_run(spool: Spool, client: Any, j: Journal, experiment_id: Callable[[str], str], stats: Replay) -> str:
    """The server's run for journal `j`: its own id, or (offline) the run a replay created, found or made now."""
    head = j.open_entry()
    if head.get("run_id"):
        return str(head["run_id"])
    local = head["local_id"]
    mapped = spool.run_map().get(local)
    if mapped:
        return mapped
    exp_id = experiment_id(head["experiment"])
    # A replay killed between create_run and writing runs.json left a run tagged with this local id.
    found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_SPOOL_ID}` = '{local}'", max_results=1)
    if found:
        server_id = found[0].info.run_id
    else:
        tags = {k: _map_id(spool, k, v) for k, v in (head.get("tags") or {}).items()}
        run = client.create_run(
            exp_id,
            start_time=head.get("start_time"),
            tags={**tags, TAG_SPOOL_ID: local},
            run_name=head.get("run_name"),
        )
        server_id = run.info.run_id
    spool.map_run(local, server_id)
    stats.created[local] = server_id
    _link_run_dir(spool, head, server_id)
    return server_id


def _link_run_dir(spool: Spool, head: Mapping[str, Any], server_id: str) -> None:
    """``runs/<server id>`` -> ``runs/<local id>``: evaluate and register find the checkpoint by the run's id."""
    rel = head.get("run_dir")
    if not rel:
        return
    local_dir = spool.root.parent / rel
    link = local_dir.with_name(server_id)
    if local_dir.is_dir() and not link.exists():
        with contextlib.suppress(OSError):
            link.symlink_to(local_dir.name, target_is_directory=True)


def _map_id(spool: Spool, key: str, value: Any) -> Any:
    return spool.resolve(str(value)) if key in RUN_ID_TAGS and is_local_id(str(value)) else value


def replay(
    spool: Spool,
    client: Any,
    uri: str,
    experiment_id: Callable[[str], str],
    only: str | None = None,
) -> Replay:
    """Send every journal's unacknowledged entries to the server at `uri`, oldest run first, in order.

    Journals spooled for another server are left alone; a finished one (its run ended and every entry acknowledged)
    is removed, its local -> server id kept in runs.json. `only` limits the replay to one run (local or server id).
    """
    stats = Replay()
    journals = spool.pending(uri)
    mine = {j.key for j in journals}
    stats.elsewhere = {j.key: j.open_entry().get("uri", "?") for j in spool.pending() if j.key not in mine}
    if only is not None:
        wanted = {only, spool.resolve(only)}
        journals = [j for j in journals if j.key in wanted or j.open_entry().get("run_id") in wanted]
    ids: dict[str, str] = {}
    for j in journals:  # every run exists before any tag names one (a control arm's parent id)
        with j.locked():
            if j.exists():  # else a concurrent sync finished it meanwhile
                ids[j.key] = _server_run(spool, client, j, experiment_id, stats)
    for j in journals:
        if j.key not in ids:
            continue
        run_id = ids[j.key]
        seen = _Seen(client, run_id)
        with j.locked():
            if not j.exists():
                continue
            head = j.open_entry()
            for e in j.pending():
                if e["op"] == "batch" and e.get("tags"):
                    e = {**e, "tags": {k: _map_id(spool, k, v) for k, v in e["tags"].items()}}
                apply(
                    client,
                    run_id,
                    e,
                    base=j.dir,
                    experiment_id=lambda h=head: experiment_id(h["experiment"]),
                    seen=seen,
                    stats=stats,
                )
                j.ack(e["seq"])
                stats.entries += 1
            stats.runs.append(run_id)
            if j.ended() and not j.pending():
                shutil.rmtree(j.dir, ignore_errors=True)
            else:
                stats.left.append(run_id)
    return stats

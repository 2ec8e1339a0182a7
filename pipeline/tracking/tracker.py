"""MLflow runs: the Tracker (one run), finding and reading runs back, and the environment facts a run records.

Every string a Tracker writes passes its :class:`medxfer.tracking.guard.PHIGuard`. mlflow is imported
inside functions so ``medxfer --help`` and stages that do not track stay fast; registered models are
:mod:`medxfer.tracking.model_registry`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from medxfer.core.errors import StageError
from medxfer.tracking.guard import PHIGuard
from medxfer.tracking.spool import MAX_PARAMS_TAGS_PER_CALL, Journal, Spool

TAG_STATUS = "medxfer.status"  # running | finished | failed | interrupted
TAG_ROLE = "medxfer.role"  # main | control
TAG_CONTROL = "medxfer.control"  # scratch | probe (on both the parent and the control run)
TAG_CONTROL_RUN = "medxfer.control_run_id"  # on the parent
TAG_SPEC = "medxfer.spec"
PACKAGES = (
    "medxfer",
    "torch",
    "torchvision",
    "monai",
    "timm",
    "mlflow",
    "numpy",
    "pydicom",
    "nibabel",
    "albumentations",
    "scikit-learn",
)
MAX_PARAMS_PER_CALL = MAX_PARAMS_TAGS_PER_CALL  # MLflow's log_batch limit; spool.batch_calls splits by it
# Tags MLflow's UI reads. The values mirror mlflow.utils.mlflow_tags (tests/tracking pins them to MLflow's own
# constants); spelt out here so `import medxfer.tracking` does not import mlflow.
TAG_NOTE = "mlflow.note.content"  # MLFLOW_RUN_NOTE: the description of a run, and of an experiment
TAG_SOURCE_NAME = "mlflow.source.name"  # MLFLOW_SOURCE_NAME
TAG_SOURCE_TYPE = "mlflow.source.type"  # MLFLOW_SOURCE_TYPE
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLFLOW_GIT_COMMIT
TAG_GIT_DIRTY = "mlflow.source.git.dirty"  # MLFLOW_GIT_DIRTY
TAG_USER = "mlflow.user"  # MLFLOW_USER: the UI's "Created by"
TAG_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # MLFLOW_LOGGED_ARTIFACTS: tables the UI renders as tables
TAG_DATASET_CONTEXT = "mlflow.data.context"  # MLFLOW_DATASET_CONTEXT
# MLflow 3.17 has no Python constant for the experiment kind: the UI's enum (ExperimentKind in its JS bundle)
# reads the tag, and without it infers a GenAI experiment from an "evaluation" run (issue 15).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# --- environment facts -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout medxfer runs from, with "-dirty" when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local sqlite store (MLflow would otherwise write ./mlruns in the current folder)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def ui_command(tracking_uri: str) -> str:
    """What a stage summary tells the user to run to browse this store: ``medxfer ui``, which starts MLflow with
    medxfer's own interpreter (a bare ``mlflow ui`` fails when mlflow lives in a virtualenv that is not on PATH)."""
    import shlex

    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    exe = medxfer_executable()
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("sqlite:///") and db.name == "mlflow.db":
        return f"{exe} ui --workspace {shlex.quote(str(db.parent))}"  # the workspace's own store
    return f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} {exe} ui"


def medxfer_executable() -> str:
    """``medxfer`` when that is what PATH finds for this interpreter, else the console script beside it (e.g.
    ``.venv/bin/medxfer`` after ``make demo``, whose venv is not activated), so the printed command runs as given."""
    import shlex
    import shutil
    import sys

    script = Path(sys.executable).parent / "medxfer"
    found = shutil.which("medxfer")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "medxfer"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def ui_server_argv(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """``python -m mlflow ui`` on this store with the running interpreter (mlflow is imported by that process,
    not here). Artifacts of a sqlite store are served from where the store puts them (``mlartifacts/``)."""
    import sys

    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host]
    root = default_artifact_root(tracking_uri)
    if root is not None:
        argv += ["--default-artifact-root", root]
    return [*argv, "--port", str(int(port))]


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


# MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) made a dead server cost 256 s of silence
# before `Max retries exceeded`. These make it cost seconds; a user's own setting wins.
# MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT: set_terminated would GET the whole run again only to print a "View run"
# link, one more authenticated request per run (~0.3 s of server CPU under basic-auth); the stage summary says
# where the run is.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
PROBE_TIMEOUT_ENV = "MEDXFER_TRACKING_PROBE_TIMEOUT_S"
PROBE_TIMEOUT_S = 4.0
_REACHABLE: set[str] = set()


def check_reachable(tracking_uri: str, timeout_s: float | None = None) -> None:
    """Fail in seconds, with the fix, when an http(s) tracking server does not answer; other URIs pass.

    One GET of ``<uri>/health`` per URI and process (the MLflow server answers it without touching its store);
    any HTTP answer, even an error status, proves a server listens, so only a failed connection refuses.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    check_credentials(tracking_uri)
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if tracking_uri in _REACHABLE:
        return
    import urllib.error
    import urllib.request

    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(PROBE_TIMEOUT_ENV) or PROBE_TIMEOUT_S)
        except ValueError:
            timeout_s = PROBE_TIMEOUT_S
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # a server answered
    except (OSError, ValueError) as exc:  # URLError, refused, timed out, bad host
        reason = getattr(exc, "reason", exc)
        raise StageError(
            f"MLflow tracking server {tracking_uri} is not reachable ({reason}); fix: start the server, or "
            "unset MLFLOW_TRACKING_URI to use the workspace's sqlite store"
        ) from None
    _REACHABLE.add(tracking_uri)


# --- credentials and permissions (a team's server running MLflow's basic-auth app; docs/deploy.md) ----------------
# Credentials come only from where MLflow itself reads them: these variables, else its credentials file. Never from
# the spec, the command line or the tracking URI, so no summary, log or run tag can carry them.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CREDENTIALS_FILE = "~/.mlflow/credentials"  # mlflow.utils.credentials._get_credentials_path


def check_credentials(tracking_uri: str) -> None:
    """Refuse a tracking URI with a user or password in it, and a credentials file other users can read."""
    import stat
    import urllib.parse

    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.username is not None or parts.password is not None:
        bare = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        raise StageError(
            f"MLFLOW_TRACKING_URI carries credentials; fix: set it to {bare} and put the user and password in "
            f"{' / '.join(CREDENTIAL_ENV)} or {CREDENTIALS_FILE} (mode 0600)"
        )
    path = Path(os.path.expanduser(CREDENTIALS_FILE))
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StageError(
            f"{path} holds MLflow credentials and other users can read it (mode {stat.S_IMODE(mode):04o}); "
            f"fix: chmod 600 {path}"
        )


def _user() -> str | None:
    with contextlib.suppress(Exception):
        from mlflow.utils.credentials import read_mlflow_creds

        return read_mlflow_creds().username
    return None


def _http_status(exc: BaseException) -> int | None:
    """401/403 from an MLflow REST call (MlflowException) or an artifact transfer (requests' HTTPError)."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(code, int):
        return code
    error_code = getattr(exc, "error_code", None)
    return {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}.get(str(error_code))


def needed_permission(method: str, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> str:
    """What MLflow's basic-auth wants for one client call, in the words of its permission table (READ < USE <
    EDIT < MANAGE, per experiment or registered model)."""
    kwargs = kwargs or {}
    name = kwargs.get("name", args[0] if args else None)
    if method == "create_experiment":
        return "the right to create experiments (or ask the admin to create it and grant you EDIT on it)"
    if "registered_model" in method or "model_version" in method:
        target = f"registered model {name!r}" if isinstance(name, str) else "the registered model"
        if method == "create_registered_model":
            return "the right to create registered models"
        if method.startswith("delete"):
            return f"MANAGE on {target}"
        if method.startswith(("get", "search")):
            return f"READ on {target}"
        return f"EDIT on {target} (MANAGE to grant it to others)"
    if method.startswith(("get", "search", "list", "download")):
        return "READ on the experiment"
    return "EDIT on the experiment (the run and its logged models)"


def permission_error(exc: BaseException, tracking_uri: str, needs: str) -> StageError | None:
    """A one-line error for an MLflow server's 401/403 (None for any other failure)."""
    status = _http_status(exc)
    if status == 401:
        user = _user()
        who = f"user {user!r} with the given password" if user else "no credentials"
        return StageError(
            f"MLflow server {tracking_uri} refused {who} (401 not authenticated); fix: set "
            f"{' and '.join(CREDENTIAL_ENV)} (or {CREDENTIALS_FILE}, mode 0600) to an account on that server"
        )
    if status == 403:
        return StageError(
            f"MLflow server {tracking_uri} denied user {_user()!r} (403): this needs {needs}; fix: ask the "
            "server's admin to grant it (docs/deploy.md, Permissions)"
        )
    return None


@contextlib.contextmanager
def permission_errors(tracking_uri: str, needs: str):
    """Around MLflow calls that bypass :func:`_client` (fluent logging, downloads): 401/403 as a StageError."""
    try:
        yield
    except Exception as exc:
        err = permission_error(exc, tracking_uri, needs)
        if err is None:
            raise
        raise err from None


class _AuthErrors:
    """An MlflowClient whose 401/403 answers become one-line StageErrors naming the missing permission."""

    def __init__(self, client: Any, tracking_uri: str):
        self._inner = client
        self._uri = tracking_uri

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if not callable(value) or attr.startswith("_"):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except Exception as exc:
                err = permission_error(exc, self._uri, needed_permission(attr, args, kwargs))
                if err is None:
                    raise
                raise err from None

        return call


def _client(tracking_uri: str):
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    client = MlflowClient(tracking_uri=tracking_uri)
    return _AuthErrors(client, tracking_uri) if tracking_uri.startswith(("http://", "https://")) else client


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created as a model-training experiment (the UI's kind tag) when it is new."""
    return _experiment(tracking_uri, name)[0]


def _experiment(tracking_uri: str, name: str) -> tuple[str, dict[str, str]]:
    """(id, tags) of the experiment, made as :func:`experiment_id` says: one lookup gives both."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        tags = dict(exp.tags)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if TAG_EXPERIMENT_KIND not in tags:  # made by an older medxfer: the UI would guess GenAI
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
            tags[TAG_EXPERIMENT_KIND] = EXPERIMENT_KIND
        return exp.experiment_id, tags
    tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(tracking_uri), tags=tags), tags
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id, dict(exp.tags)


def source_tags(entry_point: str) -> dict[str, str]:
    """What the run overview shows as Source and Created by: the command, the commit, the operator's login."""
    import getpass

    tags = {TAG_SOURCE_NAME: entry_point, TAG_SOURCE_TYPE: "LOCAL"}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags[TAG_GIT_DIRTY] = str(commit.endswith("-dirty")).lower()
    with contextlib.suppress(KeyError, OSError):  # no login name in a container without a passwd entry
        tags[TAG_USER] = getpass.getuser()
    return tags


def find_unfinished_runs(
    tracking_uri: str, experiment: str, role: str = "main", parent_run_id: str | None = None, max_results: int = 20
) -> list[str]:
    """Runs of this experiment that started but did not finish (killed, crashed, interrupted), newest first."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = f"tags.`{TAG_ROLE}` = '{role}' and tags.`{TAG_STATUS}` != 'finished'"
    if parent_run_id is not None:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = client.search_runs(
        [exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=max_results
    )
    return [r.info.run_id for r in runs]


def find_unfinished_run(
    tracking_uri: str, experiment: str, role: str = "main", parent_run_id: str | None = None
) -> str | None:
    runs = find_unfinished_runs(tracking_uri, experiment, role, parent_run_id, max_results=1)
    return runs[0] if runs else None


def run_tags(tracking_uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(tracking_uri).get_run(run_id).data.tags)


# --- a run -----------------------------------------------------------------------------------------------------------
# System metrics (MLflow's CPU, memory, disk, network and GPU monitors, a sample every 10 s) ride on the run's own
# log_batch calls. MLflow's monitor thread made two requests per sample (a get_run to see whether the run still
# runs, then a log_batch): against a basic-auth server each costs a password hash (~0.3 s of server CPU, measured),
# 19 of the 43 requests of a 3-epoch quick benchmark run. Queued here, a sample waits for the next epoch's batch, or
# at most SYSTEM_METRICS_MAX_DELAY_S; the steps and timestamps are MLflow's.
SYSTEM_METRICS_MAX_DELAY_S = 60.0
SYSTEM_METRICS_MAX_QUEUED = 500  # points: a short sampling interval (tests use 0.1 s) must not grow one batch


def _system_monitor(tracker: Tracker, resume: bool) -> Any:
    """MLflow's SystemMetricsMonitor (its monitors, intervals, node id and resumed step count) whose samples go to
    ``tracker._record_system`` instead of their own requests; it stops when the Tracker ends the run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class _Sink:
        data: list = []  # what MLflow's finish() reads of its own BatchMetricsLogger

        def record_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            tracker._record_system(metrics, int(step or 0))

        def flush(self) -> None:  # the Tracker's next batch (at the latest, the one end() sends) takes the queue
            pass

    class _Monitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            log = logging.getLogger(__name__)
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return  # as MLflow's loop: a sample cut short by the end is not logged
                try:
                    self.publish_metrics(self.aggregate_metrics())
                except Exception as exc:  # a refused name, a 403: the run goes on without them
                    log.warning("system metrics stopped: %s", type(exc).__name__)
                    return

    monitor = _Monitor(tracker.run_id, resume_logging=resume, tracking_uri=tracker.uri)
    monitor.mlflow_logger = _Sink()
    return monitor


class Tracker:
    """One MLflow run. With ``enabled=False`` (DDP ranks other than 0) every method is a no-op.

    With a `spool` (:mod:`medxfer.tracking.spool`), a server that stops answering mid-run does not stop training:
    that call and every later one of the run are journalled in the workspace, in order, for ``medxfer sync``.
    ``offline=True`` journals from the start under a local run id and never contacts the server.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        guard: PHIGuard,
        enabled: bool = True,
        system_metrics: bool = True,
        spool: Spool | None = None,
        offline: bool = False,
    ):
        if offline and spool is None:
            raise ValueError("offline tracking needs a spool")
        self.uri = tracking_uri
        self.experiment = experiment
        self.guard = guard
        self.enabled = enabled
        self.system_metrics = system_metrics and os.environ.get("MEDXFER_SYSTEM_METRICS", "1") != "0" and not offline
        self.run_id: str | None = None
        self.spool = spool
        self.offline = offline
        self.journal: Journal | None = None  # set once this run spools (offline, or the server went away)
        self.outage_s = 0.0  # seconds the call that found the server gone spent before it gave up
        self._tables: list[dict[str, str]] | None = None
        self._monitor: Any = None
        # One sender at a time: the system-metrics thread may flush its samples while the main thread logs.
        self._lock = threading.RLock()
        self._system: list[list[Any]] = []  # system-metric points waiting for the run's next log_batch
        self._held: dict[str, Any] | None = None  # params/tags/metrics collected inside batched()
        self._exp: tuple[str, dict[str, str]] | None = None  # (id, tags) from the one lookup start() made
        self._client = self._connect() if enabled and not offline else None

    def _connect(self) -> Any:
        try:
            return _client(self.uri)
        except StageError as exc:  # a training run may go on without the server: say how
            if self.spool is None or "not reachable" not in str(exc):
                raise
            raise StageError(f"{exc}; or train with --offline-tracking and `medxfer sync` later") from None

    @property
    def spooling(self) -> bool:
        return self.journal is not None

    def _send(self, entry: dict[str, Any], files: Sequence[Path] = ()) -> None:
        """One call to the server, or to the journal once this run spools (every later call too: order holds).

        A batch also carries the system-metric samples taken since the last one (see :meth:`_start_monitor`)."""
        from medxfer.tracking import spool as sp

        with self._lock:
            if entry["op"] == "batch" and self._system:
                entry = {**entry, "metrics": [*(entry.get("metrics") or []), *self._system]}
                self._system = []
            if self.journal is None:
                t0 = time.monotonic()
                try:
                    sp.apply(
                        self._client,
                        str(self.run_id),
                        {**entry, "files": [str(f) for f in files]} if files else entry,
                        experiment_id=self._experiment_id,
                    )
                    return
                except Exception as exc:
                    if self.spool is None or not sp.unreachable(exc):
                        raise
                    self.outage_s = time.monotonic() - t0
                    self._go_offline(exc)
            assert self.journal is not None
            self.journal.append(entry, files)

    def _experiment_id(self) -> str:
        if self._exp is None:
            self._exp = _experiment(self.uri, self.experiment)
        return self._exp[0]

    def _batch(
        self, params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, metrics: Sequence = ()
    ) -> None:
        """Params, tags and metrics (already guarded) as one batch entry: inside :meth:`batched` they wait for the
        end of the block. :func:`medxfer.tracking.spool.apply` splits an entry into calls within MLflow's limits."""
        params, tags = dict(params or {}), dict(tags or {})
        if self._held is not None:
            self._held["params"].update(params)
            self._held["tags"].update(tags)
            self._held["metrics"].extend(metrics)
            return
        entry: dict[str, Any] = {"op": "batch"}
        for key, value in (("params", params), ("tags", tags), ("metrics", list(metrics))):
            if value:
                entry[key] = value
        self._send(entry)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Params, tags and metrics logged in the block go as one batch when it ends (one request per 100 params
        instead of one per call: every request to a basic-auth server costs a password hash there)."""
        if self._held is not None or not self.enabled:
            yield
            return
        self._held = {"params": {}, "tags": {}, "metrics": []}
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # keep what the block logged, and its error
                self._flush_held()
            raise
        self._flush_held()

    def _flush_held(self) -> None:
        held, self._held = self._held, None
        if held and (held["params"] or held["tags"] or held["metrics"]):
            self._batch(held["params"], held["tags"], held["metrics"])

    def _go_offline(self, exc: BaseException | None) -> None:
        """From now on this run writes to its journal (keyed by its server run id); system metrics stop."""
        from medxfer.core import ui
        from medxfer.tracking import spool as sp

        assert self.spool is not None
        key = self.run_id if self.run_id and not sp.is_local_id(self.run_id) else sp.new_local_id()
        self.journal = self.spool.journal(str(key))
        if not self.journal.exists():
            head = {"op": "open", "uri": sp.safe_uri(self.uri), "experiment": self.experiment, "run_id": key}
            # outage_s: what the call that found the server gone cost (MLflow's retries), i.e. what the run lost.
            self.journal.append({**head, "local_id": key, "created_ms": sp.now_ms(), "outage_s": self.outage_s})
        if self._monitor is not None:  # its thread would only retry a dead server; the outage has no system metrics
            with contextlib.suppress(Exception):
                self._monitor._shutdown_event.set()
            self._monitor = None
        if exc is not None:
            ui.warn(
                f"MLflow server {sp.safe_uri(self.uri)} stopped answering after {self.outage_s:.1f} s; training goes "
                f"on and run {key} is spooled in {self.journal.dir}; `medxfer sync` sends it once the server is back"
            )

    def _tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        return {self.guard.check(f"tag key {k!r}", k): self.guard.check(f"tag {k!r}", v) for k, v in tags.items()}

    def start(
        self,
        run_name: str,
        tags: Mapping[str, Any],
        parent_run_id: str | None = None,
        entry_point: str = "medxfer train",
    ) -> str | None:
        if not self.enabled:
            return None
        all_tags = {**source_tags(entry_point), **tags, TAG_STATUS: "running", TAG_SPEC: self.experiment}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.guard.check("run name", run_name)
        checked = self._tags(all_tags)
        if not self.offline:
            from medxfer.tracking import spool as sp

            try:
                exp_id = self._experiment_id()
                run = self._client.create_run(exp_id, run_name=run_name, tags=checked)
                self.run_id = run.info.run_id
                self._start_monitor(resume=False)
                return self.run_id
            except Exception as exc:  # gone between the probe and here: start this run offline, if we may
                if self.spool is None or not sp.unreachable(exc):
                    raise
        return self._start_offline(run_name, checked)

    def _start_offline(self, run_name: str, tags: dict[str, str]) -> str:
        """A run the server has never seen: its journal opens with what create_run needs, under a local id."""
        from medxfer.tracking import spool as sp

        assert self.spool is not None
        local = sp.new_local_id()
        self.run_id = local
        self.journal = self.spool.journal(local)
        head = {
            "op": "open",
            "uri": sp.safe_uri(self.uri),
            "experiment": self.experiment,
            "run_id": None,
            "local_id": local,
            "created_ms": sp.now_ms(),
            "start_time": sp.now_ms(),
            "run_name": run_name,
            "tags": tags,
        }
        if tags.get(TAG_SPEC):  # runs/<local id> of this spec: the replay links runs/<server id> to it
            head["run_dir"] = f"{tags[TAG_SPEC]}/runs/{local}"
        self.journal.append(head)
        return local

    def resume(self, run_id: str) -> str | None:
        """Continue an existing run: status back to RUNNING, system metrics continue their step count."""
        if not self.enabled:
            return None
        self.run_id = run_id
        self._send({"op": "status", "status": "RUNNING"})
        self.set_tags({TAG_STATUS: "running"})
        if not self.spooling:
            self._start_monitor(resume=True)
        return run_id

    def _start_monitor(self, resume: bool) -> None:
        if not self.system_metrics:
            return
        try:
            self._monitor = _system_monitor(self, resume)
            self._monitor.start()
        except Exception as exc:  # psutil missing or similar: training must not fail for it
            logging.getLogger(__name__).warning("system metrics disabled: %s", type(exc).__name__)
            self._monitor = None

    def _record_system(self, metrics: Mapping[str, float], step: int) -> None:
        """One system-metrics sample (from the monitor's thread): queued for the run's next batch, or sent now once
        the oldest queued sample is SYSTEM_METRICS_MAX_DELAY_S old (a long epoch still shows them within a minute)."""
        points = self._points(step, metrics)
        if not points:
            return
        with self._lock:
            self._system.extend(points)
            waited_ms = points[0][2] - self._system[0][2]
            due = waited_ms >= SYSTEM_METRICS_MAX_DELAY_S * 1000 or len(self._system) >= SYSTEM_METRICS_MAX_QUEUED
            if due and self.run_id is not None:
                self._send({"op": "batch"})

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        items = {
            self.guard.check(f"param key {k!r}", k)[:250]: self.guard.check(f"param {k!r}", v)[:6000]
            for k, v in params.items()
        }
        if items:
            self._batch(params=items)  # MAX_PARAMS_PER_CALL per request (spool.apply splits)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._batch(tags=self._tags(tags))

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """All of one epoch's metrics in one log_batch call; `step` is the epoch number (one-based)."""
        if not self.enabled:
            return
        self._batch(metrics=self._points(step, metrics))

    def _points(self, step: int, metrics: Mapping[str, float]) -> list[list[Any]]:
        """[name, value, timestamp ms, step] per metric, as a batch entry (and the spool) carries them."""
        now = int(time.time() * 1000)
        return [[self.guard.check("metric name", k), float(v), now, int(step)] for k, v in metrics.items()]

    def describe(self, text: str) -> None:
        """The run's description (Markdown), shown on the run overview."""
        self.set_tags({TAG_NOTE: text})

    def describe_experiment(self, text: str) -> None:
        """The experiment's description (the experiment page's "About this experiment")."""
        if not self.enabled:
            return
        text = self.guard.check("experiment description", text)
        if self._exp is not None and self._exp[1].get(TAG_NOTE) == text:
            return  # the lookup at start() saw this description already: the experiment's every run but its first
        self._send({"op": "experiment_tag", "key": TAG_NOTE, "value": text})
        if self._exp is not None:
            self._exp[1][TAG_NOTE] = text

    def log_dataset(
        self, name: str, digest: str, counts: Mapping[str, Mapping[str, int]], context: str = "training"
    ) -> None:
        """The run's datasets panel: a table of studies per split and class, named and digested, with no paths.

        `digest` identifies the data (manifest and split hashes); the source says which command made it."""
        if not self.enabled:
            return
        rows = [{"split": s, "class": c, "studies": int(n)} for s, by in counts.items() for c, n in by.items()]
        self.guard.check_tree("dataset", {"name": name, "digest": digest, "rows": rows})
        self._send({"op": "dataset", "name": name, "digest": digest, "rows": rows, "context": context})

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """A JSON table in MLflow's layout (what mlflow.log_table writes), replaced rather than appended to."""
        if not self.enabled:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.log_json({"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]}, artifact_file)
        if self._tables is None:
            raw = "[]" if self.spooling else self._client.get_run(self.run_id).data.tags.get(TAG_LOGGED_ARTIFACTS)
            self._tables = json.loads(raw or "[]")
        entry = {"path": artifact_file, "type": "table"}
        if entry not in self._tables:
            self._tables.append(entry)
            self.set_tags({TAG_LOGGED_ARTIFACTS: json.dumps(self._tables)})

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self.guard.check(f"artifact {artifact_file}", text)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self._send({"op": "artifact", "artifact_path": None if parent == "." else parent}, [path])

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None, text: bool = False) -> None:
        """Log a file we wrote; text files are guarded here, binaries must be checked by the caller."""
        if not self.enabled:
            return
        if text:
            self.guard.check(f"artifact {Path(path).name}", Path(path).read_text(errors="replace"))
        self._send({"op": "artifact", "artifact_path": artifact_path}, [Path(path)])

    def end(self, status: str = "finished") -> None:
        """status: finished | failed | interrupted (MLflow FINISHED | FAILED | KILLED)."""
        if not self.enabled or self.run_id is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[status]
        try:
            self.set_tags({TAG_STATUS: status})
            self._send({"op": "end", "status": mlflow_status, "end_time": int(time.time() * 1000)})
        except Exception:  # the store went away while we were failing anyway: keep the original error
            if status == "finished":
                raise
        if self.journal is not None:
            self._sync_if_back()

    def _sync_if_back(self) -> None:
        """The server came back before the run ended: send the journal now, else say how to."""
        from medxfer.core import ui

        assert self.spool is not None and self.journal is not None
        if self.offline:
            ui.info(f"run {self.run_id} tracked offline in {self.journal.dir}; `medxfer sync` sends it to the server")
            return
        try:
            _REACHABLE.discard(self.uri)
            check_reachable(self.uri, timeout_s=2.0)
            sync_spool(self.spool, self.uri)  # all of them: a control arm started meanwhile is spooled too
            ui.info(f"MLflow server is back: run {self.run_id} synced from the spool")
        except Exception:
            ui.warn(
                f"run {self.run_id} is spooled in {self.journal.dir}; run `medxfer sync` once the MLflow server "
                "answers again"
            )


def sync_spool(spool: Spool, tracking_uri: str, only: str | None = None) -> Any:
    """Replay `spool` to the server at `tracking_uri` (see :func:`medxfer.tracking.spool.replay`)."""
    from medxfer.tracking import spool as sp

    _REACHABLE.discard(tracking_uri)  # a server that died earlier in this process must be asked again
    client = _client(tracking_uri)
    return sp.replay(spool, client, tracking_uri, lambda name: experiment_id(tracking_uri, name), only=only)


def sync_workspace(workspace: str | Path, tracking_uri: str, run_id: str) -> str:
    """Before a stage reads a run: replay what the workspace spooled (a no-op without a spool), and return the
    server's id of `run_id` (a run trained with --offline-tracking has a local one until it is synced)."""
    from medxfer.tracking import spool as sp

    spool = sp.Spool.for_workspace(workspace)
    if spool.root.is_dir() and spool.pending(tracking_uri):
        try:
            sync_spool(spool, tracking_uri, only=None)
        except StageError as exc:
            raise StageError(f"{exc}; the workspace has spooled tracking to send first (`medxfer sync`)") from None
    if sp.is_local_id(run_id):
        mapped = spool.resolve(run_id)
        if mapped == run_id:
            raise StageError(
                f"run {run_id} was tracked offline and is not on {sp.safe_uri(tracking_uri)} yet; fix: "
                "`medxfer sync` once the server answers, then use the run id it prints"
            )
        return mapped
    return run_id


# --- reading a finished run back, and logging more into it (evaluate, export) ----------------------------------------
def get_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """A run's facts as plain values; a clear error when the id is unknown to this store."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StageError(
            f"no MLflow run {run_id!r} in {tracking_uri}; check the id (`medxfer ui` lists runs) "
            "and --workspace / MLFLOW_TRACKING_URI"
        ) from None
    exp = client.get_experiment(run.info.experiment_id)
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "experiment": exp.name,
        "status": run.info.status,
        "run_name": run.info.run_name,
        "artifact_uri": run.info.artifact_uri,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
    }


def download_run_artifact(tracking_uri: str, run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """Download one artifact (file or folder) of a run into `dst`; None when the run has no such artifact."""
    check_reachable(tracking_uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        with permission_errors(tracking_uri, "READ on the run's experiment"):
            out = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri
            )
    except (MlflowException, OSError):  # a 401/403 is a StageError, not "no such artifact"
        return None
    return Path(out) if Path(out).exists() else None


def attach(tracking_uri: str, experiment: str, run_id: str, guard: PHIGuard) -> Tracker:
    """A Tracker on an existing, finished run: logs more into it without changing its status."""
    tracker = Tracker(tracking_uri, experiment, guard, system_metrics=False)
    tracker.run_id = run_id
    return tracker

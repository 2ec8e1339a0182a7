"""MLflow runs: the Tracker (one run), finding and reading runs back, and the environment facts a run records.

Every string a Tracker writes passes its :class:`medxfer.tracking.guard.PHIGuard`. mlflow is imported
inside functions so ``medxfer --help`` and stages that do not track stay fast; registered models are
:mod:`medxfer.tracking.model_registry`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from medxfer.core.errors import StageError
from medxfer.tracking.guard import PHIGuard

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
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


# --- environment facts -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
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
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_root(tracking_uri))
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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
class Tracker:
    """One MLflow run. With ``enabled=False`` (DDP ranks other than 0) every method is a no-op."""

    def __init__(
        self, tracking_uri: str, experiment: str, guard: PHIGuard, enabled: bool = True, system_metrics: bool = True
    ):
        self.uri = tracking_uri
        self.experiment = experiment
        self.guard = guard
        self.enabled = enabled
        self.system_metrics = system_metrics and os.environ.get("MEDXFER_SYSTEM_METRICS", "1") != "0"
        self.run_id: str | None = None
        self._monitor = None
        self._client = _client(tracking_uri) if enabled else None

    def _tags(self, tags: Mapping[str, Any]):
        from mlflow.entities import RunTag

        return [
            RunTag(self.guard.check(f"tag key {k!r}", k), self.guard.check(f"tag {k!r}", v)) for k, v in tags.items()
        ]

    def start(self, run_name: str, tags: Mapping[str, Any], parent_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        exp_id = experiment_id(self.uri, self.experiment)
        all_tags = {**tags, TAG_STATUS: "running", TAG_SPEC: self.experiment}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.guard.check("run name", run_name)
        run = self._client.create_run(exp_id, run_name=run_name, tags={t.key: t.value for t in self._tags(all_tags)})
        self.run_id = run.info.run_id
        self._start_monitor(resume=False)
        return self.run_id

    def resume(self, run_id: str) -> str | None:
        """Continue an existing run: status back to RUNNING, system metrics continue their step count."""
        if not self.enabled:
            return None
        self.run_id = run_id
        self._client.update_run(run_id, status="RUNNING")
        self.set_tags({TAG_STATUS: "running"})
        self._start_monitor(resume=True)
        return run_id

    def _start_monitor(self, resume: bool) -> None:
        if not self.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # psutil missing or similar: training must not fail for it
            logging.getLogger(__name__).warning("system metrics disabled: %s", type(exc).__name__)
            self._monitor = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [
            Param(self.guard.check(f"param key {k!r}", k)[:250], self.guard.check(f"param {k!r}", v)[:6000])
            for k, v in params.items()
        ]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            self._client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_CALL], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._client.log_batch(self.run_id, tags=self._tags(tags), synchronous=True)

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """All of one epoch's metrics in one log_batch call."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.guard.check("metric name", k), float(v), now, int(step)) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self.guard.check(f"artifact {artifact_file}", text)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self._client.log_artifact(self.run_id, str(path), artifact_path=None if parent == "." else parent)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None, text: bool = False) -> None:
        """Log a file we wrote; text files are guarded here, binaries must be checked by the caller."""
        if not self.enabled:
            return
        if text:
            self.guard.check(f"artifact {Path(path).name}", Path(path).read_text(errors="replace"))
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

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
            self._client.set_terminated(self.run_id, status=mlflow_status)
        except Exception:  # the store went away while we were failing anyway: keep the original error
            if status == "finished":
                raise


# --- reading a finished run back, and logging more into it (evaluate, export) ----------------------------------------
def get_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """A run's facts as plain values; a clear error when the id is unknown to this store."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StageError(
            f"no MLflow run {run_id!r} in {tracking_uri}; check the id (`mlflow ui` lists runs) "
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
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        out = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri
        )
    except (MlflowException, OSError):
        return None
    return Path(out) if Path(out).exists() else None


def attach(tracking_uri: str, experiment: str, run_id: str, guard: PHIGuard) -> Tracker:
    """A Tracker on an existing, finished run: logs more into it without changing its status."""
    tracker = Tracker(tracking_uri, experiment, guard, system_metrics=False)
    tracker.run_id = run_id
    return tracker

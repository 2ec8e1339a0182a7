"""MLflow, behind one module: the only place that imports mlflow.

Every string that leaves for the tracking store (param keys and values, tags,
metric names, text artifacts, strings inside logged checkpoints) passes through
``PHIGuard.check``: a value that contains the data root, the labels CSV, a
path component of a source file, or a known original identifier is refused
before it is written. Training never logs the manifest's ``files`` or the
spec's paths in the first place; the guard is there for the day someone does.

mlflow is imported inside functions so ``medxfer --help`` and stages that do
not track stay fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from medxfer.core.errors import StageError

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


class PHIRefused(StageError):
    """A value bound for MLflow looked like PHI or a source path; the message never repeats the value."""


# --- the PHI guard ---------------------------------------------------------------------------------------------------
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9._^\-]+")
_PSEUDONYM = re.compile(r"^(st|pt)-[0-9a-f]{20}$")
# Words that legitimately appear in what we log and may also name folders in a source tree.
_ALWAYS_SAFE = {
    "dicom",
    "nifti",
    "train",
    "val",
    "test",
    "images",
    "image",
    "data",
    "dcm",
    "nii",
    "nii.gz",
    "labels.csv",
    "series",
    "study",
    "studies",
    "patient",
    "patients",
}


def _word_ok_to_guard(w: str, safe: set[str]) -> bool:
    if w.lower() in safe:
        return False
    if w.isdigit():
        return len(w) >= 6  # IDs, dates; short numbers collide with epochs, sizes, seeds
    return len(w) >= 4


class PHIGuard:
    """Refuses values containing protected path prefixes (substring) or protected words (whole words)."""

    def __init__(self, prefixes: Iterable[str] = (), words: Iterable[str] = (), safe: Iterable[str] = ()):
        self.prefixes = sorted({p for p in prefixes if p and len(p) > 1}, key=len, reverse=True)
        safe_set = {s.lower() for s in safe} | _ALWAYS_SAFE
        self.words = {w.lower() for w in words if w and _word_ok_to_guard(w, safe_set)}

    @classmethod
    def for_training(
        cls,
        spec: Any,
        files: Iterable[Iterable[str]] = (),
        pseudonym_map: Path | None = None,
        originals: Iterable[str] = (),
    ) -> PHIGuard:
        """Guard for a training run: the spec's local paths, source-path components, and the original
        identifiers in the workspace's pseudonym map (the local-only ``pseudonym,kind,original`` CSV)."""
        originals = list(originals)
        if pseudonym_map is not None and Path(pseudonym_map).is_file():
            import csv

            with Path(pseudonym_map).open(newline="") as fh:
                originals += [r["original"] for r in csv.DictReader(fh) if r.get("original")]
        root = Path(spec.root)
        prefixes = {str(root), str(root.resolve()), str(spec.labels_csv), str(Path(spec.labels_csv).resolve())}
        if spec.spec_path is not None and spec.split.pinned_test is not None:
            prefixes.add(str(spec.resolve(spec.split.pinned_test)))
        words: set[str] = set(originals)
        for study in files:
            for f in study:
                p = Path(f)
                try:
                    rel = p.relative_to(root)
                except ValueError:
                    try:
                        rel = p.resolve().relative_to(root.resolve())
                    except ValueError:
                        rel = Path(p.name)
                words.update(rel.parts)
                words.add(rel.stem)
                if len(rel.parts) > 1:
                    prefixes.add(str(rel))
        safe = set(spec.classes) | {spec.name}
        return cls(prefixes, words, safe)

    def problem(self, value: str) -> str | None:
        """Why `value` may not be logged, or None. The reason never contains the value itself."""
        for p in self.prefixes:
            if p in value:
                return "it contains a local source path"
        if self.words:
            for w in _WORD_SPLIT.split(value):
                if w and w.lower() in self.words:
                    return "it contains a source folder/file name or an original identifier"
        return None

    def check(self, what: str, value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        why = self.problem(text)
        if why:
            raise PHIRefused(
                f"refusing to log {what} to MLflow: {why}. This is a bug or a spec/recipe value "
                "that names a source file; remove it and rerun"
            )
        return text

    def check_tree(self, what: str, obj: Any) -> None:
        """Check every string (and dict key) in a nested structure; tensors are skipped."""
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                self.check(f"{what} key", str(k))
                self.check_tree(f"{what}.{k}", v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                self.check_tree(what, v)
        elif isinstance(obj, str):
            self.check(what, obj)


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


def plot_learning_curves(
    history: list[dict[str, float]], transitions: list[dict[str, Any]], path: Path, select_metric: str
) -> Path:
    """Loss and validation metrics per epoch, with stage changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) + 1 for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_auroc"] for h in history], "o-", label="val AUROC")
    ax2.plot(epochs, [h["val_balanced_accuracy"] for h in history], "o-", label="val balanced acc.")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        for t in transitions:
            ax.axvline(int(t["epoch"]) + 0.5, color="grey", ls="--", lw=0.8)
    ax2.set_title(f"selection: {select_metric}; dashed: unfreezing stages", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- model registry ---
# (appended by the registry/evaluation stage; keep above this line stable)
# Registration logs an MLflow "models from code" pyfunc (pipeline/pyfunc_model.py is the code; the weights
# travel as safetensors inside the model's artifacts), so loading it never unpickles an object.
def python_model_base() -> type:
    """mlflow.pyfunc.PythonModel, for the models-from-code file (which must not import mlflow itself)."""
    from mlflow.pyfunc import PythonModel

    return PythonModel


def set_model(model: Any) -> None:
    from mlflow.models import set_model as _set_model

    _set_model(model)


class _GlobalURIs:
    """mlflow.pyfunc.log_model (and the sqlite registry's logged-model lookup) use MLflow's *global* URIs and
    write them to the environment: point them at `uri` for one call, then restore globals and environment
    exactly (an unset URI must stay unset, or later Workspace.tracking_uri reads would follow it)."""

    _ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> _GlobalURIs:
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        _quiet_mlflow()
        self._saved = (
            tracking_utils._tracking_uri,
            registry_utils._registry_uri,
            {k: os.environ.get(k) for k in self._ENV},
        )
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return self

    def __exit__(self, *exc: Any) -> None:
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils

        tracking_uri, registry_uri, env = self._saved
        mlflow.set_tracking_uri(tracking_uri)
        registry_utils._registry_uri = registry_uri
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _registry_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def reserve_model_version(
    tracking_uri: str, run_id: str, experiment_id: str, name: str, description: str | None = None
) -> dict[str, str]:
    """Create (pending) logged model + registered model version first, so the version number is known
    before the model's files are written (the pyfunc reports it in every prediction row)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _registry_client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)
    # The sqlite registry looks the logged model up through the *global* tracking URI.
    with _GlobalURIs(tracking_uri):
        lm = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=experiment_id)
        mv = client.create_model_version(
            name, source=f"models:/{lm.model_id}", run_id=run_id, model_id=lm.model_id, description=description
        )
    return {"name": name, "version": str(mv.version), "model_id": lm.model_id}


def log_pyfunc(
    tracking_uri: str,
    model_id: str,
    run_id: str,
    code_path: Path,
    artifacts: Mapping[str, Path],
    model_config: Mapping[str, Any],
    inputs: list[tuple[str, str, bool]],
    outputs: list[tuple[str, str, bool]],
    input_example: Any,
    pip_requirements: list[str],
) -> None:
    """Write the pyfunc's files into the reserved logged model and link it to the run's outputs.

    inputs/outputs: (column, mlflow type, required). MLflow loads the model once here to check the input
    example against the signature, so a model that cannot load fails registration, not a later user.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    def schema(cols: list[tuple[str, str, bool]]) -> Schema:
        return Schema([ColSpec(t, n, required=r) for n, t, r in cols])

    # Registration is a batch step with its own summary; MLflow's per-file download bars are noise there.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import warnings

    with _GlobalURIs(tracking_uri), warnings.catch_warnings():
        # MLflow nags about type hints on predict(); the explicit signature below is the contract.
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_path),
            artifacts={k: str(v) for k, v in artifacts.items()},
            model_config=dict(model_config),
            signature=ModelSignature(inputs=schema(inputs), outputs=schema(outputs)),
            input_example=input_example,
            pip_requirements=pip_requirements,
            model_id=model_id,
        )
    _registry_client(tracking_uri).log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def abandon_model_version(tracking_uri: str, name: str, version: str, model_id: str | None) -> None:
    """Undo a reservation whose files never made it, so no version points at an empty model."""
    from contextlib import suppress

    from mlflow.entities import LoggedModelStatus

    client = _registry_client(tracking_uri)
    # Best effort: the original error is what the user needs to see.
    with suppress(Exception):
        client.delete_model_version(name, version)
    if model_id:
        with suppress(Exception):
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)


def set_model_version_tags(
    tracking_uri: str, name: str, version: str, tags: Mapping[str, Any], guard: PHIGuard
) -> None:
    client = _registry_client(tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(
            name, version, guard.check(f"version tag key {k!r}", k), guard.check(f"version tag {k!r}", v)
        )


def set_model_version_description(tracking_uri: str, name: str, version: str, description: str) -> None:
    _registry_client(tracking_uri).update_model_version(name, version, description=description)


def set_model_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`; MLflow's refusal (reserved names like 'latest', 'v3') as a user error."""
    from mlflow.exceptions import MlflowException

    try:
        _registry_client(tracking_uri).set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise StageError(f"could not set alias {alias!r} on {name} version {version}: {exc.message}") from None


def get_model_version(tracking_uri: str, name: str, version: str | int) -> dict[str, Any]:
    """A registered version's facts; a clear error when it does not exist."""
    from mlflow.exceptions import MlflowException

    client = _registry_client(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise StageError(
            f"no registered model {name!r} version {version} in {tracking_uri}; `mlflow ui` lists registered models"
        ) from None
    return {
        "name": mv.name,
        "version": str(mv.version),
        "run_id": mv.run_id or "",
        "tags": dict(mv.tags or {}),
        "aliases": list(mv.aliases or []),
        "source": mv.source,
        "status": mv.status,
    }


def download_registered_model(tracking_uri: str, model_uri: str, dst: Path) -> Path:
    """Download a registered version's files (models:/NAME@alias, models:/NAME/VERSION) into `dst`.

    Inside _GlobalURIs: MLflow resolves a version's models:/<model_id> source through the global URIs,
    whatever tracking_uri/registry_uri the download call is given.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with _GlobalURIs(tracking_uri):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
                )
            )
    except MlflowException as exc:
        raise StageError(f"{model_uri}: could not download from {tracking_uri}: {exc.message}") from None


# --- evaluation ---
# (appended by the evaluation/export stage: reading a finished run back, logging evaluation results into it,
# and fetching registered models for export)
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


def resolve_model_version(tracking_uri: str, model_uri: str) -> dict[str, str]:
    """models:/NAME@alias or models:/NAME/VERSION -> {name, version, run_id}."""
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    client = _client(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.rpartition("/")
            mv = client.get_model_version(name, version)
    except MlflowException:
        raise StageError(f"{model_uri}: no such registered model version in {tracking_uri}") from None
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id or ""}

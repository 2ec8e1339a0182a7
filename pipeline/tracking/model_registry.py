"""The MLflow model registry: reserving a version, logging the pyfunc into it, tags, aliases, downloads.

Registration logs an MLflow "models from code" pyfunc (``medxfer/handoff/pyfunc_model.py`` is the code; the
weights travel as safetensors inside the model's artifacts), so loading it never unpickles an object.
mlflow is imported inside functions, as in :mod:`medxfer.tracking.tracker`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medxfer.core.errors import StageError
from medxfer.tracking.guard import PHIGuard
from medxfer.tracking.tracker import _AuthErrors, _client, _quiet_mlflow, check_reachable, permission_errors


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
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return _AuthErrors(client, tracking_uri) if tracking_uri.startswith(("http://", "https://")) else client


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
    except (MlflowException, StageError):
        # StageError: basic-auth answers 403, not 404, for a model that does not exist yet. Creating it tells the
        # two apart: a new name is created (its creator gets MANAGE); an existing one fails, and the get below
        # raises the 403 with the permission it needs.
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)
    # The sqlite registry looks the logged model up through the *global* tracking URI.
    needs = "EDIT on the run's experiment (registering logs a model into it)"
    with _GlobalURIs(tracking_uri), permission_errors(tracking_uri, needs):
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

    needs = "EDIT on the run's experiment (registering logs a model into it)"
    with _GlobalURIs(tracking_uri), warnings.catch_warnings(), permission_errors(tracking_uri, needs):
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


def describe_registered_model(
    tracking_uri: str, name: str, description: str, tags: Mapping[str, Any], guard: PHIGuard
) -> None:
    """The registered model's own description and tags (the registry's model page), above its versions."""
    client = _registry_client(tracking_uri)
    client.update_registered_model(name, description=guard.check("model description", description))
    for k, v in tags.items():
        key = guard.check(f"model tag key {k!r}", k)
        client.set_registered_model_tag(name, key, guard.check(f"model tag {k!r}", v))


def link_logged_model(
    tracking_uri: str,
    model_id: str,
    name: str,
    version: str,
    run_id: str,
    metric_prefixes: tuple[str, ...],
    params: Mapping[str, Any],
    guard: PHIGuard,
) -> list[str]:
    """Make the logged model and its registered version agree: the model lists the version (MLflow's
    ``mlflow.modelVersions`` tag, which ``mlflow.register_model`` sets and the client API does not) and carries
    the run's latest metrics under `metric_prefixes` and a few params. Returns the metric keys copied.

    Each metric is re-logged with the run's own timestamp and step, so the run's history gains no point (MLflow
    drops exact duplicates) while the logged model gets its copy."""
    import json

    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_SOURCE_NAME

    client = _registry_client(tracking_uri)
    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    # An MLflow server adds the entry itself when the version is created (with the version as a number); the
    # sqlite store does not.
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
        versions.append({"name": name, "version": int(version)})
    # MLflow's context tags named the source as the script's local path (sys.argv[0]): the command instead.
    tags = {MLFLOW_SOURCE_NAME: "medxfer register", MLFLOW_MODEL_VERSIONS: json.dumps(versions)}
    client.set_logged_model_tags(model_id, tags)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(metric_prefixes))
    batch = []
    for k in keys:
        last = max(client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp))
        batch.append(Metric(k, last.value, last.timestamp, last.step, model_id=model_id))
    if batch:
        client.log_batch(run_id, metrics=batch, synchronous=True)
    if params:
        checked = {guard.check("model param key", k): guard.check(f"model param {k!r}", v) for k, v in params.items()}
        client.log_model_params(model_id, checked)
    return keys


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
            f"no registered model {name!r} version {version} in {tracking_uri}; `medxfer ui` lists registered models"
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
        with _GlobalURIs(tracking_uri), permission_errors(tracking_uri, f"READ on the registered model of {model_uri}"):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
                )
            )
    except MlflowException as exc:
        raise StageError(f"{model_uri}: could not download from {tracking_uri}: {exc.message}") from None


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

"""MLflow, behind one package: the only mlflow importer. Use it as ``from medxfer import tracking``.

- :mod:`~medxfer.tracking.guard`: the PHI guard every string bound for the tracking store passes;
- :mod:`~medxfer.tracking.tracker`: one run (``Tracker``), finding and reading runs, environment facts;
- :mod:`~medxfer.tracking.model_registry`: registered model versions (reserve, log the pyfunc, tags, aliases).

mlflow is imported inside functions, never at import time: ``import medxfer.tracking`` stays fast.
"""

from medxfer.tracking.guard import PHIGuard, PHIRefused
from medxfer.tracking.model_registry import (
    abandon_model_version,
    download_registered_model,
    get_model_version,
    log_pyfunc,
    python_model_base,
    reserve_model_version,
    resolve_model_version,
    set_model,
    set_model_alias,
    set_model_version_description,
    set_model_version_tags,
)
from medxfer.tracking.tracker import (
    MAX_PARAMS_PER_CALL,
    PACKAGES,
    TAG_CONTROL,
    TAG_CONTROL_RUN,
    TAG_ROLE,
    TAG_SPEC,
    TAG_STATUS,
    Tracker,
    attach,
    default_artifact_root,
    download_run_artifact,
    experiment_id,
    find_unfinished_run,
    find_unfinished_runs,
    get_run,
    git_commit,
    package_versions,
    run_tags,
    ui_command,
)

__all__ = [
    "MAX_PARAMS_PER_CALL",
    "PACKAGES",
    "TAG_CONTROL",
    "TAG_CONTROL_RUN",
    "TAG_ROLE",
    "TAG_SPEC",
    "TAG_STATUS",
    "PHIGuard",
    "PHIRefused",
    "Tracker",
    "abandon_model_version",
    "attach",
    "default_artifact_root",
    "download_registered_model",
    "download_run_artifact",
    "experiment_id",
    "find_unfinished_run",
    "find_unfinished_runs",
    "get_model_version",
    "get_run",
    "git_commit",
    "log_pyfunc",
    "package_versions",
    "python_model_base",
    "reserve_model_version",
    "resolve_model_version",
    "run_tags",
    "set_model",
    "set_model_alias",
    "set_model_version_description",
    "set_model_version_tags",
    "ui_command",
]

"""``medxfer run SPEC``: ingest -> split -> train -> evaluate -> register, by calling each stage function.

Nothing here re-implements a stage; it passes one stage's result to the next and
collects a summary. Each stage prints its own closing table (on stderr) as it
finishes, so a long run shows where it is; the final table repeats the numbers a
user came for and the exact ``medxfer ui`` command to look at them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.workspace import Workspace

# The metrics section 8 of the results contract promises, in display order.
TEST_METRICS = ("auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "ece", "brier")


def _fmt_metric(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    ci = f"  (95% CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{m['value']:.3f}{ci}"


@dataclass
class RunAllResult:
    spec_name: str
    run_id: str
    model_name: str
    model_version: str
    test: dict[str, dict[str, float | None]]
    threshold: float | None
    tracking_uri: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ui_command(self) -> str:
        from medxfer import tracking

        return tracking.ui_command(self.tracking_uri)

    def summary(self) -> dict[str, Any]:
        return {
            "spec": self.spec_name,
            "run_id": self.run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_uri": f"models:/{self.model_name}/{self.model_version}",
            "alias": (self.stages.get("register") or {}).get("alias"),
            "warnings": (self.stages.get("register") or {}).get("warnings") or [],
            "test": self.test,
            "threshold": self.threshold,
            "tracking_uri": self.tracking_uri,
            "mlflow_ui": self.ui_command,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "stages": self.stages,
        }

    def _model_row(self) -> tuple[str, str]:
        reg = self.stages.get("register") or {}
        alias = f"alias {reg['alias']}" if reg.get("alias") else "NO alias: the registration guard withheld it"
        return "model", f"models:/{self.model_name}/{self.model_version}  ({alias})"

    def _test_rows(self) -> list[tuple[str, str]]:
        return [(f"test {k}", _fmt_metric(self.test.get(k))) for k in TEST_METRICS if k in self.test]

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        reg = self.stages.get("register") or {}
        rows = [("run id", self.run_id), self._model_row()]
        rows += [("WARNING", w) for w in reg.get("warnings") or []]
        rows += self._test_rows()
        if self.threshold is not None:
            rows.append(("threshold", f"{self.threshold:.3f}"))
        total = sum(self.seconds.values())
        rows.append(
            ("time", f"{total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items()) + ")")
        )
        rows.append(("review", self.ui_command))
        return f"medxfer run: {self.spec_name}", rows


def _stage(name: str, fn, seconds: dict[str, float]):
    ui.info(f"[bold]== {name} ==[/bold]")
    t0 = time.perf_counter()
    result = fn()
    seconds[name] = time.perf_counter() - t0
    title, rows = result.table()
    ui.render_table(title, rows)
    return result


def _test_metrics(eval_summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    test = eval_summary.get("test") or {}
    return {k: v for k, v in test.items() if isinstance(v, dict)}


def run_all(
    spec: DataSpec,
    workspace: Path,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    control: str | None = None,
    force: bool = False,
    offline_tracking: bool = False,
) -> RunAllResult:
    """Each stage in turn. ``device`` goes to train and evaluate, ``control`` to train, ``force`` to register, as
    their commands take them.
    ``resume`` continues the spec's unfinished training run (on the manifest and split it started from: ingest and
    split are skipped when both exist), then evaluates and registers it as usual. ``offline_tracking`` trains without
    the server (spooled); evaluate then sends the spool first, so it and register need the server back."""
    # Imported here so `medxfer --help` and this module's import stay light.
    from medxfer.config.recipe import load_recipe
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.handoff.registry import register
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.training.stage import train

    overrides = list(overrides or [])
    # Validate the recipe before spending minutes on ingest: a typo in --set should fail in a second.
    resolved = load_recipe(recipe, spec.dims, overrides, n_classes=len(spec.classes))
    seconds: dict[str, float] = {}
    stages: dict[str, dict[str, Any]] = {}

    ws = Workspace.for_spec(workspace, spec.name)
    # A resumed run refuses a changed manifest or split, and re-ingesting would only spend minutes to rewrite them.
    reuse = resume and ws.manifest.is_file() and ws.splits.is_file()
    if reuse:
        ui.info(f"--resume: reusing {ui.short_path(str(ws.manifest))} and {ui.short_path(str(ws.splits))}")
        stages["ingest"] = {"skipped": "resume", "manifest": str(ws.manifest)}
        stages["split"] = {"skipped": "resume", "splits": str(ws.splits)}
    else:
        stages["ingest"] = _stage("ingest", lambda: ingest(spec, workspace), seconds).summary()
        stages["split"] = _stage("split", lambda: split(spec, workspace), seconds).summary()
    trained = _stage(
        "train",
        lambda: train(
            spec,
            workspace,
            recipe=recipe,
            overrides=overrides,
            weights=None,
            resume=resume,
            control=control,
            device=device,
            offline_tracking=offline_tracking,
        ),
        seconds,
    )
    stages["train"] = trained.summary()
    run_id = stages["train"]["run_id"]
    # A resumed run keeps its own recipe (train ignores --recipe/--set then): evaluate reads it from the run.
    n_bootstrap = None if resume else resolved.evaluation.bootstrap
    evaluated = _stage("evaluate", lambda: evaluate(run_id, workspace, n_bootstrap=n_bootstrap, device=device), seconds)
    stages["evaluate"] = evaluated.summary()
    run_id = stages["evaluate"].get("run_id") or run_id  # the server's id once an offline run is synced
    model_name = name or spec.name
    registered = _stage("register", lambda: register(run_id, model_name, workspace, force=force), seconds)
    stages["register"] = registered.summary()

    return RunAllResult(
        spec_name=spec.name,
        run_id=run_id,
        model_name=model_name,
        model_version=str(stages["register"]["model_version"]),
        test=_test_metrics(stages["evaluate"]),
        threshold=stages["evaluate"].get("threshold"),
        tracking_uri=ws.tracking_uri,
        stages=stages,
        seconds=seconds,
    )

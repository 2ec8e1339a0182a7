"""``medxfer run SPEC --auto [--budget 30m]``: plan, race the arms on k folds, register the winner's fold ensemble.

ingest -> plan (fingerprint, probe, a recipe per arm, the folds the budget pays for) -> split (a copy of the spec
with ``split.folds = k``: the test studies are the ones the spec's own fractions and seed deal, unchanged) ->
the race (:mod:`medxfer.planning.race`: successive halving over folds; every fold run is a tracked MLflow run
tagged with its arm and nested under one ``auto`` parent run; each fold model's logits on its own validation
fold make the arm's out-of-fold table) -> selection on out-of-fold predictions -> the winner's fold models as
one fold-ensemble run (:func:`medxfer.training.ensemble.create_ensemble_run`) -> evaluate (calibration and
threshold on the out-of-fold logits) -> register.

Budget: the plan's estimates give the planned seconds; the measured seconds per fold of each rung re-plan the
rest (the race says so in its ``replan`` lines); the summary reports planned against actual, per arm and in
total, and warns when the whole run took more than the budget + 10%.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import Workspace
from medxfer.planning.race import fmt_interval
from medxfer.runall import RunAllResult, _stage, _test_metrics

OVER_BUDGET = 1.10  # the promise: wall clock within the budget + 10%
TAG_AUTO = "medxfer.auto"  # "1" on every run of a `run --auto` (H4's ensemble run sets it too)
TAG_ARM = "medxfer.auto.arm"
TAG_FOLD = "medxfer.auto.fold"
TAG_PARENT = "medxfer.auto.parent_run_id"


@dataclass(kw_only=True)
class AutoRunResult(RunAllResult):
    """``run``'s result (model, test metrics, stages, seconds) with the race, the budget and the auto parent run."""

    race: dict[str, Any]
    parent_run_id: str | None
    budget_s: float
    warnings: list[str] = field(default_factory=list)
    split_note: str = ""

    @property
    def actual_s(self) -> float:
        """The whole run's wall clock, from the call to the registered model."""
        return float(self.race.get("actual_total_s") or sum(self.seconds.values()))

    @property
    def all_warnings(self) -> list[str]:
        """The run's own (budget, re-plan) and the registration guard's."""
        return self.warnings + list((self.stages.get("register") or {}).get("warnings") or [])

    def budget(self) -> dict[str, Any]:
        r, pl, sec = self.race, self.stages.get("plan") or {}, self.seconds
        before = sum(sec.get(k, 0.0) for k in ("ingest", "plan", "split"))
        after = sum(sec.get(k, 0.0) for k in ("ensemble", "evaluate", "register"))
        return {
            "budget_s": self.budget_s,
            "planned_s": pl.get("estimated_s"),
            "actual_s": round(self.actual_s, 1),
            "planned_train_s": r.get("planned_s"),
            "actual_train_s": r.get("actual_s"),
            # Before the race (ingest, plan, split) and after it (ensemble, evaluate, register).
            "planned_before_s": pl.get("reserved_s"),
            "actual_before_s": round(before, 1),
            "planned_after_s": pl.get("post_s"),
            "actual_after_s": round(after, 1),
            "within": self.actual_s <= self.budget_s * OVER_BUDGET,
            "per_arm": {
                a["name"]: {
                    "planned_s": a["planned_s"],
                    "actual_s": a["seconds"],
                    "s_per_sample": a.get("s_per_sample"),
                }
                for a in r["arms"]
            },
        }

    def summary(self) -> dict[str, Any]:
        r = self.race
        return super().summary() | {
            "auto": True,
            "parent_run_id": self.parent_run_id,
            "winner": r["winner"],
            "reason": r["reason"],
            "negative_transfer": r["negative_transfer"],
            "transfer_gain": r["transfer_gain"],
            "split": self.split_note,
            "budget": self.budget(),
            "warnings": self.all_warnings,
            "race": r,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        r = self.race
        rows: list[tuple[str, str]] = [
            ("run id", f"{self.run_id} (fold ensemble of {r['winner']}, {r['folds']} folds)")
        ]
        for a in r["arms"]:
            state = (
                "WINNER"
                if a["name"] == r["winner"]
                else (
                    f"stopped at rung {a['eliminated_at_rung']}" if a["eliminated_at_rung"] is not None else "finalist"
                )
            )
            rows.append(
                (
                    f"arm {a['name']}",
                    f"OOF AUROC {fmt_interval(a['oof_auroc'])}; diff vs best {fmt_interval(a['diff_vs_best'], True)}; "
                    f"folds {a['folds']}; "
                    f"{a['seconds']:.0f} s (planned {a['planned_s']:.0f} s); {state}",
                )
            )
        rows.append(("decision", r["reason"]))
        if r.get("transfer_gain"):
            g = r["transfer_gain"]
            rows.append(("transfer gain", f"{g['arm']} - {g['control']}: {fmt_interval(g, True)} (paired OOF AUROC)"))
        rows.append(self._model_row())
        rows += self._test_rows()
        b = self.budget()
        rows.append(
            (
                "budget",
                f"{b['actual_s']:.0f} s of {self.budget_s:.0f} s (training planned {b['planned_train_s']:.0f} s, "
                f"took {b['actual_train_s']:.0f} s)",
            )
        )
        rows += [("WARNING", w) for w in self.all_warnings]
        rows.append(("review", self.ui_command))
        return f"medxfer run --auto: {self.spec_name}", rows


def kfold_spec(spec: DataSpec, folds: int) -> DataSpec:
    """The spec with ``split.folds = folds``; its fractions (and so its test studies) and seed unchanged."""
    return spec.model_copy(update={"split": spec.split.model_copy(update={"folds": int(folds)})}, deep=True)


def _oof_logits(spec: DataSpec, ws: Workspace, run_id: str, fold: int, rows: Any, device: str) -> Any:
    """The fold model's raw logits on its own validation fold (the studies it did not train on), as evaluate and
    predict infer (same preprocessing and test-time mirroring)."""
    import pandas as pd
    from medxfer.config.recipe import recipe_from_dict
    from medxfer.data.transforms import inference_model
    from medxfer.evaluation.evaluate import infer_split
    from medxfer.training import checkpoint as ckpt_io

    model, ckpt = ckpt_io.load_for_inference(ws.run_dir(run_id) / ckpt_io.BEST, device)
    recipe = recipe_from_dict(ckpt["recipe"])
    out, failed = infer_split(inference_model(model, spec, recipe), rows, spec, recipe, device, f"oof fold {fold}")
    if failed:
        raise MedxferError(
            f"{failed} studies of fold {fold} could not be read for out-of-fold predictions; check that the "
            "source files are still in place and rerun"
        )
    df = pd.DataFrame({"study_key": out.studies, "fold": int(fold)})
    for c in range(out.logits.shape[1]):
        df[f"logit_{c}"] = out.logits[:, c].astype(float)
    return df


def _race_arm(arm: Any, recipe_path: Path, spec: DataSpec, overrides: list[str], plan: Any) -> Any:
    """The race's view of a planned arm. ``--set`` may change its epochs or input size: the plan's estimate per
    fold is then scaled by the epochs and linearly by the pixels (or voxels) per input, so planned against
    actual compares the same work."""
    import math

    from medxfer.config.recipe import load_recipe
    from medxfer.planning.race import RaceArm

    rec = load_recipe(recipe_path, spec.dims, overrides, n_classes=len(spec.classes))
    planned_size = plan.decision("input_size").value
    size = rec.data.size or planned_size
    px = math.prod(size) / max(math.prod(planned_size), 1)
    if arm.epoch_s or arm.fixed_s:  # the plan's cost model: fixed per fold + per epoch
        planned = arm.fixed_s + rec.epochs * arm.epoch_s * px
    else:  # a plan.json without the split (format 1 before the cost model)
        planned = arm.estimated_s * rec.epochs / max(arm.epochs, 1) * px
    step = arm.s_per_sample * px if arm.s_per_sample else None
    return RaceArm(arm.name, arm.kind, rec.epochs, round(planned, 1), planned_s_per_sample=step)


def auto_run(
    spec: DataSpec,
    workspace: Path,
    budget: str | float = "30m",
    name: str | None = None,
    overrides: list[str] | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    folds: int | None = None,
) -> AutoRunResult:
    """The whole ``run --auto``; see the module docstring. ``overrides`` (``--set``) apply to every arm's recipe;
    ``folds`` (or the spec's own ``split.folds``) replaces the plan's fold count."""
    from medxfer import tracking
    from medxfer.config.recipe import load_recipe, parse_override
    from medxfer.evaluation.evaluate import _device as resolve_device
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.handoff.registry import register
    from medxfer.ingest import manifest
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.planning.plan import parse_budget
    from medxfer.planning.plan import plan as make_plan
    from medxfer.planning.race import Labels, Race
    from medxfer.training.ensemble import create_ensemble_run
    from medxfer.training.stage import train

    t0 = time.perf_counter()
    overrides = list(overrides or [])
    budget_s = parse_budget(budget) if isinstance(budget, str) else float(budget)
    # Every arm's recipe takes the overrides: a typo in --set should fail in a second, not after ingest.
    resolved = load_recipe(None, spec.dims, overrides, n_classes=len(spec.classes))
    seconds: dict[str, float] = {}
    stages: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []

    stages["ingest"] = _stage("ingest", lambda: ingest(spec, workspace), seconds).summary()
    # An input size fixed with --set is what the arms train at: the plan probes its cost there.
    size = resolved.data.size if "data.size" in {parse_override(o)[0] for o in overrides} else None
    spent = time.perf_counter() - t0
    planned = _stage(
        "plan", lambda: make_plan(spec, workspace, budget_s, size=size, spent_s=spent, overrides=overrides), seconds
    )
    stages["plan"] = planned.summary()
    for d in planned.plan.decisions:
        if d.key == "budget":  # the budget forced fewer epochs than the minimum, or cannot be kept at all
            ui.warn(f"[bold red]{d.reason}[/bold red]")
            warnings.append(d.reason)
    k = int(folds or spec.split.folds or planned.plan.folds)
    why = "given" if folds else ("the spec's split.folds" if spec.split.folds else "the plan's")
    kspec = kfold_spec(spec, k)
    split_note = (
        f"{k} folds ({why}): split ran on a copy of the spec with split.folds={k}; its fractions and seed are "
        "the spec's, so the test studies are the ones the single split holds out, unchanged"
    )
    ui.info(f"[bold]auto:[/bold] {split_note}")
    stages["split"] = _stage("split", lambda: split(kspec, workspace), seconds).summary()

    ws = Workspace.for_spec(workspace, spec.name)
    joined = manifest.join(ws, select_fold=False)
    rows = joined.rows.merge(joined.splits[["study_key", "fold"]], on="study_key", how="left")
    trainval = rows[rows["split"] == "train"]
    pos = spec.classes.index(spec.positive_class) if spec.task == "binary" and spec.positive_class else None
    labels = Labels(
        trainval[["study_key", "label_index", "patient_key"]].rename(columns={"label_index": "y"}),
        len(spec.classes),
        pos,
    )
    recipes = {a.name: planned.paths[a.name] for a in planned.plan.arms}
    arms = [_race_arm(a, recipes[a.name], spec, overrides, planned.plan) for a in planned.plan.arms]
    race = Race(
        arms,
        k,
        labels,
        budget_s,
        # The race must end when what follows it (ensemble, evaluation, registration: the plan's post_s) still
        # fits the budget; the clock the race is given starts at the run's start, ingest included.
        train_deadline_s=planned.plan.race_deadline_s,
        n_resamples=resolved.evaluation.bootstrap,
        seed=resolved.seed,
    )
    dev = resolve_device(device)  # the out-of-fold pass infers where evaluate will

    guard = tracking.PHIGuard.for_training(spec, joined.manifest["files"], pseudonym_map=ws.pseudonym_map)
    parent = tracking.Tracker(ws.tracking_uri, spec.name, guard, system_metrics=False)
    parent_id = parent.start(
        f"auto-{spec.name}",
        {TAG_AUTO: "1", tracking.TAG_ROLE: "auto", "medxfer.auto.folds": str(k)},
        entry_point="medxfer run --auto",
    )
    parent.log_params({"budget_s": budget_s, "folds": k, "arms": ",".join(recipes)})
    status = "failed"
    try:
        ui.info(f"[bold]== race ==[/bold] {len(arms)} arms, {k} folds, rungs {race.schedule}")
        t_train = time.perf_counter()
        while (rung := race.next_rung()) is not None:
            for arm_name in rung.arms:
                for f in rung.folds:
                    ui.info(f"[bold]auto[/bold] rung {rung.index}: arm {arm_name}, fold {f + 1}/{k}: training")
                    t = time.perf_counter()
                    res = train(kspec, workspace, recipe=recipes[arm_name], overrides=overrides, fold=f, device=device)
                    run_id = str(res.run_id)
                    nest = {TAG_PARENT: str(parent_id), "mlflow.parentRunId": str(parent_id)} if parent_id else {}
                    tracking.attach(ws.tracking_uri, spec.name, run_id, guard).set_tags(
                        {TAG_AUTO: "1", TAG_ARM: arm_name, TAG_FOLD: str(f), **nest}
                    )
                    fold_rows = trainval[trainval["fold"] == f]
                    oof = _oof_logits(kspec, ws, run_id, f, fold_rows, dev)
                    took = time.perf_counter() - t
                    sps = 1.0 / res.main.samples_per_s if res.main.samples_per_s > 0 else None
                    race.record(
                        arm_name, f, took, oof, run_id, train_s=res.main.epoch_s * res.main.epochs, s_per_sample=sps
                    )
                    ui.info(
                        f"[bold]auto[/bold] arm {arm_name}, fold {f + 1}/{k}: {took:.1f} s "
                        f"({res.main.epoch_s:.1f} s/epoch x {res.main.epochs}), "
                        f"val {res.main.select_metric} {res.main.val.get(res.main.select_metric, float('nan')):.3f}"
                    )
            closed = race.close_rung(time.perf_counter() - t0)
            _rung_lines(closed)
        seconds["race"] = time.perf_counter() - t_train
        result = race.result(actual_s=seconds["race"])
        ui.info(f"[bold]auto: winner {result['winner']}[/bold]: {result['reason']}")
        winner = race.arms[result["winner"]]
        member_ids = [winner.run_ids[f] for f in range(k)]
        t = time.perf_counter()
        run_id = create_ensemble_run(kspec, workspace, member_ids, winner.table(), result, parent_run_id=parent_id)
        seconds["ensemble"] = time.perf_counter() - t
        tracking.attach(ws.tracking_uri, spec.name, run_id, guard).set_tags(
            {TAG_ARM: result["winner"], **({TAG_PARENT: str(parent_id)} if parent_id else {})}
        )
        stages["ensemble"] = {"run_id": run_id, "members": member_ids, "arm": result["winner"]}
        evaluated = _stage(
            "evaluate",
            lambda: evaluate(run_id, workspace, n_bootstrap=resolved.evaluation.bootstrap, device=device),
            seconds,
        )
        stages["evaluate"] = evaluated.summary()
        model_name = name or spec.name
        registered = _stage("register", lambda: register(run_id, model_name, workspace, force=force), seconds)
        stages["register"] = registered.summary()
        total = time.perf_counter() - t0
        result["actual_total_s"] = round(total, 1)
        warnings += list(race.notes)
        if total > budget_s * OVER_BUDGET:
            w = (
                f"OVER BUDGET: the run took {total:.0f} s, {total / budget_s - 1:+.0%} against --budget "
                f"{budget_s:.0f} s (the promise is +10%); training planned {result['planned_s']:.0f} s, took "
                f"{seconds['race']:.0f} s: raise --budget, or give fewer folds"
            )
            ui.warn(f"[bold red]{w}[/bold red]")
            warnings.append(w)
        parent.log_json(result, "auto/race.json")
        parent.set_tags({"medxfer.auto.winner": result["winner"], "medxfer.auto.ensemble_run_id": run_id})
        parent.log_epoch(1, {"auto/actual_s": total, "auto/planned_train_s": float(result["planned_s"])})
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if parent_id is not None:
            parent.end(status)
    return AutoRunResult(
        spec_name=spec.name,
        run_id=run_id,
        model_name=model_name,
        model_version=str(stages["register"]["model_version"]),
        race=result,
        test=_test_metrics(stages["evaluate"]),
        threshold=stages["evaluate"].get("threshold"),
        tracking_uri=ws.tracking_uri,
        parent_run_id=parent_id,
        budget_s=budget_s,
        seconds=seconds,
        stages=stages,
        warnings=warnings,
        split_note=split_note,
    )


def _rung_lines(closed: dict[str, Any]) -> None:
    stats = closed["stats"]
    parts = [
        f"{n} {fmt_interval(s['oof_auroc'])} (diff {fmt_interval(s['diff_vs_best'], True)})" for n, s in stats.items()
    ]
    ui.info(f"[bold]auto[/bold] rung {closed['index']} on folds {closed['folds']}: " + "; ".join(parts))
    if closed.get("eliminated"):
        ui.info(f"[bold]auto[/bold] stopped: {', '.join(closed['eliminated'])}")
    if closed.get("replan"):
        ui.info(f"[bold]auto[/bold] {closed['replan']}")

"""The train stage: manifest + split -> a classifier trained with progressive unfreezing, tracked in MLflow.

``train()`` resolves the recipe, opens (or, with ``resume``, reopens) the MLflow
run, and fits (:func:`medxfer.training.loop.fit`) once for the main arm and once more for an optional
control arm (``scratch``: same architecture without pretrained weights;
``probe``: head only, encoder frozen throughout) as a nested run with the same
data, split and epoch budget, so evaluation can tell negative transfer apart.

Under ``torchrun`` every process trains on its shard (see :mod:`medxfer.training.distributed`); rank 0
alone validates, logs and writes checkpoints. When torchrun's elastic agent restarts the group
(``--max-restarts``), the same command runs again: rank 0 looks up the run this job started (a small file keyed
by the job id) and every rank continues it from its last checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medxfer import tracking
from medxfer.config.recipe import Recipe, load_recipe, recipe_from_dict
from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import Workspace, write_text_atomic
from medxfer.ingest import manifest
from medxfer.ingest.manifest import Joined
from medxfer.training import checkpoint as ckpt_io
from medxfer.training.callbacks import Callback
from medxfer.training.distributed import (
    Dist,
    broadcast,
    close,
    elastic_job_id,
    restart_count,
    setup_device,
    will_start_group,
)
from medxfer.training.loop import Arm, Fit, Loaders, fit

CONTROLS = ("scratch", "probe")
RESULT = "result.json"  # written into a run folder when its arm finished; a resume skips that arm
JOBS = "torchelastic"  # <runs>/torchelastic/<digest of the torchrun job id>.json: the main run that job trains


# --- results ---------------------------------------------------------------------------------------------------------
@dataclass
class ArmResult:
    role: str
    run_id: str | None
    best_epoch: int
    select_metric: str
    val: dict[str, float]
    epochs: int
    wall_s: float
    checkpoint: str | None
    epoch_s: float
    samples_per_s: float
    resumed_from_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "run_id": self.run_id,
            "best_epoch": self.best_epoch + 1,
            "select_metric": self.select_metric,
            "val": _finite(self.val),
            "epochs": self.epochs,
            "wall_s": round(self.wall_s, 2),
            "checkpoint": self.checkpoint,
            "epoch_s_mean": round(self.epoch_s, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            # counted from 1 like best_epoch (the dataclass keeps the loop's index)
            "resumed_from_epoch": None if self.resumed_from_epoch is None else self.resumed_from_epoch + 1,
        }


@dataclass
class TrainResult:
    spec: str
    experiment: str
    tracking_uri: str
    device: str
    world_size: int
    main: ArmResult
    control: ArmResult | None = None
    control_kind: str | None = None
    rank: int = 0

    @property
    def run_id(self) -> str | None:
        return self.main.run_id

    def summary(self) -> dict[str, Any]:
        out = {
            "stage": "train",
            "spec": self.spec,
            "run_id": self.main.run_id,
            "experiment": self.experiment,
            "best_epoch": self.main.best_epoch + 1,
            "select_metric": self.main.select_metric,
            "val": _finite(self.main.val),
            "wall_s": round(self.main.wall_s, 2),
            "checkpoint": self.main.checkpoint,
            "device": self.device,
            "world_size": self.world_size,
            "tracking_uri": self.tracking_uri,
            "mlflow_ui": tracking.ui_command(self.tracking_uri),
            "main": self.main.summary(),
        }
        if self.control is not None:
            out["control"] = {"kind": self.control_kind, **self.control.summary()}
            out["control_run_id"] = self.control.run_id
        return out

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        m = self.main
        rows = [("run id", str(m.run_id)), ("best epoch", f"{m.best_epoch + 1} of {m.epochs} ({m.select_metric})")]
        rows += [(f"val {k}", f"{v:.4f}") for k, v in m.val.items()]
        resumed = f" (this session, resumed at epoch {m.resumed_from_epoch + 1})" if m.resumed_from_epoch else ""
        rows += [
            ("wall time", _fmt_s(m.wall_s) + resumed),
            (
                "throughput",
                f"{m.samples_per_s:.1f} samples/s, {m.epoch_s:.1f} s/epoch on {self.device}"
                + (f" x{self.world_size}" if self.world_size > 1 else ""),
            ),
            ("checkpoint", str(m.checkpoint)),
        ]
        if self.control is not None:
            c = self.control
            rows.append(
                (
                    f"control ({self.control_kind})",
                    f"run {c.run_id}; best val {c.select_metric} {c.val.get(c.select_metric, float('nan')):.4f}",
                )
            )
        rows.append(("open the UI", tracking.ui_command(self.tracking_uri)))
        return "train", rows


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    """NaN (e.g. AUROC of a single-class validation set) is not JSON: report it as null."""
    return {k: (v if math.isfinite(v) else None) for k, v in d.items()}


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _arm_result(f: Fit) -> ArmResult:
    done = [h for h in f.history if h["epoch"] >= f.start_epoch]  # this session's epochs
    return ArmResult(
        role=f.arm.role,
        run_id=f.run_id,
        best_epoch=int(f.best["epoch"]),
        select_metric=f.recipe.select_metric,
        val={k: float(v) for k, v in f.best["val"].items()},
        epochs=f.recipe.epochs,
        wall_s=f.wall_s,
        checkpoint=str(f.run_dir / ckpt_io.BEST) if f.d.main and f.run_dir is not None else None,
        epoch_s=float(np.mean([h["epoch_seconds"] for h in done])) if done else 0.0,
        samples_per_s=float(np.mean([h["samples_per_s"] for h in done])) if done else 0.0,
        resumed_from_epoch=f.start_epoch if f.arm.resume is not None else None,
        history=f.history,
    )


def _write_result(ws: Workspace, res: ArmResult) -> None:
    path = ws.run_dir(str(res.run_id)) / RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res.__dict__, default=float))
    os.replace(tmp, path)


def _read_result(ws: Workspace, run_id: str | None) -> ArmResult | None:
    path = ws.run_dir(run_id) / RESULT if run_id else None
    return ArmResult(**json.loads(path.read_text())) if path is not None and path.is_file() else None


# --- data ------------------------------------------------------------------------------------------------------------
def _read_tables(spec: DataSpec, ws: Workspace, fold: int | None = None) -> Joined:
    tables = manifest.join(ws, fold)
    n_train, n_val = len(tables.part("train")), len(tables.part("val"))
    if not n_train or not n_val:
        raise MedxferError(
            f"the split has {n_train} train and {n_val} val studies; training needs both. "
            "Check split.fractions in the spec and rerun `medxfer split`"
        )
    return tables


def _make_loaders(spec: DataSpec, recipe: Recipe, ws: Workspace, tables: Joined, d: Dist) -> Loaders:
    """Datasets are prepared (decoded, cached) once; DDP ranks get disjoint shards of each epoch's draw."""
    from medxfer.data import datasets as data
    from torch.utils.data import SequentialSampler

    bundle = data.build_datasets(spec, recipe, ws, tables.manifest, tables.splits, splits=("train", "val"))
    train_ds, val_ds = bundle["train"], bundle["val"]
    train = data.make_loader(train_ds, recipe, train=True)
    # Validation runs whole on rank 0 (exact metrics, no padded shards).
    val = data.make_loader(val_ds, recipe, train=False, sampler=SequentialSampler(val_ds))
    counts = np.bincount(train_ds.labels, minlength=len(spec.classes)).tolist()
    return Loaders(train, val, len(train_ds), counts, bundle.summary())


# --- arms ------------------------------------------------------------------------------------------------------------
def control_recipe(recipe: Recipe, kind: str) -> Recipe:
    """Same data, split, epochs and optimiser; only what the control varies differs."""
    tree = recipe.model_dump(mode="json")
    if kind == "scratch":
        # Random features have nothing to protect: train everything from the start at one LR, and let
        # BatchNorm learn its statistics (frozen ones would stay at their initial identity).
        tree.update(weights="none", stages=[{"epoch": 0, "groups": "all"}], freeze_bn_stats=False)
        tree["optim"]["lr_decay"] = 1.0
    elif kind == "probe":
        tree.update(stages=[{"epoch": 0, "groups": 0}])
    else:
        raise MedxferError(f"--control {kind!r}: use one of {', '.join(CONTROLS)}")
    return Recipe.model_validate(tree)


# --- resume ----------------------------------------------------------------------------------------------------------
def _resume_ckpt(ws: Workspace, uri: str, experiment: str, role: str, parent_run_id: str | None = None) -> str | None:
    """The newest unfinished run (of `role`) that has a checkpoint or a finished result to continue from."""
    for run_id in tracking.find_unfinished_runs(uri, experiment, role=role, parent_run_id=parent_run_id):
        run_dir = ws.run_dir(run_id)
        if any((run_dir / n).exists() for n in (ckpt_io.LAST, ckpt_io.PREV, RESULT)):
            return run_id
    return None


def _arm_to_resume(
    spec: DataSpec,
    ws: Workspace,
    run_id: str,
    role: str,
    tables: Joined,
    d: Dist,
    control: str | None = None,
    parent: str | None = None,
) -> Arm:
    """An Arm continuing `run_id` from its newest readable checkpoint (every rank reads it from disk)."""
    ckpt = _load_resume(spec, ws, run_id, d, warn=ui.warn if d.main else None)
    changed = manifest.changed_hashes(ckpt["hashes"], tables.hashes(spec))
    changed += ["validation fold"] if ckpt.get("fold") != tables.fold else []
    if changed:
        raise MedxferError(
            f"cannot resume run {run_id}: the {', '.join(changed)} changed since it started; "
            "start a new run without --resume"
        )
    return Arm(
        role, recipe_from_dict(ckpt["recipe"]), control=control, run_id=run_id, resume=ckpt, parent_run_id=parent
    )


def _load_resume(spec: DataSpec, ws: Workspace, run_id: str, d: Dist, warn=None) -> dict[str, Any]:
    """The run's newest readable checkpoint; with none left the run can never continue, so it ends FAILED.

    Left RUNNING, the MLflow UI showed a dead run as live, and every later --resume picked it again only to refuse.
    """
    try:
        return ckpt_io.load_resume(ws.run_dir(run_id), warn=warn)[0]
    except ckpt_io.CheckpointError as exc:
        if not d.main or run_id.startswith("local-"):
            raise
        dead = tracking.Tracker(ws.tracking_uri, spec.name, tracking.PHIGuard(), system_metrics=False)
        dead.run_id = run_id
        dead.end("failed")
        # Renamed, not deleted: a later --resume must not pick this run again (a FAILED run with a checkpoint
        # is resumable), and the files stay for whoever wants to see what cut them short.
        for name in (ckpt_io.LAST, ckpt_io.PREV):
            path = ws.run_dir(run_id) / name
            if path.exists():
                os.replace(path, path.with_name(path.name + ".corrupt"))
        raise ckpt_io.CheckpointError(
            f"{exc} (the MLflow run is now marked FAILED; its checkpoints are kept as *.corrupt)"
        ) from None


def _main_arm_to_resume(
    spec: DataSpec,
    ws: Workspace,
    tables: Joined,
    fold: int | None,
    control: str | None,
    d: Dist,
    run_id: str | None = None,
) -> tuple[Arm, str | None, Joined]:
    """The unfinished main run to continue (`run_id`, else the newest one), its control kind, and the tables of
    its own fold."""
    if run_id is None:
        run_id = _resume_ckpt(ws, ws.tracking_uri, spec.name, "main") if d.main else None
        run_id = broadcast(run_id, d)
    if run_id is None:
        raise MedxferError(
            f"no unfinished training run of spec '{spec.name}' with a checkpoint to resume; "
            "start one with `medxfer train SPEC`"
        )
    # no MLflow run behind an untracked ("local-") or spooled ("offline-") id to read tags from
    tracked = not run_id.startswith(("local-", "offline-"))
    tags = tracking.run_tags(ws.tracking_uri, run_id) if d.main and tracked else {}
    control = broadcast(control or tags.get(tracking.TAG_CONTROL), d)
    if fold is None and tables.fold is not None:  # k-fold: continue on the run's own fold
        tables = _read_tables(spec, ws, _load_resume(spec, ws, run_id, d).get("fold"))
    return _arm_to_resume(spec, ws, run_id, "main", tables, d), control, tables


# --- torchrun restarts ------------------------------------------------------------------------------------------------
def _job_file(ws: Workspace, job_id: str, fold: int | None) -> Path:
    # a digest: the id is whatever the scheduler called the job; the workspace only needs to tell jobs apart
    key = f"{job_id}\0fold={fold}"
    return ws.runs_dir / JOBS / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _note_job_run(ws: Workspace, job_id: str, fold: int | None, run_id: str | None) -> None:
    path = _job_file(ws, job_id, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"run_id": run_id}))


def _job_run(ws: Workspace, d: Dist, fold: int | None) -> tuple[str | None, bool, int]:
    """Under torchrun: (the main run this job started before a restart, whether it left a checkpoint or a result to
    continue from, the restart count), the same on every rank. Rank 0 decides from the files; the others may sit
    on other machines and see the shared folder a moment later.

    The first attempt notes "no run yet" at once, so a restart never picks up the run of an earlier job that had
    the same id (c10d's default id is "none"); the run id follows when the run exists (`Arm.on_start`).
    """
    job = elastic_job_id()
    if job is None:
        return None, False, 0
    restarts = restart_count(d)  # a collective: every rank, before any rank decides
    found: tuple[str | None, bool] = (None, False)
    if d.main:
        path = _job_file(ws, job, fold)
        if restarts == 0:
            _note_job_run(ws, job, fold, None)
        elif path.is_file():
            run_id = json.loads(path.read_text()).get("run_id")
            if run_id:
                run_dir = ws.run_dir(run_id)
                found = (run_id, any((run_dir / n).exists() for n in (ckpt_io.LAST, ckpt_io.PREV, RESULT)))
    run_id, has_state = broadcast(found, d)
    return run_id, has_state, restarts


# --- the stage -------------------------------------------------------------------------------------------------------
def _guard(spec: DataSpec, ws: Workspace, tables: Joined) -> tracking.PHIGuard:
    return tracking.PHIGuard.for_training(spec, tables.manifest["files"], pseudonym_map=ws.pseudonym_map)


def _run_arm(
    spec: DataSpec,
    ws: Workspace,
    arm: Arm,
    tables: Joined,
    loaders: Loaders,
    d: Dist,
    tracker: tracking.Tracker,
    callbacks: Sequence[Callback] = (),
) -> ArmResult:
    """Train one arm, or pick up its stored result when a resumed run had already finished it."""
    done = _read_result(ws, arm.run_id)
    if done is not None:
        if d.main:
            tracker.resume(str(arm.run_id))
            ui.info(f"{arm.role} run {arm.run_id} already finished training; not repeated")
        return done
    res = _arm_result(fit(spec, ws, arm, tables, loaders, d, tracker, callbacks))
    if d.main:
        _write_result(ws, res)
    return res


def _ended(tracker: tracking.Tracker, status: str) -> None:
    if tracker.enabled and tracker.run_id is not None:
        tracker.end(status)


class _Untracked(tracking.Tracker):
    """``train(track=False)``: nothing reaches MLflow; the run id ("local-...") only names the run folder."""

    def __init__(self, tracking_uri: str, experiment: str, guard: tracking.PHIGuard):
        super().__init__(tracking_uri, experiment, guard, enabled=False)

    def start(self, run_name: str, tags: Any, parent_run_id: str | None = None) -> str:
        import uuid

        self.run_id = "local-" + uuid.uuid4().hex
        return self.run_id

    def resume(self, run_id: str) -> str:  # a torchrun restart continues the same run folder
        self.run_id = run_id
        return run_id


def _tracker(
    ws: Workspace, spec: DataSpec, guard: tracking.PHIGuard, d: Dist, track: bool, offline: bool = False
) -> tracking.Tracker:
    """The arm's run; its spool (``<workspace>/tracking-spool``) takes over when the server goes away mid-run."""
    uri, spool = ws.tracking_uri, tracking.Spool.for_workspace(ws.root)
    if not track:
        return _Untracked(uri, spec.name, guard)
    return tracking.Tracker(uri, spec.name, guard, enabled=d.main, spool=spool, offline=offline)


def train(
    spec: DataSpec,
    workspace: Path,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    weights: Path | None = None,
    resume: bool = False,
    control: str | None = None,
    device: str | None = None,
    fold: int | None = None,
    track: bool = True,
    callbacks: Sequence[Callback] = (),
    offline_tracking: bool = False,
) -> TrainResult:
    """Train (or continue) a classifier for `spec`; returns run ids, best epoch and validation metrics.

    `fold` picks the validation fold when the spec splits into k folds (default 0). `track=False`
    logs nothing to MLflow (checkpoints and the run folder are still written; evaluate/register need a
    tracked run): for measuring the tracking overhead and for throw-away experiments. `callbacks`
    (:class:`medxfer.training.callbacks.Callback`) run after the built-in ones, in both arms, on every rank.
    `offline_tracking` never contacts the server: the runs are spooled in the workspace for ``medxfer sync``.
    """
    if offline_tracking and resume:
        raise MedxferError("--resume finds the run on the tracking server; drop --offline-tracking to resume")
    if control is not None and control not in CONTROLS:
        raise MedxferError(f"--control {control!r}: use one of {', '.join(CONTROLS)}")
    ws = Workspace.for_spec(workspace, spec.name)
    tables = _read_tables(spec, ws, fold)
    started_group = will_start_group()
    d = setup_device(device)
    if d.device.type == "cpu":
        # Same seed, same numbers: a resumed run must retrace the uninterrupted one.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # ...but not its NaN fill of every torch.empty (a debugging aid; no kernel here reads memory it has not
        # written): the fill cost 5% of a 3D step (1.267 vs 1.202 s, efficientnet_lite0_i3d 16x40^3, 2 cores).
        torch.utils.deterministic.fill_uninitialized_memory = False
    uri = ws.tracking_uri
    guard = _guard(spec, ws, tables) if d.main else tracking.PHIGuard()

    # -- which run: a new one, or the unfinished one we continue (--resume, or torchrun restarted the job) --
    job_run, job_has_state, restarts = (None, False, 0) if resume else _job_run(ws, d, fold)
    if resume:
        if recipe is not None or overrides or weights is not None:
            ui.warn("--resume continues with the run's own recipe; --recipe, --set and --weights are ignored")
        main_arm, control, tables = _main_arm_to_resume(spec, ws, tables, fold, control, d)
    elif job_has_state:
        if d.main:
            ui.info(f"torchrun restart {restarts}: continuing run {job_run} from its last checkpoint")
        main_arm, control, tables = _main_arm_to_resume(spec, ws, tables, fold, control, d, run_id=job_run)
    else:
        # job_run without a checkpoint: the restart came before the first epoch ended; the same run starts over
        main_arm = Arm(
            "main",
            load_recipe(recipe, spec.dims, overrides or [], weights=weights, n_classes=len(spec.classes)),
            run_id=job_run,
            tags={tracking.TAG_CONTROL: control} if control else {},
        )
        if job_run is not None and d.main:
            ui.info(f"torchrun restart {restarts}: run {job_run} has no checkpoint yet; training it from the start")
        job = elastic_job_id()
        if job is not None and job_run is None and d.main:
            main_arm.on_start = lambda run_id: _note_job_run(ws, job, fold, run_id)
    rec = main_arm.recipe
    if d.main:
        ui.info(
            f"train {spec.name}: {len(tables.part('train'))} train / {len(tables.part('val'))} val studies, "
            f"{rec.encoder}, {rec.epochs} epochs on {d.device}" + (f" x{d.world}" if d.active else "")
        )

    main_tracker = _tracker(ws, spec, guard, d, track, offline_tracking)
    status = "failed"
    try:
        loaders = _make_loaders(spec, rec, ws, tables, d)
        main = _run_arm(spec, ws, main_arm, tables, loaders, d, main_tracker, callbacks)
        ctl = None
        if control is not None:
            # after a torchrun restart, an unfinished control run of this parent continues as under --resume
            again = resume or restarts > 0
            ctl = _run_control(
                spec, ws, main_arm, control, tables, loaders, d, guard, main_tracker, again, track, callbacks
            )
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        _ended(main_tracker, status)
        close(d, started_group, finished=status == "finished")
    return TrainResult(
        spec=spec.name,
        experiment=spec.name,
        tracking_uri=uri,
        device=str(d.device),
        world_size=d.world,
        main=main,
        control=ctl,
        control_kind=control,
        rank=d.rank,
    )


def _run_control(
    spec: DataSpec,
    ws: Workspace,
    main_arm: Arm,
    kind: str,
    tables: Joined,
    loaders: Loaders,
    d: Dist,
    guard: tracking.PHIGuard,
    parent: tracking.Tracker,
    resume: bool,
    track: bool = True,
    callbacks: Sequence[Callback] = (),
) -> ArmResult:
    """The control arm as a nested run; its id is tagged on the parent as soon as it exists."""
    parent_id = str(main_arm.run_id)
    uri = ws.tracking_uri
    child = None
    if resume and d.main:
        child = _resume_ckpt(ws, uri, spec.name, "control", parent_run_id=parent_id)
    child = broadcast(child, d)
    if child is not None:
        arm = _arm_to_resume(spec, ws, child, "control", tables, d, control=kind, parent=parent_id)
    else:
        arm = Arm(
            "control",
            control_recipe(main_arm.recipe, kind),
            control=kind,
            parent_run_id=parent_id,
            tags={tracking.TAG_CONTROL: kind},
            on_start=lambda run_id: parent.set_tags({tracking.TAG_CONTROL_RUN: run_id}),
        )
    if d.main:
        ui.info(f"control arm ({kind}): " + ("continuing" if child else "starting") + " a nested run")
    tracker = _tracker(ws, spec, guard, d, track, parent.offline)
    status = "failed"
    try:
        res = _run_arm(spec, ws, arm, tables, loaders, d, tracker, callbacks)
        status = "finished"
        return res
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        _ended(tracker, status)

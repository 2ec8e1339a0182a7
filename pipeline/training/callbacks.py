"""What the fit does besides training, as callbacks (fastai / Lightning style).

The fit (:func:`medxfer.training.loop.fit`) calls every hook of every callback in list order::

    on_fit_start
    per epoch:  on_epoch_start -> on_step_end (every optimiser step) -> on_validation_start -> on_epoch_end
    on_fit_end                                  (on_exception instead, when the fit raises)

The built-in callbacks run on rank 0 alone (it validates, logs and writes checkpoints), in this order:
``ProgressBar``, ``Tracking`` (MLflow), ``Checkpoint``, ``EpochSummary``. So each epoch's metrics reach
MLflow before its checkpoint is written: a checkpoint never stands for an epoch whose metrics are missing (a
kill between the two repeats that epoch on resume). Extra callbacks passed to ``train(callbacks=...)`` come
after them and run on every rank.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from medxfer import tracking
from medxfer.config.spec import modality_label, strip_spec_paths
from medxfer.core import ui
from medxfer.core.workspace import Workspace
from medxfer.training import checkpoint as ckpt_io

if TYPE_CHECKING:
    from medxfer.training.loop import Fit


@dataclass
class EpochEnd:
    epoch: int
    row: dict[str, float]  # the epoch's history row: what MLflow logs and the summary line shows
    improved: bool  # the best epoch so far: its checkpoint becomes best.pt


class Callback:
    """Override the hooks you need; each gets the fit's built parts and state (:class:`~medxfer.training.loop.Fit`)."""

    def on_fit_start(self, fit: Fit) -> None: ...

    def on_epoch_start(self, fit: Fit, epoch: int) -> None: ...

    def on_step_end(self, fit: Fit, loss_sum: torch.Tensor, seen: int) -> None:
        """After an optimiser step; `loss_sum` (on the device) over `seen` samples of this epoch so far."""

    def on_validation_start(self, fit: Fit) -> None: ...

    def on_epoch_end(self, fit: Fit, end: EpochEnd) -> None: ...

    def on_fit_end(self, fit: Fit) -> None: ...

    def on_exception(self, fit: Fit, exc: BaseException) -> None: ...


class CallbackList(Callback):
    """Calls each hook of each callback, in list order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def on_fit_start(self, fit: Fit) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(fit)

    def on_epoch_start(self, fit: Fit, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(fit, epoch)

    def on_step_end(self, fit: Fit, loss_sum: torch.Tensor, seen: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(fit, loss_sum, seen)

    def on_validation_start(self, fit: Fit) -> None:
        for cb in self.callbacks:
            cb.on_validation_start(fit)

    def on_epoch_end(self, fit: Fit, end: EpochEnd) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(fit, end)

    def on_fit_end(self, fit: Fit) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(fit)

    def on_exception(self, fit: Fit, exc: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_exception(fit, exc)

    @contextmanager
    def reporting_errors(self, fit: Fit) -> Iterator[None]:
        """Run the block; when it raises, every callback's ``on_exception`` sees the error before it propagates."""
        try:
            yield
        except BaseException as exc:
            self.on_exception(fit, exc)
            raise


def default_callbacks(ws: Workspace, tracker: tracking.Tracker) -> list[Callback]:
    return [ProgressBar(), Tracking(tracker, ws), Checkpoint(), EpochSummary()]


# --- the progress bar ------------------------------------------------------------------------------------------------
class ProgressBar(Callback):
    """A per-epoch bar over the training steps with the running loss, on a TTY only; gone before validation."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, fit: Fit, epoch: int) -> None:
        if not ui.is_tty():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=ui.console,
            transient=True,
        )
        self.bar.__enter__()
        label = f"epoch {epoch_number(epoch)}/{fit.recipe.epochs}"
        self.task = self.bar.add_task(label, total=len(fit.loaders.train), stats="")

    def on_step_end(self, fit: Fit, loss_sum: torch.Tensor, seen: int) -> None:
        if self.bar is not None:  # reading the loss back syncs the device: only when someone looks
            self.bar.update(self.task, advance=1, stats=f"loss {loss_sum.item() / max(seen, 1):.4f}")

    def on_validation_start(self, fit: Fit) -> None:
        self._close(None, None, None)

    def on_exception(self, fit: Fit, exc: BaseException) -> None:
        self._close(type(exc), exc, exc.__traceback__)  # leave the terminal as it was (cursor shown)

    def _close(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None


# --- MLflow ----------------------------------------------------------------------------------------------------------
# A history row's key -> its MLflow metric, grouped by prefix as Lightning names them: the UI draws one section per
# prefix (train/, val/, lr/, time/, schedule/) instead of one alphabetical list of 69 charts (issue 15).
METRIC_NAMES = {
    "train_loss": "train/loss",
    "skipped_batches": "train/skipped_batches",
    "val_loss": "val/loss",
    "val_auroc": "val/auroc",
    "val_balanced_accuracy": "val/balanced_accuracy",
    "stage": "schedule/stage",
    "unfrozen_groups": "schedule/unfrozen_groups",
    "epoch_seconds": "time/epoch_s",
    "samples_per_s": "time/samples_per_s",
}


def epoch_number(epoch: int) -> int:
    """The epoch as people count it, from 1: the console, MLflow steps, best/epoch, the model card and the plots
    all say "epoch 6" for the loop's index 5 (issue 15: the summary said 6, the card 5, MLflow logged step 5)."""
    return int(epoch) + 1


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    return {METRIC_NAMES.get(k, k): v for k, v in row.items() if k != "epoch"}


class Tracking(Callback):
    """Descriptions, dataset, params and the recipe when a run starts; metrics and learning rates every epoch
    (step = the epoch number); curves and the best checkpoint at the end. A resumed run has its params already."""

    def __init__(self, tracker: tracking.Tracker, ws: Workspace):
        self.tracker, self.ws = tracker, ws

    def on_fit_start(self, fit: Fit) -> None:
        if fit.arm.resume is not None:
            return
        t = self.tracker
        t.describe_experiment(experiment_note(fit.spec))
        counts = fit.tables.class_counts(fit.spec.classes)
        digest = f"{fit.hashes.get('labelled_content', '')[:16]}-{fit.hashes.get('split', '')[:16]}"
        t.log_dataset(fit.spec.name, digest, counts)
        with t.batched():  # the description rides with the params: 2 requests for ~130 params and the tag, not 3
            t.describe(run_note(fit))
            t.log_params(params(fit))
        t.log_text(yaml.safe_dump(fit.recipe.model_dump(mode="json"), sort_keys=False), "recipe.yaml")
        t.log_text("\n".join(fit.unfreezer.describe()) + "\n", "unfreeze_schedule.txt")
        t.log_json(counts, "reports/split_counts.json")
        if self.ws.ingest_report.is_file():
            try:
                t.log_text(self.ws.ingest_report.read_text(), "reports/ingest_report.json")
            except tracking.PHIRefused as exc:
                ui.warn(f"ingest report not logged: {exc}")

    def on_epoch_end(self, fit: Fit, end: EpochEnd) -> None:
        lrs = {f"lr/{name}": lr for name, lr in fit.unfreezer.lrs().items()}
        self.tracker.log_epoch(epoch_number(end.epoch), epoch_metrics(end.row) | lrs)

    def on_fit_end(self, fit: Fit) -> None:
        best = fit.best
        n = epoch_number(max(int(best["epoch"]), 0))
        self.tracker.log_epoch(n, {"best/epoch": n, **{f"best/val_{k}": v for k, v in best["val"].items()}})
        if not self.tracker.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            from medxfer.stats.plots import plot_learning_curves  # matplotlib: only when a curve is drawn

            curve = plot_learning_curves(
                fit.history,
                fit.unfreezer.transitions,
                Path(tmp) / "learning_curve.png",
                fit.recipe.select_metric,
                best=int(fit.best["epoch"]),  # the epoch the fit kept, not the plot's re-derivation of it
            )
            self.tracker.log_file(curve, "plots")
            # The loop's rows as the checkpoint holds them ("epoch": the 0-based index; the report reads them).
            self.tracker.log_json(fit.history, "history.json")
            safe = ckpt_io.for_tracking(ckpt_io.load(fit.run_dir / ckpt_io.BEST))
            self.tracker.guard.check_tree("checkpoint", {k: v for k, v in safe.items() if k != "model"})
            ckpt_io.atomic_save(safe, Path(tmp) / "best.pt")
            self.tracker.log_file(Path(tmp) / "best.pt", "checkpoints")


def experiment_note(spec: Any) -> str:
    """The experiment's description: the dataset spec in a few lines, no paths."""
    sp = spec.split
    split = (
        f"{sp.folds}-fold cross-validation"
        if sp.folds
        else ", ".join(f"{k} {v:.0%}" for k, v in (sp.fractions or {}).items())
    )
    kind = modality_label(spec.model_dump(mode="json"))
    lines = [
        f"**{spec.name}**: {spec.task} classification of {spec.dims}D {kind} images "
        f"({spec.source.kind.upper() if spec.source.kind == 'dicom' else 'NIfTI'}).",
        "",
        f"- classes: {', '.join(spec.classes)}"
        + (f" (positive: {spec.positive_class})" if spec.positive_class else ""),
        f"- split: {split}, seed {sp.seed}" + (", grouped by patient" if sp.group_by_patient else ""),
        f"- spec hash: {spec.content_hash()}",
        "",
        "Runs: `medxfer train` (train/, val/, lr/ metrics per epoch), then `medxfer evaluate` (test/ metrics with "
        "patient-bootstrap 95% CIs as tags) and `medxfer register`.",
    ]
    return "\n".join(lines)


def run_note(fit: Fit) -> str:
    """The run's description, written at the start of training; evaluate adds its headline metrics."""
    spec, recipe, arm = fit.spec, fit.recipe, fit.arm
    counts = fit.tables.class_counts(spec.classes)
    by_split = "; ".join(
        f"{s} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in c.items())})" for s, c in counts.items()
    )
    rep = fit.weight_info
    weights = rep.get("source", "none")
    if rep.get("sha256"):
        weights += f" (sha256 {str(rep['sha256'])[:12]})"
    role = f"{arm.role} run" + (f", control: {arm.control}" if arm.control else "")
    kind = modality_label(spec.model_dump(mode="json"))
    lines = [
        f"**{spec.name}** ({spec.task}, {spec.dims}D {kind}), {role}",
        "",
        f"- studies: {by_split}",
        f"- encoder: {recipe.encoder}, weights: {weights}",
        f"- schedule: {recipe.epochs} epochs, select on val {recipe.select_metric}",
        *[f"  - {line}" for line in fit.unfreezer.describe()],
        f"- seed {recipe.seed}; data {fit.hashes.get('labelled_content', '')[:16]}, "
        f"split {fit.hashes.get('split', '')[:16]}",
    ]
    return "\n".join(lines)


def params(fit: Fit) -> dict[str, Any]:
    """Everything needed to reproduce the run, as MLflow params: no paths, no identifiers."""
    spec, recipe, loaders, unfreezer = fit.spec, fit.recipe, fit.loaders, fit.unfreezer
    p: dict[str, Any] = dict(recipe.flat())
    stripped = strip_spec_paths(spec.model_dump(mode="json"))
    p.update({k: v for k, v in _flatten(stripped, "spec").items() if v != "<local path>"})
    p.update({f"hash.{k}": v for k, v in fit.hashes.items()})  # hash.spec, hash.labelled_content, hash.split
    p["git.commit"] = tracking.git_commit() or "unknown"
    p.update({f"version.{k}": v for k, v in tracking.package_versions().items()})
    rep = fit.weight_info
    p.update(
        {
            "model.encoder": recipe.encoder,
            "model.weights.source": rep.get("source", "none"),
            "model.weights.sha256": rep.get("sha256") or "none",
            "model.weights.missing_keys": len(rep.get("missing") or []),
            "model.weights.unexpected_keys": len(rep.get("unexpected") or []),
            "model.head_reinitialized": rep.get("head_reinitialized", True),
            "model.layer_groups": ",".join(g.name for g in unfreezer.groups),
            "model.parameters": sum(q.numel() for q in fit.model.parameters()),
        }
    )
    p.update(
        {
            "data.n_train": loaders.n_train,
            "data.n_val": len(fit.tables.part("val")),
            "data.fold": fit.tables.fold,
            "data.steps_per_epoch": len(loaders.train),
        }
    )
    p.update({f"data.{k}": v for k, v in loaders.summary.items() if k in ("cache", "transform_hash", "failed")})
    if loaders.summary.get("failed_by_reason"):  # studies quarantined at cache build, by reason code
        p["data.failed_by_reason"] = json.dumps(loaders.summary["failed_by_reason"], sort_keys=True)
    for i, c in enumerate(spec.classes):
        p[f"data.train_count.{c}"] = loaders.counts[i]
        p[f"loss.class_weight.{c}"] = f"{fit.class_weights[i]:.6g}" if fit.class_weights else "1"
        p[f"head.bias_prior.{c}"] = f"{fit.priors[i]:.6g}"
    for i, line in enumerate(unfreezer.describe()):
        p[f"schedule.{i}"] = line
    p.update(
        {
            "run.device": fit.d.device.type,
            "run.world_size": fit.d.world,
            # Weights are bit-identical across processes only at the same thread count (tests/test_reproducibility)
            "run.torch_threads": torch.get_num_threads(),
            "run.amp": str(fit.amp).replace("torch.", ""),
            "run.role": fit.arm.role,
            "run.control": fit.arm.control or "none",
        }
    )
    return p


def _flatten(obj: Any, prefix: str) -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: str(obj)}


# --- checkpoints -----------------------------------------------------------------------------------------------------
class Checkpoint(Callback):
    """Every epoch: ``last.pt`` (the one before kept as ``last.prev.pt``) and, when it improved, ``best.pt``."""

    def on_epoch_end(self, fit: Fit, end: EpochEnd) -> None:
        ckpt_io.save_epoch(fit.run_dir, checkpoint_state(fit, end.epoch), is_best=end.improved)


def checkpoint_state(fit: Fit, epoch: int) -> dict[str, Any]:
    """All a resume needs to continue exactly, and all inference needs to rebuild the model."""
    spec, recipe, arm, ema, unfreezer, best = fit.spec, fit.recipe, fit.arm, fit.ema, fit.unfreezer, fit.best

    def cpu(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}

    # "model" is always what was validated and ships (the average under EMA); the raw weights and the
    # average's step count are only needed to resume.
    extra = {"train_model": cpu(fit.model), "ema": ema.state_dict()} if ema is not None else {}
    return ckpt_io.plain(
        {
            "model": cpu(fit.shipped),
            **extra,
            "optimizer": unfreezer.optimizer.state_dict(),
            "scheduler": unfreezer.state_dict(),
            "scaler": fit.scaler.state_dict() if fit.scaler.is_enabled() else {},
            "epoch": epoch,
            "rng": ckpt_io.rng_state(),
            "stage": unfreezer.stage,
            "param_groups": unfreezer.layout(),
            "recipe": recipe.model_dump(mode="json"),
            "spec": {**spec.model_dump(mode="json"), "spec_path": str(spec.spec_path) if spec.spec_path else None},
            "classes": list(spec.classes),
            "positive_index": spec.positive_index,
            "encoder": recipe.encoder,
            "model_args": {
                "name": recipe.encoder,
                "num_classes": len(spec.classes),
                "in_chans": 1,
                "spatial_dims": spec.dims,
            },
            "hashes": dict(fit.hashes),
            "fold": fit.tables.fold,
            "run_id": fit.run_id,
            "role": arm.role,
            "control": arm.control,
            "weight_report": fit.weight_info,
            "best_metric": float(best["score"]) if math.isfinite(best["score"]) else float("nan"),
            "best": {"epoch": int(best["epoch"]), "score": float(best["score"]), "val": dict(best["val"])},
            "history": fit.history,
        }
    )


# --- the console -----------------------------------------------------------------------------------------------------
class EpochSummary(Callback):
    """The schedule when the fit starts, a line when a stage begins, and one line per epoch (``*``: best so far)."""

    def on_fit_start(self, fit: Fit) -> None:
        u, arm = fit.unfreezer, fit.arm
        if arm.resume is not None:
            ui.info(
                f"resuming {arm.role} run {arm.run_id} at epoch {epoch_number(fit.start_epoch)}/{fit.recipe.epochs}, "
                f"stage "
                f"{u.stage} ({', '.join(g['name'] for g in u.layout())} training)"
            )
        for line in u.describe():
            ui.info(f"  {line}")
        if fit.class_weights:
            pairs = zip(fit.spec.classes, fit.class_weights, strict=True)
            ui.info("  class weights: " + ", ".join(f"{c} {w:.3g}" for c, w in pairs))

    def on_epoch_start(self, fit: Fit, epoch: int) -> None:
        if fit.new_stage:
            training = ", ".join(g["name"] for g in fit.unfreezer.layout())
            ui.info(f"epoch {epoch_number(epoch)}: stage {fit.unfreezer.stage}, training {training}")

    def on_epoch_end(self, fit: Fit, end: EpochEnd) -> None:
        ui.info(epoch_line(end.row, fit.recipe.epochs, end.improved))


def epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    """``epoch 3/16 s0 loss 0.1283/0.1860 auroc 0.783 bacc 0.688 12.6s 44/s *``: stage, train/val loss, val AUROC
    and balanced accuracy, epoch time, training samples/s, ``*`` when best so far. Within 80 columns (the long
    names took 111), so a line never wraps in a terminal; the full names are in MLflow."""
    return (
        f"epoch {epoch_number(row['epoch'])}/{epochs} s{int(row['stage'])} "
        f"loss {row['train_loss']:.4f}/{row['val_loss']:.4f} auroc {row['val_auroc']:.3f} "
        f"bacc {row['val_balanced_accuracy']:.3f} {row['epoch_seconds']:.1f}s {row['samples_per_s']:.0f}/s"
        + (" *" if improved else "")
    )

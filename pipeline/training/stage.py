"""The train stage: manifest + split -> a classifier trained with progressive unfreezing, tracked in MLflow.

``train()`` resolves the recipe, opens (or, with ``resume``, reopens) the MLflow
run, and runs ``_fit`` once for the main arm and once more for an optional
control arm (``scratch``: same architecture without pretrained weights;
``probe``: head only, encoder frozen throughout) as a nested run with the same
data, split and epoch budget, so evaluation can tell negative transfer apart.

Under ``torchrun`` every process trains on its shard (gloo on CPU, nccl on
CUDA); rank 0 alone validates, logs and writes checkpoints, and broadcasts the
validation score so that plateau-triggered stages change on every rank at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from medxfer.config.recipe import Recipe, load_recipe, recipe_from_dict
from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.errors import MedxferError, StageError
from medxfer.core.workspace import Workspace
from medxfer.stats.metrics import auroc
from medxfer.tracking import tracker as tracking
from medxfer.training import checkpoint as ckpt_io
from medxfer.training.ema import WeightEMA
from medxfer.training.losses import build_loss, init_head_bias
from medxfer.training.unfreeze import Unfreezer
from torch import nn

CONTROLS = ("scratch", "probe")
STOP_ENV = "MEDXFER_STOP_AFTER_EPOCH"  # tests only: SIGKILL ourselves after this many epochs


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
            "resumed_from_epoch": self.resumed_from_epoch,
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


# --- devices and processes -------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _setup_device(device: str | None) -> Dist:
    """One process, or one of `torchrun`'s: gloo on CPU, nccl on CUDA, one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise MedxferError(f"--device {want}: CUDA is not available here; use --device cpu")
    if want.startswith("cuda"):
        dev = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and dev.type == "cpu":
        # processes share the cores; oversubscribed intra-op threads make every rank slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank, world, local, dev)


def _broadcast(obj: Any, d: Dist) -> Any:
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _amp(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or recipe.amp == "off":
        return None
    if recipe.amp == "bf16" or (recipe.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def to_memory_format(model: nn.Module, fmt: torch.memory_format) -> nn.Module:
    """Like ``model.to(memory_format=fmt)``, but skips tensors of another rank: ACS convolutions keep 4D (2D)
    weights inside a 3D model, on which ``.to(memory_format=channels_last_3d)`` raises."""
    rank = 4 if fmt == torch.channels_last else 5
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == rank:
                t.data = t.data.contiguous(memory_format=fmt)
    return model


def _seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Every epoch's randomness is a function of (seed, epoch, rank): a resumed run replays it exactly."""
    s = (seed * 1_000_003 + epoch * 9_973 + rank) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


def _stop_for_test(epochs_done: int) -> None:
    want = os.environ.get(STOP_ENV)
    if want and epochs_done == int(want):
        os.kill(os.getpid(), signal.SIGKILL)


# --- data ------------------------------------------------------------------------------------------------------------
@dataclass
class Tables:
    manifest: pd.DataFrame
    splits: pd.DataFrame  # k-fold: relabelled so the chosen fold is "val"
    train: pd.DataFrame
    val: pd.DataFrame
    counts: list[int]
    hashes: dict[str, str]
    split_counts: dict[str, Any]
    fold: int | None = None


def _read_tables(spec: DataSpec, ws: Workspace, fold: int | None = None) -> Tables:
    if not ws.manifest.is_file():
        raise MedxferError(
            f"no manifest for spec '{spec.name}' in {ws.root}; run `medxfer ingest SPEC --workspace {ws.root}` first"
        )
    if not ws.splits.is_file():
        raise MedxferError(
            f"no split for spec '{spec.name}' in {ws.root}; run `medxfer split SPEC --workspace {ws.root}` first"
        )
    manifest = pd.read_parquet(ws.manifest)
    splits = pd.read_csv(ws.splits)
    report = json.loads(ws.split_report.read_text()) if ws.split_report.is_file() else {}
    split_hash = (
        report.get("split_hash")
        or hashlib.sha256(splits.sort_values("study_key").to_csv(index=False).encode()).hexdigest()[:16]
    )
    folds = sorted(int(f) for f in splits.loc[splits["split"] == "train", "fold"].unique() if int(f) >= 0)
    if folds:
        fold = 0 if fold is None else fold
        if fold not in folds:
            raise MedxferError(f"fold {fold} does not exist; the split has folds {folds[0]}..{folds[-1]}")
        splits = splits.copy()
        splits.loc[(splits["split"] == "train") & (splits["fold"] == fold), "split"] = "val"
    elif fold not in (None, 0):
        raise MedxferError(f"fold {fold}: this split has no folds (set split.folds in the spec and rerun split)")
    else:
        fold = None
    rows = manifest.merge(splits[["study_key", "split"]], on="study_key", how="inner")
    if len(rows) < len(splits):
        raise MedxferError(
            f"splits.csv names {len(splits) - len(rows)} studies that are not in the manifest; "
            "the manifest changed after splitting: rerun `medxfer split`"
        )
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    if train.empty or val.empty:
        raise MedxferError(
            f"the split has {len(train)} train and {len(val)} val studies; training needs both. "
            "Check split.fractions in the spec and rerun `medxfer split`"
        )
    k = len(spec.classes)
    counts = np.bincount(train["label_index"].to_numpy(dtype=np.int64), minlength=k).tolist()
    split_counts = {
        s: {spec.classes[i]: int(n) for i, n in enumerate(np.bincount(g["label_index"], minlength=k))}
        for s, g in rows.groupby("split")
    }
    manifest_hash = hashlib.sha256(
        "\n".join(sorted(f"{r.study_key},{r.content_hash},{r.label_index}" for r in manifest.itertuples())).encode()
    )
    hashes = {"spec": spec.content_hash(), "manifest": manifest_hash.hexdigest()[:16], "split": str(split_hash)}
    return Tables(
        manifest, splits, train.reset_index(drop=True), val.reset_index(drop=True), counts, hashes, split_counts, fold
    )


@dataclass
class Loaders:
    train: Any  # medxfer.data.datasets.StudyLoader: set_epoch seeds the sampler and the augmentation
    val: Any
    n_train: int
    counts: list[int]  # training class counts of the studies that loaded
    summary: dict[str, Any]


def _make_loaders(spec: DataSpec, recipe: Recipe, ws: Workspace, tables: Tables, d: Dist) -> Loaders:
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


def _unpack(batch: Any, device: torch.device, fmt: torch.memory_format | None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
    x = torch.as_tensor(x).to(device, non_blocking=True).float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, torch.as_tensor(y).to(device, non_blocking=True).long().view(-1)


# --- one arm ---------------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    role: str  # main | control
    recipe: Recipe
    control: str | None = None  # the control kind, for the control arm
    run_id: str | None = None  # an existing run to continue
    resume: dict[str, Any] | None = None  # the checkpoint to continue from
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # extra tags for a new run
    on_start: Callable[[str], None] | None = None  # called with the new run's id (rank 0)


def sampled_counts(counts: list[int], balanced: bool) -> list[int]:
    """Class counts as the model sees them: a balanced sampler already evens them out, so auto alpha and
    the prior bias must not correct the imbalance a second time."""
    if not balanced:
        return list(counts)
    present = [c for c in counts if c > 0]
    mean = round(sum(present) / len(present)) if present else 0
    return [mean if c > 0 else 0 for c in counts]


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


class _EpochBar:
    """A per-epoch progress bar with the running loss on a TTY; silent otherwise."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.enabled = enabled and ui.is_tty()
        self.total, self.description = total, description

    def __enter__(self) -> _EpochBar:
        if self.enabled:
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
            self.task = self.bar.add_task(self.description, total=self.total, stats="")
        return self

    def advance(self, loss_sum: torch.Tensor, seen: int) -> None:
        if self.enabled:  # reading the loss back syncs the device: only when someone looks
            self.bar.update(self.task, advance=1, stats=f"loss {loss_sum.item() / max(seen, 1):.4f}")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def _wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP registers the parameters that require grad when it is built: rebuild it whenever a stage changes."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def _train_epoch(
    net: nn.Module,
    unfreezer: Unfreezer,
    loader: Iterable[Any],
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    amp: torch.dtype | None,
    d: Dist,
    fmt: torch.memory_format | None,
    bar: _EpochBar,
    ema: WeightEMA | None = None,
) -> tuple[float, int, int]:
    """One pass over this rank's shard. Returns (mean loss over all ranks, samples over all ranks, skipped)."""
    net.train()
    unfreezer.set_train_mode()
    total = torch.zeros((), dtype=torch.float64, device=d.device)  # on the device: no sync per step
    seen = skipped = 0
    for batch in loader:
        x, y = _unpack(batch, d.device, fmt)
        unfreezer.step_lr()
        with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(x), y)
        unfreezer.optimizer.zero_grad(set_to_none=True)
        if not _all_finite(loss, d):
            skipped += 1  # one bad batch must not poison the weights; all bad stops the stage below
            continue
        scaler.scale(loss).backward()
        scaler.step(unfreezer.optimizer)
        scaler.update()
        if ema is not None:
            ema.update(getattr(net, "module", net))  # unwrap DDP: the average keys match the plain model
        total += loss.detach().double() * len(y)
        seen += len(y)
        bar.advance(total, seen)
    stats = torch.tensor([total.item(), seen, skipped], dtype=torch.float64, device=d.device)
    if d.active:
        dist.all_reduce(stats)
    total_loss, seen_all, skipped_all = stats.tolist()
    if seen_all == 0:
        raise StageError(
            "every training batch gave a non-finite loss; lower optim.lr (e.g. --set optim.lr=1e-4) or set amp: off"
        )
    return total_loss / seen_all, int(seen_all), int(skipped_all / max(d.world, 1))


def _all_finite(loss: torch.Tensor, d: Dist) -> bool:
    """Under DDP every rank must skip the same step, or the gradient all-reduce waits forever."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if d.active:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


@torch.no_grad()
def _predict(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: nn.Module,
    device: torch.device,
    amp: torch.dtype | None,
    fmt: torch.memory_format | None,
) -> tuple[float, np.ndarray, np.ndarray]:
    model.eval()
    losses, probs, labels = [], [], []
    for batch in loader:
        x, y = _unpack(batch, device, fmt)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        losses.append(loss_fn.per_sample(logits.float(), y).cpu())
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(y.cpu())
    return (torch.cat(losses).mean().item(), torch.cat(probs).numpy().astype(np.float64), torch.cat(labels).numpy())


def val_metrics(prob: np.ndarray, y: np.ndarray, positive_index: int) -> dict[str, float]:
    """AUROC (binary: positive class; multiclass: macro one-vs-rest) and balanced accuracy of the argmax."""
    k = prob.shape[1]
    if k == 2:
        auc = auroc(y == positive_index, prob[:, positive_index])
    else:
        per = [auroc(y == c, prob[:, c]) for c in range(k)]
        per = [a for a in per if math.isfinite(a)]
        auc = float(np.mean(per)) if per else float("nan")
    pred = prob.argmax(1)
    recalls = [float((pred[y == c] == c).mean()) for c in range(k) if (y == c).any()]
    return {"auroc": auc, "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan")}


def _score(val: dict[str, float], metric: str) -> float:
    """Higher is better; NaN is worst."""
    v = -val["loss"] if metric == "loss" else val[metric]
    return v if math.isfinite(v) else -math.inf


def _params(
    spec: DataSpec, recipe: Recipe, tables: Tables, loaders: Loaders, unfreezer: Unfreezer, run: dict[str, Any]
) -> dict[str, Any]:
    """Everything needed to reproduce the run, as MLflow params: no paths, no identifiers."""
    p: dict[str, Any] = dict(recipe.flat())
    stripped = ckpt_io.strip_spec_paths(spec.model_dump(mode="json"))
    p.update({k: v for k, v in _flatten(stripped, "spec").items() if v != "<local path>"})
    p.update(
        {
            "hash.spec": tables.hashes["spec"],
            "hash.manifest": tables.hashes["manifest"],
            "hash.split": tables.hashes["split"],
            "git.commit": tracking.git_commit() or "unknown",
        }
    )
    p.update({f"version.{k}": v for k, v in tracking.package_versions().items()})
    rep = run["weight_info"]
    p.update(
        {
            "model.encoder": recipe.encoder,
            "model.weights.source": rep.get("source", "none"),
            "model.weights.sha256": rep.get("sha256") or "none",
            "model.weights.missing_keys": len(rep.get("missing") or []),
            "model.weights.unexpected_keys": len(rep.get("unexpected") or []),
            "model.head_reinitialized": rep.get("head_reinitialized", True),
            "model.layer_groups": ",".join(g.name for g in unfreezer.groups),
            "model.parameters": run["n_params"],
        }
    )
    p.update(
        {
            "data.n_train": loaders.n_train,
            "data.n_val": len(tables.val),
            "data.fold": tables.fold,
            "data.steps_per_epoch": len(loaders.train),
        }
    )
    p.update({f"data.{k}": v for k, v in loaders.summary.items() if k in ("cache", "transform_hash", "failed")})
    weights = run["class_weights"]
    for i, c in enumerate(spec.classes):
        p[f"data.train_count.{c}"] = loaders.counts[i]
        p[f"loss.class_weight.{c}"] = f"{weights[i]:.6g}" if weights else "1"
        p[f"head.bias_prior.{c}"] = f"{run['priors'][i]:.6g}"
    for i, line in enumerate(unfreezer.describe()):
        p[f"schedule.{i}"] = line
    p.update({f"run.{k}": run[k] for k in ("device", "world_size", "amp", "role", "control")})
    return p


def _flatten(obj: Any, prefix: str) -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: str(obj)}


def _fit(
    spec: DataSpec, ws: Workspace, arm: Arm, tables: Tables, loaders: Loaders, d: Dist, tracker: tracking.Tracker
) -> ArmResult:
    recipe = arm.recipe
    t_start = time.perf_counter()
    from medxfer.models.registry import create_classifier

    # -- model, loss, schedule --
    torch.manual_seed(recipe.seed)
    weights = None if arm.resume is not None else recipe.weights  # a resumed run loads its own weights
    model = create_classifier(
        recipe.encoder, num_classes=len(spec.classes), in_chans=1, spatial_dims=spec.dims, weights=weights
    )
    report = getattr(model, "weight_report", None)
    weight_info = (
        arm.resume["weight_report"]
        if arm.resume is not None
        else (report.as_dict() if report is not None and hasattr(report, "as_dict") else {})
    )
    seen_counts = sampled_counts(loaders.counts, recipe.data.balanced_sampling)
    loss_fn, class_weights = build_loss(recipe.loss, recipe.focal.gamma, recipe.focal.alpha, seen_counts)
    priors = init_head_bias(model, seen_counts)
    amp = _amp(recipe, d.device)
    fmt = _memory_format(spec.dims) if d.device.type == "cuda" and recipe.channels_last else None
    model.to(d.device)
    if fmt is not None:
        to_memory_format(model, fmt)
    loss_fn.to(d.device)
    unfreezer = Unfreezer(
        model,
        recipe.stages,
        recipe.optim,
        epochs=recipe.epochs,
        steps_per_epoch=len(loaders.train),
        freeze_bn_stats=recipe.freeze_bn_stats,
    )
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    shipped = ema.module if ema is not None else model  # the weights that are validated and checkpointed
    history: list[dict[str, float]] = []
    best = {"epoch": -1, "score": -math.inf, "val": {}}
    start_epoch = 0

    # -- a new run, or the one we continue --
    if arm.resume is not None:
        c = arm.resume
        model.load_state_dict(c["train_model"] if ema is not None else c["model"])
        if ema is not None:
            ema.load_state_dict(c["ema"], c["model"])
        unfreezer.load_state_dict(c["scheduler"])
        unfreezer.optimizer.load_state_dict(c["optimizer"])
        if c["scaler"]:
            scaler.load_state_dict(c["scaler"])
        ckpt_io.set_rng_state(c["rng"])
        history, best, start_epoch = list(c["history"]), dict(c["best"]), int(c["epoch"]) + 1
        run_id = tracker.resume(arm.run_id) if d.main else None
        if d.main:
            ui.info(
                f"resuming {arm.role} run {arm.run_id} at epoch {start_epoch + 1}/{recipe.epochs}, stage "
                f"{unfreezer.stage} ({', '.join(g['name'] for g in unfreezer.layout())} training)"
            )
    else:
        run_name = f"{spec.name}-{recipe.encoder}" + (f"-control-{arm.control}" if arm.control else "")
        tags = {tracking.TAG_ROLE: arm.role, "medxfer.encoder": recipe.encoder, **arm.tags}
        run_id = tracker.start(run_name, tags, parent_run_id=arm.parent_run_id) if d.main else None
        if d.main:
            if arm.on_start is not None:
                arm.on_start(run_id)
            facts = {
                "weight_info": weight_info,
                "class_weights": class_weights,
                "priors": priors,
                "n_params": sum(q.numel() for q in model.parameters()),
                "device": d.device.type,
                "world_size": d.world,
                "amp": str(amp).replace("torch.", ""),
                "role": arm.role,
                "control": arm.control or "none",
            }
            tracker.log_params(_params(spec, recipe, tables, loaders, unfreezer, facts))
            tracker.log_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), "recipe.yaml")
            tracker.log_text("\n".join(unfreezer.describe()) + "\n", "unfreeze_schedule.txt")
            tracker.log_json(tables.split_counts, "reports/split_counts.json")
            _log_ingest_report(tracker, ws)
    run_id = _broadcast(run_id, d)
    arm.run_id = run_id
    run_dir = ws.run_dir(run_id)
    if d.main:
        for line in unfreezer.describe():
            ui.info(f"  {line}")
        if class_weights:
            ui.info(
                "  class weights: "
                + ", ".join(f"{c} {w:.3g}" for c, w in zip(spec.classes, class_weights, strict=True))
            )
    net = _wrap(model, d)

    # -- the epoch loop --
    for epoch in range(start_epoch, recipe.epochs):
        if unfreezer.begin_epoch(epoch):
            net = _wrap(model, d)
            if d.main:
                ui.info(
                    f"epoch {epoch + 1}: stage {unfreezer.stage}, training "
                    + ", ".join(g["name"] for g in unfreezer.layout())
                )
        _seed_epoch(recipe.seed, epoch, d.rank)
        loaders.train.set_epoch(epoch)

        t0 = time.perf_counter()
        with _EpochBar(len(loaders.train), f"epoch {epoch + 1}/{recipe.epochs}", d.main) as bar:
            train_loss, seen, skipped = _train_epoch(
                net, unfreezer, loaders.train, loss_fn, scaler, amp, d, fmt, bar, ema
            )
        train_s = time.perf_counter() - t0

        val = None
        if d.main:
            val_loss, prob, y = _predict(shipped, loaders.val, loss_fn, d.device, amp, fmt)
            val = {"loss": val_loss, **val_metrics(prob, y, spec.positive_index)}
        val = _broadcast(val, d)
        score = _score(val, recipe.select_metric)
        unfreezer.record(score)
        improved = score > best["score"] or best["epoch"] < 0
        if improved:
            best = {"epoch": epoch, "score": score, "val": dict(val)}
        epoch_s = time.perf_counter() - t0

        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_auroc": val["auroc"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "stage": unfreezer.stage,
            "unfrozen_groups": len(unfreezer.layout()),
            "epoch_seconds": epoch_s,
            "samples_per_s": seen / max(train_s, 1e-9),
            "skipped_batches": skipped,
        }
        history.append(row)
        if d.main:
            lrs = {f"lr/{name}": lr for name, lr in unfreezer.lrs().items()}
            tracker.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"} | lrs)
            ckpt_io.save_epoch(
                run_dir,
                _state(
                    spec, recipe, arm, model, ema, unfreezer, scaler, tables, epoch, history, best, run_id, weight_info
                ),
                is_best=improved,
            )
            ui.info(_epoch_line(row, recipe, improved))
        _stop_for_test(epoch + 1)

    # -- the end: curves, best checkpoint, summary --
    wall = time.perf_counter() - t_start
    best_path = run_dir / ckpt_io.BEST
    if d.main:
        tracker.log_epoch(
            max(int(best["epoch"]), 0),
            {"best_epoch": int(best["epoch"]) + 1, **{f"best_val_{k}": v for k, v in best["val"].items()}},
        )
        _log_final_artifacts(tracker, run_dir, history, unfreezer, recipe)
    done = [h for h in history if h["epoch"] >= start_epoch]
    return ArmResult(
        role=arm.role,
        run_id=run_id,
        best_epoch=int(best["epoch"]),
        select_metric=recipe.select_metric,
        val={k: float(v) for k, v in best["val"].items()},
        epochs=recipe.epochs,
        wall_s=wall,
        checkpoint=str(best_path) if d.main else None,
        epoch_s=float(np.mean([h["epoch_seconds"] for h in done])) if done else 0.0,
        samples_per_s=float(np.mean([h["samples_per_s"] for h in done])) if done else 0.0,
        resumed_from_epoch=start_epoch if arm.resume is not None else None,
        history=history,
    )


def _state(
    spec: DataSpec,
    recipe: Recipe,
    arm: Arm,
    model: nn.Module,
    ema: WeightEMA | None,
    unfreezer: Unfreezer,
    scaler: torch.amp.GradScaler,
    tables: Tables,
    epoch: int,
    history: list[dict[str, float]],
    best: dict[str, Any],
    run_id: str,
    weight_info: dict[str, Any],
) -> dict[str, Any]:
    def cpu(m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}

    # "model" is always what was validated and ships (the average under EMA); the raw weights and the
    # average's step count are only needed to resume.
    extra = {"train_model": cpu(model), "ema": ema.state_dict()} if ema is not None else {}
    return ckpt_io.plain(
        {
            "model": cpu(ema.module if ema is not None else model),
            **extra,
            "optimizer": unfreezer.optimizer.state_dict(),
            "scheduler": unfreezer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
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
            "hashes": dict(tables.hashes),
            "fold": tables.fold,
            "run_id": run_id,
            "role": arm.role,
            "control": arm.control,
            "weight_report": weight_info,
            "best_metric": float(best["score"]) if math.isfinite(best["score"]) else float("nan"),
            "best": {"epoch": int(best["epoch"]), "score": float(best["score"]), "val": dict(best["val"])},
            "history": history,
        }
    )


def _epoch_line(row: dict[str, float], recipe: Recipe, improved: bool) -> str:
    return (
        f"epoch {int(row['epoch']) + 1}/{recipe.epochs} stage {int(row['stage'])} "
        f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} val_auroc {row['val_auroc']:.4f} "
        f"val_bal_acc {row['val_balanced_accuracy']:.4f} {row['epoch_seconds']:.1f}s "
        f"{row['samples_per_s']:.1f} samples/s" + (" *" if improved else "")
    )


def _log_ingest_report(tracker: tracking.Tracker, ws: Workspace) -> None:
    if not ws.ingest_report.is_file():
        return
    try:
        tracker.log_text(ws.ingest_report.read_text(), "reports/ingest_report.json")
    except tracking.PHIRefused as exc:
        ui.warn(f"ingest report not logged: {exc}")


def _log_final_artifacts(
    tracker: tracking.Tracker, run_dir: Path, history: list[dict[str, float]], unfreezer: Unfreezer, recipe: Recipe
) -> None:
    if not tracker.enabled:
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        curve = tracking.plot_learning_curves(
            history, unfreezer.transitions, Path(tmp) / "learning_curve.png", recipe.select_metric
        )
        tracker.log_file(curve, "plots")
        tracker.log_json(history, "history.json")
        best = ckpt_io.load(run_dir / ckpt_io.BEST)
        safe = ckpt_io.for_tracking(best)
        tracker.guard.check_tree("checkpoint", {k: v for k, v in safe.items() if k != "model"})
        ckpt_io.atomic_save(safe, Path(tmp) / "best.pt")
        tracker.log_file(Path(tmp) / "best.pt", "checkpoints")


# --- the stage -------------------------------------------------------------------------------------------------------
RESULT = "result.json"  # written into a run folder when its arm finished; a resume skips that arm


def _guard(spec: DataSpec, ws: Workspace, tables: Tables) -> tracking.PHIGuard:
    return tracking.PHIGuard.for_training(spec, tables.manifest["files"], pseudonym_map=ws.pseudonym_map)


def _write_result(ws: Workspace, res: ArmResult) -> None:
    path = ws.run_dir(str(res.run_id)) / RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res.__dict__, default=float))
    os.replace(tmp, path)


def _read_result(ws: Workspace, run_id: str | None) -> ArmResult | None:
    path = ws.run_dir(run_id) / RESULT if run_id else None
    return ArmResult(**json.loads(path.read_text())) if path is not None and path.is_file() else None


def _resume_ckpt(ws: Workspace, uri: str, experiment: str, role: str, parent_run_id: str | None = None) -> str | None:
    """The newest unfinished run (of `role`) that has a checkpoint or a finished result to continue from."""
    for run_id in tracking.find_unfinished_runs(uri, experiment, role=role, parent_run_id=parent_run_id):
        run_dir = ws.run_dir(run_id)
        if any((run_dir / n).exists() for n in (ckpt_io.LAST, ckpt_io.PREV, RESULT)):
            return run_id
    return None


def _arm_to_resume(
    ws: Workspace,
    run_id: str,
    role: str,
    tables: Tables,
    d: Dist,
    control: str | None = None,
    parent: str | None = None,
) -> Arm:
    """An Arm continuing `run_id` from its newest readable checkpoint (every rank reads it from disk)."""
    ckpt, _ = ckpt_io.load_resume(ws.run_dir(run_id), warn=ui.warn if d.main else None)
    if ckpt["hashes"] != tables.hashes or ckpt.get("fold") != tables.fold:
        changed = [k for k in tables.hashes if ckpt["hashes"].get(k) != tables.hashes[k]]
        changed += ["validation fold"] if ckpt.get("fold") != tables.fold else []
        raise MedxferError(
            f"cannot resume run {run_id}: the {', '.join(changed)} changed since it started; "
            "start a new run without --resume"
        )
    return Arm(
        role, recipe_from_dict(ckpt["recipe"]), control=control, run_id=run_id, resume=ckpt, parent_run_id=parent
    )


def _run_arm(
    spec: DataSpec, ws: Workspace, arm: Arm, tables: Tables, loaders: Loaders, d: Dist, tracker: tracking.Tracker
) -> ArmResult:
    """Train one arm, or pick up its stored result when a resumed run had already finished it."""
    done = _read_result(ws, arm.run_id)
    if done is not None:
        if d.main:
            tracker.resume(str(arm.run_id))
            ui.info(f"{arm.role} run {arm.run_id} already finished training; not repeated")
        return done
    res = _fit(spec, ws, arm, tables, loaders, d, tracker)
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


def _tracker(uri: str, spec: DataSpec, guard: tracking.PHIGuard, d: Dist, track: bool) -> tracking.Tracker:
    return tracking.Tracker(uri, spec.name, guard, enabled=d.main) if track else _Untracked(uri, spec.name, guard)


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
) -> TrainResult:
    """Train (or continue) a classifier for `spec`; returns run ids, best epoch and validation metrics.

    `fold` picks the validation fold when the spec splits into k folds (default 0). `track=False`
    logs nothing to MLflow (checkpoints and the run folder are still written; evaluate/register need a
    tracked run): for measuring the tracking overhead and for throw-away experiments.
    """
    if control is not None and control not in CONTROLS:
        raise MedxferError(f"--control {control!r}: use one of {', '.join(CONTROLS)}")
    ws = Workspace.for_spec(workspace, spec.name)
    tables = _read_tables(spec, ws, fold)
    started_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = _setup_device(device)
    if d.device.type == "cpu":
        # Same seed, same numbers: a resumed run must retrace the uninterrupted one.
        torch.use_deterministic_algorithms(True, warn_only=True)
    uri = ws.tracking_uri
    guard = _guard(spec, ws, tables) if d.main else tracking.PHIGuard()

    # -- which run: a new one, or the unfinished one we continue --
    if resume:
        if recipe is not None or overrides or weights is not None:
            ui.warn("--resume continues with the run's own recipe; --recipe, --set and --weights are ignored")
        run_id = _resume_ckpt(ws, uri, spec.name, "main") if d.main else None
        run_id = _broadcast(run_id, d)
        if run_id is None:
            raise MedxferError(
                f"no unfinished training run of spec '{spec.name}' with a checkpoint to resume; "
                "start one with `medxfer train SPEC`"
            )
        tags = tracking.run_tags(uri, run_id) if d.main else {}
        control = _broadcast(control or tags.get(tracking.TAG_CONTROL), d)
        if fold is None and tables.fold is not None:  # k-fold: continue on the run's own fold
            tables = _read_tables(spec, ws, ckpt_io.load_resume(ws.run_dir(run_id))[0].get("fold"))
        main_arm = _arm_to_resume(ws, run_id, "main", tables, d)
    else:
        main_arm = Arm(
            "main",
            load_recipe(recipe, spec.dims, overrides or [], weights=weights),
            tags={tracking.TAG_CONTROL: control} if control else {},
        )
    rec = main_arm.recipe
    if d.main:
        ui.info(
            f"train {spec.name}: {len(tables.train)} train / {len(tables.val)} val studies, {rec.encoder}, "
            f"{rec.epochs} epochs on {d.device}" + (f" x{d.world}" if d.active else "")
        )

    main_tracker = _tracker(uri, spec, guard, d, track)
    status = "failed"
    try:
        loaders = _make_loaders(spec, rec, ws, tables, d)
        main = _run_arm(spec, ws, main_arm, tables, loaders, d, main_tracker)
        ctl = None
        if control is not None:
            ctl = _run_control(spec, ws, main_arm, control, tables, loaders, d, uri, guard, main_tracker, resume, track)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        _ended(main_tracker, status)
        if d.active and status == "finished":
            dist.barrier()
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
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
    tables: Tables,
    loaders: Loaders,
    d: Dist,
    uri: str,
    guard: tracking.PHIGuard,
    parent: tracking.Tracker,
    resume: bool,
    track: bool = True,
) -> ArmResult:
    """The control arm as a nested run; its id is tagged on the parent as soon as it exists."""
    parent_id = str(main_arm.run_id)
    child = None
    if resume and d.main:
        child = _resume_ckpt(ws, uri, spec.name, "control", parent_run_id=parent_id)
    child = _broadcast(child, d)
    if child is not None:
        arm = _arm_to_resume(ws, child, "control", tables, d, control=kind, parent=parent_id)
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
    tracker = _tracker(uri, spec, guard, d, track)
    status = "failed"
    try:
        res = _run_arm(spec, ws, arm, tables, loaders, d, tracker)
        status = "finished"
        return res
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        _ended(tracker, status)

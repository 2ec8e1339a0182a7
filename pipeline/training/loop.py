"""The fit of one arm, top to bottom: build once, open the run, then every epoch train -> validate -> callbacks.

``build`` makes the model, loss, unfreezing schedule, gradient scaler and weight average once (a resumed arm
restores them from its checkpoint) into a :class:`Fit`, which the loop and the callbacks share. Everything
besides training and validation (MLflow, checkpoints, the console) hangs off the callbacks in
:mod:`medxfer.training.callbacks`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medxfer import tracking
from medxfer.config.recipe import Recipe
from medxfer.config.spec import DataSpec
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace
from medxfer.ingest.manifest import Joined
from medxfer.stats.metrics import auroc
from medxfer.training import checkpoint as ckpt_io
from medxfer.training.callbacks import Callback, CallbackList, EpochEnd, default_callbacks
from medxfer.training.distributed import (
    Dist,
    all_finite,
    amp_dtype,
    broadcast,
    memory_format,
    seed_epoch,
    sum_over_ranks,
    to_memory_format,
    wrap,
)
from medxfer.training.ema import WeightEMA
from medxfer.training.losses import build_loss, init_head_bias
from medxfer.training.unfreeze import Unfreezer
from torch import nn


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


@dataclass
class Loaders:
    train: Any  # medxfer.data.datasets.StudyLoader: set_epoch seeds the sampler and the augmentation
    val: Any
    n_train: int
    counts: list[int]  # training class counts of the studies that loaded
    summary: dict[str, Any]


@dataclass
class Fit:
    """The built parts of one arm's fit and its running state, shared by the loop and the callbacks."""

    spec: DataSpec
    arm: Arm
    tables: Joined
    loaders: Loaders
    d: Dist
    model: nn.Module
    loss_fn: nn.Module
    unfreezer: Unfreezer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    amp: torch.dtype | None
    fmt: torch.memory_format | None
    weight_info: dict[str, Any]
    class_weights: list[float] | None
    priors: list[float]
    hashes: dict[str, str]
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "score": -math.inf, "val": {}})
    start_epoch: int = 0
    run_id: str | None = None
    run_dir: Path | None = None
    new_stage: bool = False  # this epoch began a new unfreezing stage
    wall_s: float = 0.0
    augment: Any = None  # medxfer.data.batch_augment.BatchAugment: the random part, once per batch on the device
    epoch: int = 0  # the epoch being trained (seeds the batched augmentation)
    features: Any = None  # _FeatureCache of a head-only stage without augmentation

    @property
    def recipe(self) -> Recipe:
        return self.arm.recipe

    @property
    def shipped(self) -> nn.Module:
        """The weights that are validated and checkpointed: the average under EMA."""
        return self.ema.module if self.ema is not None else self.model


# --- the loop --------------------------------------------------------------------------------------------------------
def fit(
    spec: DataSpec,
    ws: Workspace,
    arm: Arm,
    tables: Joined,
    loaders: Loaders,
    d: Dist,
    tracker: tracking.Tracker,
    callbacks: Sequence[Callback] = (),
) -> Fit:
    """Train one arm; `callbacks` run after the built-in ones (which run on rank 0 only), on every rank."""
    t_start = time.perf_counter()
    f = build(spec, arm, tables, loaders, d)
    open_run(f, ws, tracker)
    cbs = CallbackList([*(default_callbacks(ws, tracker) if d.main else []), *callbacks])
    cbs.on_fit_start(f)
    net = wrap(f.model, d)
    with cbs.reporting_errors(f):
        for epoch in range(f.start_epoch, f.recipe.epochs):
            f.new_stage = f.unfreezer.begin_epoch(epoch)
            if f.new_stage:
                net = wrap(f.model, d)  # DDP registers only the parameters that required grad when it was built
            seed_epoch(f.recipe.seed, epoch, d.rank)
            loaders.train.set_epoch(epoch)
            f.epoch = epoch
            cbs.on_epoch_start(f, epoch)
            t0 = time.perf_counter()
            train_loss, seen, skipped = train_epoch(net, f, cbs)
            train_s = time.perf_counter() - t0
            cbs.on_validation_start(f)
            val = validate(f)
            improved = record(f, epoch, val)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_auroc": val["auroc"],
                "val_balanced_accuracy": val["balanced_accuracy"],
                "stage": f.unfreezer.stage,
                "unfrozen_groups": len(f.unfreezer.layout()),
                "epoch_seconds": time.perf_counter() - t0,
                "samples_per_s": seen / max(train_s, 1e-9),
                "skipped_batches": skipped,
            }
            f.history.append(row)
            cbs.on_epoch_end(f, EpochEnd(epoch, row, improved))
    f.wall_s = time.perf_counter() - t_start
    cbs.on_fit_end(f)
    return f


# --- set-up ----------------------------------------------------------------------------------------------------------
def build(spec: DataSpec, arm: Arm, tables: Joined, loaders: Loaders, d: Dist) -> Fit:
    """Model, loss, schedule, scaler and weight average, built once; a resumed arm restores them."""
    from medxfer.data.batch_augment import build_batch_augment
    from medxfer.models.factory import create_classifier

    recipe = arm.recipe
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
    amp = amp_dtype(recipe, d.device)
    fmt = memory_format(spec.dims) if d.device.type == "cuda" and recipe.channels_last else None
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
    f = Fit(
        spec,
        arm,
        tables,
        loaders,
        d,
        model,
        loss_fn,
        unfreezer,
        scaler,
        ema,
        amp,
        fmt,
        weight_info=weight_info,
        class_weights=class_weights,
        priors=priors,
        hashes=tables.hashes(spec),
    )
    f.augment = build_batch_augment(spec, recipe, rank=d.rank)
    if arm.resume is not None:
        _restore(f, arm.resume)
    return f


def _restore(f: Fit, c: dict[str, Any]) -> None:
    """Continue where the checkpoint stopped: weights, average, schedule, optimiser, scaler, RNG and history."""
    f.model.load_state_dict(c["train_model"] if f.ema is not None else c["model"])
    if f.ema is not None:
        f.ema.load_state_dict(c["ema"], c["model"])
    f.unfreezer.load_state_dict(c["scheduler"])
    f.unfreezer.optimizer.load_state_dict(c["optimizer"])
    if c["scaler"]:
        f.scaler.load_state_dict(c["scaler"])
    ckpt_io.set_rng_state(c["rng"])
    f.history, f.best, f.start_epoch = list(c["history"]), dict(c["best"]), int(c["epoch"]) + 1


def open_run(f: Fit, ws: Workspace, tracker: tracking.Tracker) -> None:
    """Rank 0 starts the arm's MLflow run (or reopens the one it continues); every rank learns its id."""
    arm, recipe = f.arm, f.recipe
    run_id = None
    if f.d.main and arm.run_id is not None:  # from its checkpoint, or from the start after an early torchrun restart
        run_id = tracker.resume(str(arm.run_id))
    elif f.d.main:
        run_name = f"{f.spec.name}-{recipe.encoder}" + (f"-control-{arm.control}" if arm.control else "")
        tags = {tracking.TAG_ROLE: arm.role, "medxfer.encoder": recipe.encoder, **arm.tags}
        run_id = tracker.start(run_name, tags, parent_run_id=arm.parent_run_id)
        if arm.on_start is not None:
            arm.on_start(run_id)
    f.run_id = arm.run_id = broadcast(run_id, f.d)
    f.run_dir = ws.run_dir(f.run_id)


def sampled_counts(counts: list[int], balanced: bool) -> list[int]:
    """Class counts as the model sees them: a balanced sampler already evens them out, so auto alpha and
    the prior bias must not correct the imbalance a second time."""
    if not balanced:
        return list(counts)
    present = [c for c in counts if c > 0]
    mean = round(sum(present) / len(present)) if present else 0
    return [mean if c > 0 else 0 for c in counts]


# --- one epoch -------------------------------------------------------------------------------------------------------
def train_epoch(net: nn.Module, f: Fit, cbs: Callback) -> tuple[float, int, int]:
    """One pass over this rank's shard. Returns (mean loss over all ranks, samples over all ranks, skipped).

    A head-only stage without augmentation trains the head on encoder features computed once for the stage
    (``_FeatureCache``); otherwise every batch runs the model (the frozen encoder then under no_grad, through the
    unfreezer's hooks), after the batched augmentation when the recipe has one.
    """
    d, unfreezer = f.d, f.unfreezer
    net.train()
    unfreezer.set_train_mode()
    cache = _stage_features(f, net)
    total = torch.zeros((), dtype=torch.float64, device=d.device)  # on the device: no sync per step
    seen = skipped = 0
    for step, batch in enumerate(f.loaders.train):
        hit = cache.lookup(batch) if cache is not None else None
        if hit is not None:
            feats, y = hit
        else:
            x, y = train_batch(f, batch, step)
        unfreezer.step_lr()
        with torch.autocast(d.device.type, dtype=f.amp or torch.float32, enabled=f.amp is not None):
            logits = f.model.head(f.model.dropout(feats)) if hit is not None else net(x)
            loss = f.loss_fn(logits, y)
        unfreezer.optimizer.zero_grad(set_to_none=True)
        if not all_finite(loss, d):
            skipped += 1  # one bad batch must not poison the weights; all bad stops the stage below
            continue
        f.scaler.scale(loss).backward()
        f.scaler.step(unfreezer.optimizer)
        f.scaler.update()
        if f.ema is not None:
            f.ema.update(getattr(net, "module", net))  # unwrap DDP: the average keys match the plain model
        total += loss.detach().double() * len(y)
        seen += len(y)
        cbs.on_step_end(f, total, seen)
    stats = sum_over_ranks(torch.tensor([total.item(), seen, skipped], dtype=torch.float64, device=d.device), d)
    total_loss, seen_all, skipped_all = stats.tolist()
    if seen_all == 0:
        raise StageError(
            "every training batch gave a non-finite loss; lower optim.lr (e.g. --set optim.lr=1e-4) or set amp: off"
        )
    return total_loss / seen_all, int(seen_all), int(skipped_all / max(d.world, 1))


def train_batch(f: Fit, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on the device: the batched augmentation (seeded by epoch and step), then the memory format."""
    if f.augment is None:
        return _unpack(batch, f.d.device, f.fmt)
    x, y = _unpack(batch, f.d.device, None)
    x = f.augment(x, f.epoch, step)
    return (x.contiguous(memory_format=f.fmt) if f.fmt is not None else x), y


# Features of a whole training split above this stay uncached (the per-step path runs instead): 2 GB is
# ~400k studies of EfficientNet-Lite0's 1280 floats.
_FEATURE_CACHE_BYTES = 2e9


class _FeatureCache:
    """Encoder features of every training study for one head-only stage, on the training device.

    Valid while the encoder is frozen and in eval mode and the input is the same every epoch (no augmentation):
    the features are then a fixed function of the cached tensor. Computed once in dataset order at a fixed batch
    size, so a resumed run gets the same numbers as one that never stopped.
    """

    def __init__(self, stage: int, keys: dict[str, int], feats: torch.Tensor):
        self.stage, self.keys, self.feats = stage, keys, feats

    def lookup(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features, labels) of the batch's studies; None if one was not cached (it failed while caching)."""
        if any(k not in self.keys for k in batch["study_key"]):
            return None
        idx = torch.tensor([self.keys[k] for k in batch["study_key"]], dtype=torch.long)
        feats = self.feats[idx.to(self.feats.device)]
        return feats, torch.as_tensor(batch["label"]).to(self.feats.device, non_blocking=True).long().view(-1)


def _can_cache_features(f: Fit, net: nn.Module) -> bool:
    from medxfer.models.classifier import Classifier

    model, ds = f.model, getattr(f.loaders.train, "dataset", None)
    return (
        f.unfreezer.encoder_frozen
        and not f.d.active  # DDP all-reduces through its wrapped forward, which the head-only step bypasses
        and net is model
        and isinstance(model, Classifier)
        and f.augment is None
        and ds is not None
        and getattr(ds, "random_part", "unknown") is None
        and not any(m.training and _mode_dependent(m) for m in model.encoder.modules())
        and len(ds) * model.feature_dim * 4 <= _FEATURE_CACHE_BYTES
    )


def _mode_dependent(m: nn.Module) -> bool:
    """Modules whose output differs between train and eval mode: in train mode they would make every epoch's
    features different (BN batch statistics, dropout, stochastic depth). Containers and pools do not count."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)
    return isinstance(m, kinds) or type(m).__name__ in ("DropPath", "DropBlock2d", "DropBlock3d")


@torch.no_grad()
def _stage_features(f: Fit, net: nn.Module) -> _FeatureCache | None:
    """The head-only stage's feature cache (built on its first epoch), or None where the per-step path must run."""
    if not _can_cache_features(f, net):
        f.features = None
        return None
    if f.features is not None and f.features.stage == f.unfreezer.stage:
        return f.features
    f.features = None  # the previous stage's features go before the new ones are computed
    ds, model, d = f.loaders.train.dataset, f.model, f.d
    bs = max(1, int(f.recipe.data.batch_size))
    keys: dict[str, int] = {}
    parts: list[torch.Tensor] = []
    for start in range(0, len(ds), bs):
        items = [ds[i] for i in range(start, min(start + bs, len(ds)))]
        items = [it for it in items if "image" in it]  # a failed study is skipped, as the loader skips it
        if not items:
            continue
        x = torch.stack([it["image"] for it in items]).to(d.device, non_blocking=True).float()
        if f.fmt is not None:
            x = x.contiguous(memory_format=f.fmt)
        with torch.autocast(d.device.type, dtype=f.amp or torch.float32, enabled=f.amp is not None):
            parts.append(model.encoder(x))
        for it in items:
            keys[it["study_key"]] = len(keys)
    if not parts:
        return None
    f.features = _FeatureCache(f.unfreezer.stage, keys, torch.cat(parts))
    return f.features


def validate(f: Fit) -> dict[str, float]:
    """Rank 0 scores the whole validation split (exact metrics, no padded shards); every rank gets the numbers."""
    val = None
    if f.d.main:
        val_loss, prob, y = predict(f.shipped, f.loaders.val, f.loss_fn, f.d.device, f.amp, f.fmt)
        val = {"loss": val_loss, **val_metrics(prob, y, f.spec.positive_index)}
    return broadcast(val, f.d)


def record(f: Fit, epoch: int, val: dict[str, float]) -> bool:
    """Feed the score to the plateau trigger and keep the best epoch; True when this one is the best so far."""
    score = _score(val, f.recipe.select_metric)
    f.unfreezer.record(score)
    improved = score > f.best["score"] or f.best["epoch"] < 0
    if improved:
        f.best = {"epoch": epoch, "score": score, "val": dict(val)}
    return improved


def _unpack(batch: Any, device: torch.device, fmt: torch.memory_format | None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
    x = torch.as_tensor(x).to(device, non_blocking=True).float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, torch.as_tensor(y).to(device, non_blocking=True).long().view(-1)


@torch.no_grad()
def predict(
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

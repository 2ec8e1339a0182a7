"""``medxfer plan SPEC``: a recipe per arm derived from the data's fingerprint, every decision with its reason.

nnU-Net configures itself from a dataset fingerprint with fixed, stated rules; this does the same for a
classification transfer recipe. :func:`make_plan` is a pure function of the dataset fingerprint, the machine
and a cost probe (seconds and bytes per training sample at the planned size, measured by :func:`probe_cost`
with a few real steps), so each rule can be tested on its own. The rules:

- **input size** (2D): the median in-plane side, raised to at least 128 px (ImageNet encoders downsample 32x; the
  tuned 2D default measured 28 -> 128 px upsampling, and MedMNIST+'s best BreastMNIST model is at 128 px), rounded
  to 32, capped at 224 px on a CPU and 384 px on a GPU.
- **input size** (3D) and **resampling**: the target spacing is the median spacing; when the data is anisotropic
  (largest/smallest median spacing > 3) the coarse axis takes its 10th percentile spacing instead (nnU-Net's rule).
  The size is the median extent at that spacing, rounded to 8, and scaled down isotropically to a voxel budget
  (64^3 on a CPU, 128^3 on a GPU); at least 40 per axis (EfficientNet-Lite's 32x downsampling leaves a 1^3 map
  below that: see the 3D default recipe).
- **encoder and weights**: the registry's default for the dims with its offline pretrained weights.
- **batch size**: the largest power of two whose probed memory fits in a quarter of the available memory, within
  [4, 64] and at most a quarter of the training studies (so an epoch has >= 4 steps).
- **loss**: focal (gamma 2, alpha from the class frequencies) when the minority class is < 40% of the studies,
  cross-entropy otherwise.
- **arms**: the transfer arm (fine-tuning every group with discriminative LRs), progressive unfreezing in
  addition when the smallest class has < 100 training studies (few examples: the pretrained features
  need protecting early), a linear probe, and a scratch control.
- **budget** (the whole run, ingest to registered model): the budget less what ingest and planning already took
  and less what follows the race (every fold member's test inference at the probed inference cost, plus a
  measured constant for the ensemble run, evaluation and registration) is the race's. The race is priced as
  its successive-halving schedule (:func:`schedule_cost`) over per-fold arm costs: a fixed part (a measured
  constant for set-up and logging, plus the out-of-fold inference) and, per epoch, the arm's probed training
  step per sample x the training studies, the validation pass, a checkpoint write and a per-epoch constant.
- **folds**: 5, fewer (down to 2) when the race at the minimum epochs would not fit.
- **epochs**: what the race's share buys, within [min, max]; at 2 folds and below the minimum, fewer epochs
  (down to 1) with a loud ``budget`` decision rather than a run 10x over its budget.

The packaged recipes stay available as named presets (``--recipe default_2d`` / ``default_3d``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from medxfer.config.recipe import default_recipe_path
from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.jsonio import dump_json
from medxfer.core.workspace import Workspace
from medxfer.planning.fingerprint import dataset_fingerprint, machine_fingerprint

FORMAT = 1
MIN_SIDE_2D = 128
CAP_SIDE_2D = {"cpu": 224, "cuda": 384}
VOXEL_BUDGET_3D = {"cpu": 64**3, "cuda": 128**3}
MIN_SIDE_3D = 40
ANISOTROPY = 3.0
BATCH_RANGE = (4, 64)
MEMORY_SHARE = 0.25
FOCAL_BELOW = 0.40
PROGRESSIVE_BELOW = 100
FOLDS_DEFAULT, FOLDS_MIN = 5, 2
EPOCHS_RANGE = {2: (4, 30), 3: (3, 20)}
# What the probe cannot time, measured on the loaded 2-core machine: a fold run's fixed cost beyond its epochs
# (loaders, model build, the MLflow run, the final checkpoint and model logging, loading the best checkpoint for
# the out-of-fold pass): the 5m breast run's transfer folds took 52 s each beyond their training wall, of
# which ~46 s was the out-of-fold pass the probe prices; the per-epoch logging; and what follows the race
# beyond the inference the probe prices (ensemble run, evaluate's calibration/plots/card, register): 7.7 s on
# the tiny set (load 3). The bootstrap is no longer a cost that counts: since its batched path, 1000 resamples
# take 0.034 s on 156 test studies and 0.012 s for the validation AUROC (idle), so 1 ms a resample covers a
# 10x slower machine and larger sets. The 0.24 s a resample this used to charge (from 246 s of evaluation on the
# breast demo at load 6, before the batched path) made the 10m breast run (idle, 2026-12-03 15:38 UTC) plan
# 267 s after the race and take 26 s: 2 folds and 4 epochs where the budget paid for more, 35% of it used.
FOLD_FIXED_S = 6.0
EPOCH_FIXED_S = 0.3
POST_FIXED_S = 8.0
POST_PER_RESAMPLE_S = 0.001
PLAN_WRITE_S = 0.5  # plan.json and the recipes, after the clock stops


@dataclass
class Decision:
    key: str
    value: Any
    reason: str


@dataclass
class Arm:
    name: str
    kind: str  # transfer | progressive | probe | scratch
    overrides: dict[str, Any]
    epochs: int
    estimated_s: float  # per fold: fixed_s + epochs x epoch_s
    fixed_s: float = 0.0  # per fold: set-up, logging, out-of-fold inference
    epoch_s: float = 0.0  # per epoch: training steps, validation pass, checkpoint, logging
    s_per_sample: float = 0.0  # the probed training-step seconds per sample of this arm's kind


@dataclass
class Plan:
    fingerprint: dict[str, Any]
    machine: dict[str, Any]
    probe: dict[str, Any]
    budget_s: float
    decisions: list[Decision] = field(default_factory=list)
    arms: list[Arm] = field(default_factory=list)
    folds: int = FOLDS_DEFAULT
    reserved_s: float = 0.0  # already spent when planning ended (ingest, fingerprint, probe)
    race_s: float = 0.0  # the race's estimate: the halving schedule at the arms' per-fold costs
    post_s: float = 0.0  # after the race: ensemble, evaluation, registration

    def decision(self, key: str) -> Decision:
        return next(d for d in self.decisions if d.key == key)

    @property
    def estimated_s(self) -> float:
        """The whole run's estimate, ingest to registered model."""
        return self.reserved_s + self.race_s + self.post_s

    @property
    def race_deadline_s(self) -> float:
        """Seconds from the run's start by which the race must end, so that what follows still fits."""
        return self.budget_s - self.post_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "budget_s": self.budget_s,
            "estimated_s": round(self.estimated_s, 1),
            "reserved_s": round(self.reserved_s, 1),
            "race_s": round(self.race_s, 1),
            "post_s": round(self.post_s, 1),
            "folds": self.folds,
            "decisions": [asdict(d) for d in self.decisions],
            "arms": [asdict(a) for a in self.arms],
            "fingerprint": self.fingerprint,
            "machine": self.machine,
            "probe": self.probe,
            "presets": ["default_2d", "default_3d"],
        }


def _round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def _size_2d(fp: dict[str, Any], device: str) -> tuple[list[int], str]:
    median = fp["shape"]["p50"][:2]
    side = max(median)
    cap = CAP_SIDE_2D[device]
    target = min(cap, _round_to(max(side, MIN_SIDE_2D), 32))
    if side < MIN_SIDE_2D:
        why = (
            f"median image {median[0]:g}x{median[1]:g} px < {MIN_SIDE_2D}: upsampled to {target} px "
            "(ImageNet encoders downsample 32x)"
        )
    elif side > cap:
        why = f"median image {median[0]:g}x{median[1]:g} px > {cap} px cap on {device}: downsampled to {target} px"
    else:
        why = f"median image {median[0]:g}x{median[1]:g} px, rounded to a multiple of 32"
    return [target, target], why


def _size_3d(fp: dict[str, Any], device: str) -> tuple[list[int], list[float], str]:
    shape, spacing = fp["shape"]["p50"][:3], fp["spacing"]["p50"][:3]
    target_sp = list(spacing)
    why = [f"median spacing {'x'.join(f'{s:g}' for s in spacing)} mm"]
    ratio = max(spacing) / max(min(spacing), 1e-6)
    if ratio > ANISOTROPY:
        axis = spacing.index(max(spacing))
        target_sp[axis] = fp["spacing"]["p10"][axis]
        why.append(
            f"anisotropic ({ratio:.1f}x > {ANISOTROPY:g}): axis {axis} resampled to its 10th percentile "
            f"spacing {target_sp[axis]:g} mm (nnU-Net's rule)"
        )
    extent = [sh * sp / t for sh, sp, t in zip(shape, spacing, target_sp, strict=True)]
    budget = VOXEL_BUDGET_3D[device]
    # Scale the free axes to the voxel budget; an axis that would fall below the floor is held at it and the
    # others share what is left (a 256x256x60 extent at 64^3 gives 104x104x40 isotropically, 80x80x40 so).
    floored: set[int] = set()
    while True:
        free = [i for i in range(3) if i not in floored]
        room = budget / MIN_SIDE_3D ** len(floored)
        scale = min(1.0, (room / math.prod(extent[i] for i in free)) ** (1 / len(free))) if free else 1.0
        low = [i for i in free if extent[i] * scale < MIN_SIDE_3D]
        if not low:
            break
        floored |= set(low)
    size = [MIN_SIDE_3D if i in floored else max(MIN_SIDE_3D, _round_to(extent[i] * scale, 8)) for i in range(3)]
    if scale < 1.0:
        why.append(f"scaled {scale:.2f}x to the {round(budget ** (1 / 3))}^3 voxel budget on {device}")
    if floored:
        why.append(f"axes {sorted(floored)} held at {MIN_SIDE_3D} (below it the encoder's final map is 1 voxel)")
    return size, [round(s, 4) for s in target_sp], "; ".join(why)


def _batch(probe: dict[str, Any], machine: dict[str, Any], n_train: int) -> tuple[int, str]:
    per_sample = max(float(probe["bytes_per_sample"]), 1.0)
    avail = machine["memory_available_gb"] * 2**30 * MEMORY_SHARE
    fit = max(1, int(avail // per_sample))
    cap = max(BATCH_RANGE[0], n_train // 4)
    b = 2 ** int(math.log2(min(fit, BATCH_RANGE[1], cap)))
    b = max(BATCH_RANGE[0], b)
    why = (
        f"{per_sample / 2**20:.0f} MiB per sample (probed); {MEMORY_SHARE:.0%} of "
        f"{machine['memory_available_gb']:g} GiB fits {fit}; power of two within {list(BATCH_RANGE)}"
        f" and <= n_train/4 = {n_train // 4}"
    )
    return b, why


def make_plan(
    fp: dict[str, Any],
    machine: dict[str, Any],
    probe: dict[str, Any],
    budget_s: float,
    recipe_defaults: dict[str, Any] | None = None,
    reserved_s: float = 0.0,
) -> Plan:
    """The plan for this data on this machine within ``budget_s`` seconds of the whole run, ``reserved_s`` of
    which are already spent (ingest, planning): pure, no I/O."""
    dims, device = fp["dims"], machine["device"]
    p = Plan(fp, machine, probe, float(budget_s))
    d = p.decisions
    defaults = recipe_defaults or {}
    d.append(
        Decision("encoder", defaults.get("encoder"), f"the registry's {dims}D default, offline pretrained weights")
    )
    data: dict[str, Any] = {}
    if dims == 2:
        size, why = _size_2d(fp, device)
        d.append(Decision("input_size", size, why))
    else:
        size, spacing, why = _size_3d(fp, device)
        d.append(Decision("input_size", size, why))
        d.append(Decision("spacing", spacing, "target spacing: set preprocess.spacing in the spec to resample to it"))
    data["size"] = size
    n_trainval = fp["n_studies"] - int((fp.get("split") or {}).get("test", round(0.2 * fp["n_studies"])))
    n_train = max(1, round(n_trainval * (1 - 1 / FOLDS_DEFAULT)))
    batch, why = _batch(probe, machine, n_train)
    d.append(Decision("batch_size", batch, why))
    data["batch_size"] = batch

    minority = fp["minority_fraction"]
    if minority < FOCAL_BELOW:
        loss: dict[str, Any] = {"loss": "focal", "focal": {"gamma": 2.0, "alpha": "auto"}}
        why = f"minority class {minority:.0%} of studies < {FOCAL_BELOW:.0%}: focal loss, alpha from class frequencies"
    else:
        loss, why = (
            {"loss": "ce"},
            f"minority class {minority:.0%} >= {FOCAL_BELOW:.0%}: classes balanced enough for CE",
        )
    d.append(Decision("loss", loss["loss"], why))

    smallest_train = min(c["studies"] for c in fp["classes"].values()) * n_train / max(fp["n_studies"], 1)
    kinds = ["transfer"]
    why = "fine-tune every group from epoch 0 with discriminative LRs"
    if smallest_train < PROGRESSIVE_BELOW:
        kinds.append("progressive")
        why += (
            f"; smallest class has ~{smallest_train:.0f} training studies < {PROGRESSIVE_BELOW}: "
            "also progressive unfreezing (head first)"
        )
    kinds += ["probe", "scratch"]
    d.append(Decision("arms", kinds, why + "; a linear probe and a scratch control race it"))

    p.folds, epochs, costs, steps = _fit_budget(p, kinds, n_trainval, budget_s, reserved_s, defaults)
    base = {"data": data, **loss, "epochs": epochs}
    arm_overrides = {
        "transfer": {"stages": [{"epoch": 0, "groups": "all"}]},
        "progressive": {"stages": [{"epoch": 0, "groups": 0}, {"epoch": max(1, epochs // 4), "groups": "all"}]},
        "probe": {"stages": [{"epoch": 0, "groups": 0}]},
        # As training's scratch control: one LR for every layer and BatchNorm statistics learnt, not frozen.
        "scratch": {
            "weights": "none",
            "stages": [{"epoch": 0, "groups": "all"}],
            "freeze_bn_stats": False,
            "optim": {"lr_decay": 1.0},
        },
    }
    for k in kinds:
        fixed, per_epoch = costs[k](0), costs[k](1) - costs[k](0)
        est = round(costs[k](epochs), 1)
        p.arms.append(Arm(k, k, base | arm_overrides[k], epochs, est, round(fixed, 2), round(per_epoch, 3), steps[k]))
    return p


def _per_sample(probe: dict[str, Any]) -> tuple[float, float, float, float]:
    """(train, head-only, inference) seconds per sample and one checkpoint write's seconds, from the probe; a probe
    without the head/inference measurements (an old plan.json) falls back to 0.4x and 1/3 of a training step."""
    train = float(probe["seconds_per_sample"])
    head = float(probe.get("seconds_per_sample_head", 0.4 * train))
    infer = float(probe.get("seconds_per_sample_eval", train / 3))
    return train, head, infer, float(probe.get("checkpoint_s", 0.0))


def schedule_cost(k: int, fold_costs: list[float]) -> float:
    """Seconds the race's successive halving takes over ``k`` folds at these per-fold arm costs, when the
    costliest arms survive each halving (the race's :func:`rung_folds`, eta 2): an upper bound, no early losses."""
    from medxfer.planning.race import halving_cost, rung_folds

    return halving_cost(list(fold_costs), rung_folds(k))


def _fit_budget(
    p: Plan, kinds: list[str], n_trainval: int, budget_s: float, reserved_s: float, defaults: dict[str, Any]
) -> tuple[int, int, dict[str, Any], dict[str, float]]:
    """Folds and epochs the whole-run budget pays for, with the decisions that say so; per-arm cost per fold (a
    function of the epochs) and per-arm training seconds per sample."""
    d, fp = p.decisions, p.fingerprint
    s_train, s_head, s_infer, ckpt_s = _per_sample(p.probe)
    views = 2 if (defaults.get("evaluation") or {}).get("tta", False) and fp["dims"] == 2 else 1
    n_test = int((fp.get("split") or {}).get("test", round(0.2 * fp["n_studies"])))
    lo, hi = EPOCHS_RANGE[fp["dims"]]
    n_boot = int((defaults.get("evaluation") or {}).get("bootstrap", 1000))
    step = {"transfer": s_train, "scratch": s_train, "probe": s_head, "progressive": 0.25 * s_head + 0.75 * s_train}

    def model(k: int) -> tuple[float, float, dict[str, Any]]:
        n_val = n_trainval / k
        n_train = n_trainval - n_val
        # Per fold: the fixed set-up/logging cost, the out-of-fold inference (with test-time views), and per
        # epoch the training steps, the validation pass, a checkpoint write and the per-epoch logging.
        fixed = FOLD_FIXED_S + n_val * s_infer * views
        per_epoch = {a: n_train * step[a] + n_val * s_infer + ckpt_s + EPOCH_FIXED_S for a in kinds}
        costs = {a: (lambda e, a=a: fixed + e * per_epoch[a]) for a in kinds}
        at0 = schedule_cost(k, [costs[a](0) for a in kinds])
        slope = schedule_cost(k, [costs[a](1) for a in kinds]) - at0
        return at0, max(slope, 1e-9), costs

    # After the race: the ensemble run, evaluation (every member on the test split with its views, the
    # bootstrap CIs, calibration on the out-of-fold logits, the plots and the card) and registration.
    def post(k: int) -> float:
        # Evaluate passes every member over the test studies and, for the OOD statistics' features, over the
        # non-test ones too (each with its test-time views).
        return POST_FIXED_S + n_boot * POST_PER_RESAMPLE_S + k * (n_test + n_trainval) * s_infer * views

    folds, epochs = FOLDS_DEFAULT, 0
    for k in range(FOLDS_DEFAULT, FOLDS_MIN - 1, -1):
        at0, slope, costs = model(k)
        avail = budget_s - reserved_s - post(k)
        folds, epochs = k, int((avail - at0) // slope)
        if epochs >= lo:
            break
    race_budget = budget_s - reserved_s - post(folds)
    fold_why = f"{FOLDS_DEFAULT} by default"
    if folds < FOLDS_DEFAULT:
        fold_why = (
            f"{folds}, not {FOLDS_DEFAULT}: the race at {lo} epochs per fold would not fit the {race_budget:.0f} s "
            f"left for it with more folds"
        )
    d.append(Decision("folds", folds, fold_why + "; patient-grouped, stratified, test split untouched"))
    at0, slope, costs = model(folds)
    why = (
        f"{budget_s:.0f} s budget - {reserved_s:.0f} s spent (ingest, plan) - {post(folds):.0f} s after the race "
        f"(ensemble, evaluation, registration) = {race_budget:.0f} s for the race: {at0:.0f} s fixed (set-up, "
        f"out-of-fold inference) + {slope:.1f} s per epoch over the halving schedule; within [{lo}, {hi}]"
    )
    if epochs < lo:
        short = max(1, epochs)
        need_lo = at0 + lo * slope + reserved_s + post(folds)
        need_1 = at0 + slope + reserved_s + post(folds)
        if epochs >= 1:
            why_b = (
                f"BUDGET TOO SMALL: {folds} folds x {lo} epochs need ~{need_lo:.0f} s > {budget_s:.0f} s; "
                f"training {short} epoch(s) instead of the minimum {lo} to keep the promise"
            )
        else:
            why_b = (
                f"BUDGET TOO SMALL: even {folds} folds x 1 epoch need ~{need_1:.0f} s > {budget_s:.0f} s: "
                "the run will be over budget"
            )
        d.append(Decision("budget", "under_min" if epochs >= 1 else "over", why_b + "; raise --budget, or use a GPU"))
        epochs = short
    else:
        epochs = min(hi, epochs)
    d.append(Decision("epochs", epochs, why))
    p.reserved_s, p.post_s = float(reserved_s), round(post(folds), 1)
    p.race_s = round(at0 + epochs * slope, 1)
    return folds, epochs, costs, {a: round(step[a], 6) for a in kinds}


def probe_cost(
    encoder: str,
    dims: int,
    size: list[int],
    n_classes: int,
    steps: int = 3,
    batch: int = 2,
    spec: DataSpec | None = None,
    recipe: Any = None,
    head: bool = True,
) -> dict[str, Any]:
    """Seconds and bytes per training sample at ``size`` and ``batch``, measured the way the training loop runs.

    The real model in train mode, one warm-up step (it pays for allocation and kernel selection), then
    the median of ``steps`` timed steps, each with the recipe's batched augmentation when it has one. With
    ``head``: the same for a head-only step (the encoder frozen in eval mode, under no_grad: what the probe arm and a
    progressive arm's first stage pay per step), an inference pass (validation, out-of-fold and test inference)
    and one checkpoint write (weights + AdamW state: the loop writes one per improved epoch)."""
    import tempfile

    import psutil
    import torch
    from medxfer.models.factory import create_classifier

    model = create_classifier(encoder, n_classes, spatial_dims=dims, weights=None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    augment = None
    if spec is not None and recipe is not None:
        from medxfer.data.batch_augment import build_batch_augment

        augment = build_batch_augment(spec, recipe)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *size, generator=gen)
    y = torch.arange(batch) % max(n_classes, 1)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = rss0

    def timed(step: Any, n: int) -> float:
        nonlocal peak
        times = []
        for i in range(n + 1):
            t0 = time.perf_counter()
            step(i)
            peak = max(peak, proc.memory_info().rss)
            if i:  # the first step pays for allocation and kernel selection
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def full(i: int) -> None:
        xb = augment(x, 0, i) if augment is not None else x
        loss = torch.nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    per_step = timed(full, steps)
    out: dict[str, Any] = {
        "encoder": encoder,
        "size": list(size),
        "batch": batch,
        "steps": steps,
        "warmup_steps": 1,
        "augment": augment is not None,
        "seconds_per_sample": round(per_step / batch, 5),
        # RSS growth over the steps understates what the first step allocated; count the activations at least
        # as the parameter + Adam state size (3x the weights) when the growth is smaller.
        "bytes_per_sample": int(max(peak - rss0, 3 * sum(p.numel() * 4 for p in model.parameters())) / batch),
    }
    if not head:
        return out
    enc, top = getattr(model, "encoder", None), getattr(model, "head", None)
    if enc is not None and top is not None:
        head_opt = torch.optim.AdamW(top.parameters(), lr=1e-4)
        drop = getattr(model, "dropout", torch.nn.Identity())

        enc.eval()  # as the loop's frozen groups: eval mode (BatchNorm's running statistics) under no_grad

        def head_only(i: int) -> None:
            xb = augment(x, 0, i) if augment is not None else x
            with torch.no_grad():
                feats = enc(xb)
            loss = torch.nn.functional.cross_entropy(top(drop(feats)), y)
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            head_opt.step()

        out["seconds_per_sample_head"] = round(timed(head_only, steps) / batch, 5)
    model.eval()

    def infer(i: int) -> None:
        with torch.no_grad():
            model(x)

    out["seconds_per_sample_eval"] = round(timed(infer, steps) / batch, 5)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, Path(tmp) / "ckpt.pt")
        out["checkpoint_s"] = round(time.perf_counter() - t0, 4)
    return out


def write_plan(plan: Plan, ws: Workspace, recipe_defaults: dict[str, Any]) -> dict[str, Path]:
    """plan.json and one recipe file per arm under ``<workspace>/<spec>/plan/``; returns the paths."""
    out = ws.dir / "plan"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plan": ws.dir / "plan.json"}
    for arm in plan.arms:
        tree = _merge(dict(recipe_defaults), arm.overrides)
        path = out / f"{arm.name}.yaml"
        header = (
            f"# medxfer plan: arm '{arm.name}' ({arm.kind}), {arm.epochs} epochs, ~{arm.estimated_s:.0f} s per fold\n"
        )
        path.write_text(header + yaml.safe_dump(tree, sort_keys=False))
        paths[arm.name] = path
    body = plan.as_dict() | {"recipes": {k: str(v.relative_to(ws.dir)) for k, v in paths.items() if k != "plan"}}
    dump_json(body, paths["plan"])
    return paths


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_budget(text: str) -> float:
    """'30m', '90s', '1.5h' or plain seconds -> seconds."""
    t = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:])
    try:
        return float(t[:-1]) * unit if unit else float(t)
    except ValueError:
        from medxfer.core.errors import MedxferError

        raise MedxferError(f"--budget {text!r}: give seconds or a number with s, m or h, e.g. 30m") from None


@dataclass
class PlanResult:
    plan: Plan
    paths: dict[str, Path]

    def summary(self) -> dict[str, Any]:
        return self.plan.as_dict() | {"paths": {k: str(v) for k, v in self.paths.items()}}

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [(d.key, f"{d.value}: {d.reason}") for d in self.plan.decisions]
        rows += [(f"arm {a.name}", f"{a.epochs} epochs, ~{a.estimated_s:.0f} s per fold") for a in self.plan.arms]
        p = self.plan
        rows.append(
            (
                "estimate",
                f"{p.estimated_s / 60:.1f} min of {p.budget_s / 60:.1f} min budget (ingest + plan {p.reserved_s:.0f} s,"
                f" race {p.race_s:.0f} s, ensemble + evaluate + register {p.post_s:.0f} s)",
            )
        )
        rows.append(("written", ui.short_path(str(self.paths["plan"]))))
        return f"plan: {self.plan.fingerprint['spec']}", rows


def plan(
    spec: DataSpec,
    workspace: Path,
    budget: str | float = "30m",
    size: list[int] | None = None,
    spent_s: float = 0.0,
    overrides: list[str] | None = None,
) -> PlanResult:
    """Fingerprint the ingested data and the machine, probe the cost, decide, and write plan.json + recipes.

    ``size``: an input size the user fixed (``run --auto --set data.size=...``); the probe, the batch size and the
    epochs are then planned at it, and the input-size decision says so. ``spent_s``: seconds the run spent before
    planning (ingest); with planning's own seconds they are reserved out of the budget. ``overrides``: the run's
    ``--set`` list; the probe times the recipe they give (its augmentation, a batch size they fix)."""
    from medxfer.config.recipe import load_recipe, parse_override
    from medxfer.core.errors import StageError

    t0 = time.perf_counter()
    ws = Workspace.for_spec(workspace, spec.name)
    if not ws.manifest.is_file():
        raise StageError(f"no manifest for spec {spec.name!r} in {workspace}: run `medxfer ingest` first")
    budget_s = parse_budget(budget) if isinstance(budget, str) else float(budget)
    defaults = yaml.safe_load(default_recipe_path(spec.dims).read_text())
    overrides = list(overrides or [])
    recipe = load_recipe(None, spec.dims, overrides, n_classes=len(spec.classes))
    fixed_batch = "data.batch_size" in {parse_override(o)[0] for o in overrides}
    fp = dataset_fingerprint(spec, ws)
    machine = machine_fingerprint()
    # Probe at the size the rules will choose; the size rules do not depend on the probe.
    first = make_plan(fp, machine, {"seconds_per_sample": 0.0, "bytes_per_sample": 1}, budget_s, defaults)
    rule = first.decision("input_size")
    shape = list(size or rule.value)
    # Memory first (one step at batch 2 gives bytes per sample), then the batch-size rule, then the timing at
    # that batch: per-sample cost at batch 2 was 6-12x the loop's at batch 32 (the loop amortises per-step work).
    mem = probe_cost(defaults["encoder"], spec.dims, shape, len(spec.classes), steps=1, batch=2, head=False)
    batch = (
        int(recipe.data.batch_size)
        if fixed_batch
        else make_plan(fp, machine, mem, budget_s, defaults).decision("batch_size").value
    )
    probe = probe_cost(
        defaults["encoder"], spec.dims, shape, len(spec.classes), batch=batch, spec=spec, recipe=recipe
    ) | {"bytes_per_sample": mem["bytes_per_sample"]}
    reserved = float(spent_s) + (time.perf_counter() - t0) + PLAN_WRITE_S
    # The evaluation the run will do (bootstrap resamples, test-time views) as --set leaves it: what follows the race.
    priced = defaults | {"evaluation": recipe.evaluation.model_dump()}
    p = make_plan(fp, machine, probe, budget_s, priced, reserved_s=reserved)
    if size:
        d = p.decision("input_size")
        d.value, d.reason = list(size), f"set by the user (--set data.size); the rule gives {rule.value}: {rule.reason}"
        for arm in p.arms:
            arm.overrides["data"]["size"] = list(size)
    return PlanResult(p, write_plan(p, ws, defaults))

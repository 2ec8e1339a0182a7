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
- **folds**: 5, fewer (down to 2) when the budget cannot pay for every arm on every fold at the minimum epochs.
- **epochs**: what the budget buys each arm per fold, from the probed seconds per sample, within [min, max].

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
# Share of the budget for training arms; the rest pays ingest-free overheads: evaluation, the fold ensemble's
# calibration, registration (~15% of a tiny demo run's wall time).
TRAIN_SHARE = 0.85


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
    estimated_s: float


@dataclass
class Plan:
    fingerprint: dict[str, Any]
    machine: dict[str, Any]
    probe: dict[str, Any]
    budget_s: float
    decisions: list[Decision] = field(default_factory=list)
    arms: list[Arm] = field(default_factory=list)
    folds: int = FOLDS_DEFAULT

    def decision(self, key: str) -> Decision:
        return next(d for d in self.decisions if d.key == key)

    @property
    def estimated_s(self) -> float:
        return sum(a.estimated_s for a in self.arms) * self.folds

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "budget_s": self.budget_s,
            "estimated_s": round(self.estimated_s, 1),
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
) -> Plan:
    """The plan for this data on this machine within ``budget_s`` seconds (pure: no I/O)."""
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

    s_per_epoch = float(probe["seconds_per_sample"]) * n_train * (1.0 + 0.25)  # + validation passes
    lo, hi = EPOCHS_RANGE[dims]
    train_budget = budget_s * TRAIN_SHARE
    folds = FOLDS_DEFAULT
    # Successive halving runs every arm for a first rung of the epochs, then only the better half onward;
    # the cost of the race is then ~ (1 + 1/2 + ...) rungs of the full arm set: bounded by 2x one arm set.
    while folds > FOLDS_MIN and folds * len(kinds) * lo * s_per_epoch > train_budget:
        folds -= 1
    epochs = int(max(lo, min(hi, train_budget / max(folds * len(kinds) * s_per_epoch, 1e-9))))
    fold_why = f"{FOLDS_DEFAULT} by default"
    if folds < FOLDS_DEFAULT:
        fold_why = (
            f"{folds}, not {FOLDS_DEFAULT}: {len(kinds)} arms x {lo} epochs x {s_per_epoch:.1f} s/epoch per fold "
            f"would not fit {train_budget:.0f} s"
        )
    d.append(Decision("folds", folds, fold_why + "; patient-grouped, stratified, test split untouched"))
    d.append(
        Decision(
            "epochs",
            epochs,
            f"{train_budget:.0f} s for training / ({folds} folds x {len(kinds)} arms x {s_per_epoch:.1f} s per "
            f"epoch) within [{lo}, {hi}]",
        )
    )
    p.folds = folds
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
    cost = {"transfer": 1.0, "progressive": 0.8, "probe": 0.4, "scratch": 1.0}  # relative to a full step
    for k in kinds:
        est = epochs * s_per_epoch * cost[k]
        p.arms.append(Arm(k, k, base | arm_overrides[k], epochs, round(est, 1)))
    if p.estimated_s > budget_s:
        d.append(
            Decision(
                "budget",
                "over",
                f"even {folds} folds x {lo} epochs need ~{p.estimated_s / 60:.0f} min > {budget_s / 60:.0f} min: "
                "raise --budget, or use a GPU; successive halving stops losing arms early and spends less",
            )
        )
    return p


def probe_cost(
    encoder: str, dims: int, size: list[int], n_classes: int, steps: int = 2, batch: int = 2
) -> dict[str, Any]:
    """Seconds and bytes per training sample at ``size``: a few real forward/backward/step passes."""
    import psutil
    import torch
    from medxfer.models.factory import create_classifier

    model = create_classifier(encoder, n_classes, spatial_dims=dims, weights=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *size)
    y = torch.zeros(batch, dtype=torch.long)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = rss0
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        peak = max(peak, proc.memory_info().rss)
        if i:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2]
    return {
        "encoder": encoder,
        "size": size,
        "batch": batch,
        "steps": steps,
        "seconds_per_sample": round(per_step / batch, 5),
        # RSS growth over the steps understates what the first step allocated; count the activations at least
        # as the parameter + Adam state size (3x the weights) when the growth is smaller.
        "bytes_per_sample": int(max(peak - rss0, 3 * sum(p.numel() * 4 for p in model.parameters())) / batch),
    }


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
        rows.append(("estimate", f"{self.plan.estimated_s / 60:.1f} min of {self.plan.budget_s / 60:.1f} min budget"))
        rows.append(("written", ui.short_path(str(self.paths["plan"]))))
        return f"plan: {self.plan.fingerprint['spec']}", rows


def plan(spec: DataSpec, workspace: Path, budget: str | float = "30m", size: list[int] | None = None) -> PlanResult:
    """Fingerprint the ingested data and the machine, probe the cost, decide, and write plan.json + recipes.

    ``size``: an input size the user fixed (``run --auto --set data.size=...``); the probe, the batch size and the
    epochs are then planned at it, and the input-size decision says so."""
    from medxfer.core.errors import StageError

    ws = Workspace.for_spec(workspace, spec.name)
    if not ws.manifest.is_file():
        raise StageError(f"no manifest for spec {spec.name!r} in {workspace}: run `medxfer ingest` first")
    budget_s = parse_budget(budget) if isinstance(budget, str) else float(budget)
    defaults = yaml.safe_load(default_recipe_path(spec.dims).read_text())
    fp = dataset_fingerprint(spec, ws)
    machine = machine_fingerprint()
    # Probe at the size the rules will choose; the size rules do not depend on the probe.
    first = make_plan(fp, machine, {"seconds_per_sample": 0.0, "bytes_per_sample": 1}, budget_s, defaults)
    rule = first.decision("input_size")
    probe = probe_cost(defaults["encoder"], spec.dims, list(size or rule.value), len(spec.classes))
    p = make_plan(fp, machine, probe, budget_s, defaults)
    if size:
        d = p.decision("input_size")
        d.value, d.reason = list(size), f"set by the user (--set data.size); the rule gives {rule.value}: {rule.reason}"
        for arm in p.arms:
            arm.overrides["data"]["size"] = list(size)
    return PlanResult(p, write_plan(p, ws, defaults))

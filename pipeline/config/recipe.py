"""The training recipe: packaged defaults per dims, a user file, then ``--set key=value`` overrides.

Validated here and nowhere else; errors name the key and the fix. Every rule is a pydantic validator on
the models below. Rules that need context (the spec's dims and class count, the built model's layer-group
names) read it from the validation context and are skipped without it: ``load_recipe`` passes dims (and
the class count when given), ``check_recipe`` re-checks a Recipe against any of the three, and
``check_stages`` / ``check_focal_alpha`` serve the consumers that hold the context but not a Recipe
(``medxfer.training.unfreeze``, ``medxfer.training.losses``). All problems come out in one SpecError.

The resolved recipe is logged to MLflow (flattened params and a YAML artifact) and stored in checkpoints,
so a run can be reproduced from it alone.

No torch, monai or albumentations here: ``medxfer check-spec`` imports this module.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from medxfer.config.spec import FieldsError, SpecError, format_validation_error, yaml_error_text
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid")


def _context(info: ValidationInfo, key: str) -> Any:
    """dims | n_classes | group_names from the validation context; None when the caller gave none."""
    return (info.context or {}).get(key)


# Augmentation keys per dims (interpreted by medxfer.data.transforms / medxfer.data.augment2d); anything else is
# rejected so a typo never silently turns augmentation off.
AUGMENT_KEYS: dict[int, dict[str, str]] = {
    2: {
        "flip": "true: horizontal flip with p=0.5",
        "rotate": "max degrees; angle uniform in [-rotate, rotate]",
        "scale": "zoom fraction s; factor uniform in [1-s, 1+s]",
        "brightness": "max additive brightness change, fraction of the [0, 1] range",
        "contrast": "max contrast change, fraction (factor uniform in [1-c, 1+c])",
    },
    3: {
        "flip": "true: left-right flip (RAS axis 0) with p=0.5; or a list of axes (0=L-R, 1=P-A, 2=I-S)",
        "rotate": "max degrees about each axis",
        "scale": "zoom fraction s per axis; factor uniform in [1-s, 1+s]",
        "intensity_shift": "max additive intensity shift (images are in [0, 1])",
    },
}
_AUGMENT_LIMITS = {"rotate": 180.0, "scale": 0.9, "brightness": 1.0, "contrast": 1.0, "intensity_shift": 1.0}


def augment_problems(cfg: dict[str, Any], dims: int | None = None) -> list[str]:
    """What is wrong with a data.augment mapping; dims None checks against the keys of both."""
    allowed = AUGMENT_KEYS[dims] if dims else {**AUGMENT_KEYS[2], **AUGMENT_KEYS[3]}
    out = []
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        where = f" for {dims}D" if dims else ""
        out.append(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{where}; allowed: "
            + "; ".join(f"{k} ({v})" for k, v in allowed.items())
        )
    for key, value in cfg.items():
        if key in unknown:
            continue
        if key == "flip":
            axes_ok = isinstance(value, list) and all(isinstance(a, int) and 0 <= a < 3 for a in value)
            if not (isinstance(value, bool) or (axes_ok and dims != 2)):
                out.append(f"flip must be true/false{'' if dims == 2 else ' or a list of axes 0-2'}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _AUGMENT_LIMITS[key]:
            out.append(f"{key} must be a number in [0, {_AUGMENT_LIMITS[key]:g}], got {value!r}")
    return out


class DataCfg(BaseModel):
    model_config = _STRICT
    size: list[int] | None = None  # per spatial dim; None: the spec's preprocess.size, else native
    # How images reach `size`: resize (interpolate, aspect may change) or crop_pad (centre crop/zero pad, keeps
    # the mm scale). auto: crop_pad when the spec resamples to a fixed spacing, else resize.
    fit: Literal["auto", "resize", "crop_pad"] = "auto"
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(0, ge=0)
    loader: Literal["auto", "thread", "process"] = "auto"
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    # auto picks memory while the estimated cache fits this budget (None: 40% of the RAM available at start).
    cache_memory_gb: float | None = Field(None, gt=0)
    # More failed studies than this fraction stops the stage instead of training on a silently smaller set.
    max_failed_fraction: float = Field(0.05, ge=0, le=1)
    balanced_sampling: bool = False
    augment: dict[str, Any] = Field(default_factory=dict)  # interpreted by medxfer.data.transforms

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        dims = _context(info, "dims")
        if v is not None and dims is not None and len(v) != dims:
            raise ValueError(
                f"data.size needs {dims} values for a {dims}D spec, got {v}; give one int per spatial dim, "
                f"e.g. data.size: {[64] * dims}, or null for the spec's preprocess.size"
            )
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Without dims (a stored recipe): the keys of 2D and 3D together.
        problems = augment_problems(v, _context(info, "dims"))
        if problems:
            raise ValueError(" | ".join(problems))
        return v


def alpha_problems(alpha: str | Sequence[float] | None, n_classes: int | None = None) -> list[str]:
    """What is wrong with a focal.alpha value; n_classes None checks the form only, not the length."""
    if alpha is None:
        return []
    if isinstance(alpha, str):
        n = "one float per class" if n_classes is None else f"a list of {n_classes} floats"
        return [] if alpha == "auto" else [f"focal.alpha {alpha!r}: use 'auto', {n}, or null"]
    values = list(alpha)
    out = []
    if n_classes is not None and len(values) != n_classes:
        example = ", ".join(["1.0"] * n_classes)
        out.append(
            f"focal.alpha has {len(values)} values but the spec has {n_classes} classes; give one per class, "
            f"e.g. focal.alpha: [{example}], or auto"
        )
    bad = [a for a in values if not (isinstance(a, int | float) and math.isfinite(a) and a >= 0)]
    if bad:
        # A negative weight turns its class's loss into a reward; inf/NaN poison every step it appears in.
        out.append(f"focal.alpha values must be >= 0 and finite, got {bad}; e.g. focal.alpha: [1.0, 3.0], or auto")
    return out


class FocalCfg(BaseModel):
    model_config = _STRICT
    gamma: float = Field(2.0, ge=0)
    alpha: Literal["auto"] | list[float] | None = "auto"

    @field_validator("alpha")
    @classmethod
    def _alpha(
        cls, v: Literal["auto"] | list[float] | None, info: ValidationInfo
    ) -> Literal["auto"] | list[float] | None:
        problems = alpha_problems(v, _context(info, "n_classes"))
        if problems:
            raise ValueError(" | ".join(problems))
        return v


class StageCfg(BaseModel):
    """One unfreezing stage: from `epoch` on (or on a val plateau), the top `groups` layer groups train."""

    model_config = _STRICT
    epoch: int | None = Field(None, ge=0)
    groups: int | Literal["all"] = "all"
    plateau_patience: int | None = Field(None, ge=1)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: int | Literal["all"]) -> int | Literal["all"]:
        # A count from the top: -1 would train not even the head, -3 all but the bottom two groups.
        if v != "all" and v < 0:
            raise ValueError(f"groups {v}: give how many layer groups below the head train (0 = head only), or all")
        return v


def stage_problems(stages: Sequence[StageCfg]) -> list[str]:
    """What is wrong with a stages list on its own (the model's layer groups: ``group_problems``)."""
    if not stages:
        return ["stages: give at least one stage, e.g. [{epoch: 0, groups: all}]"]
    out = []
    if stages[0].epoch not in (0, None):
        out.append("stages[0].epoch must be 0: something has to train from the first epoch")
    epochs = [s.epoch for s in stages if s.epoch is not None]
    if epochs != sorted(epochs):
        out.append(f"stages: epochs must increase, got {epochs}; list the stages in the order they start")
    for i, s in enumerate(stages[1:], start=1):
        if s.epoch is None and s.plateau_patience is None:
            out.append(
                f"stages[{i}]: give 'epoch' (start epoch) or 'plateau_patience' (epochs without "
                "improvement of the select metric), e.g. {epoch: 2, groups: 3}"
            )
    return out


def group_problems(group_names: Sequence[str]) -> list[str]:
    """What keeps the stages from addressing the built model's layer groups (stem first, head last)."""
    if not group_names:
        return ["the model declares no layer_groups; progressive unfreezing needs them (models/ registry)"]
    dups = sorted(n for n, c in Counter(group_names).items() if c > 1)
    if dups:
        # The optimizer's parameter groups and the checkpoint layout are keyed by name.
        return [f"layer group names must be unique; {dups} occur more than once in {list(group_names)}"]
    return []


class OptimCfg(BaseModel):
    model_config = _STRICT
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    lr_decay: float = Field(0.5, gt=0, le=1)  # lr x decay^depth below the head
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"


class EvaluationCfg(BaseModel):
    model_config = _STRICT
    threshold: Literal["youden", "sensitivity", "specificity"] = "youden"
    target: float | None = Field(None, gt=0, lt=1)
    bootstrap: int = Field(1000, ge=0)
    # Test-time mirroring at evaluate, predict and export: average the logits over the input and its
    # mirror images along the flip axes of data.augment (none there: no mirroring). Training's per-epoch
    # validation, which picks the best checkpoint, scores one view: mirroring never changes which weights
    # ship. Off unless a recipe says so, so that bundles evaluated before this option predict exactly as
    # they were calibrated.
    tta: bool = False

    @model_validator(mode="after")
    def _target(self) -> EvaluationCfg:
        if self.threshold != "youden" and self.target is None:
            raise FieldsError(f"threshold '{self.threshold}' needs target, e.g. target: 0.9", "target", "threshold")
        return self


class PromotionCfg(BaseModel):
    model_config = _STRICT
    min_auroc_ci_low: float | None = Field(0.7, ge=0, le=1)


class Recipe(BaseModel):
    model_config = _STRICT
    encoder: str
    weights: str | None = "default"  # "default" | "none" | a local file path
    epochs: int = Field(10, ge=1)
    stages: list[StageCfg] = Field(default_factory=lambda: [StageCfg(epoch=0, groups="all")])
    optim: OptimCfg = Field(default_factory=OptimCfg)
    loss: Literal["focal", "ce"] = "focal"
    focal: FocalCfg = Field(default_factory=FocalCfg)
    freeze_bn_stats: bool = False
    # Validate and ship an exponential moving average of the weights (medxfer.training.ema) instead of the raw
    # weights; the per-step decay, 0 = off. 0.98 averages over roughly the last 50 steps.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    select_metric: Literal["auroc", "balanced_accuracy", "loss"] = "auroc"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    seed: int = 0
    data: DataCfg = Field(default_factory=DataCfg)
    evaluation: EvaluationCfg = Field(default_factory=EvaluationCfg)
    promotion: PromotionCfg = Field(default_factory=PromotionCfg)

    @field_validator("encoder")
    @classmethod
    def _encoder_groups(cls, v: str, info: ValidationInfo) -> str:
        names = _context(info, "group_names")  # the built model's, stem first
        problems = group_problems(names) if names is not None else []
        if problems:
            raise ValueError(" | ".join(problems))
        return v

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `amp: off` (and `--set amp=off`) as false: that is what the user wrote.
        return "off" if v is False else v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[StageCfg]) -> list[StageCfg]:
        problems = stage_problems(v)
        if problems:
            raise ValueError(" | ".join(problems))
        return v

    @model_validator(mode="after")
    def _bn_stats(self) -> Recipe:
        if self.freeze_bn_stats and self.weights == "none":
            # Frozen statistics are for keeping pretrained ones; random weights' would stay at their initial
            # identity for the whole run (a 3D scratch run measured 0.762 test AUROC this way, 0.833 without).
            raise FieldsError(
                "freeze_bn_stats: true keeps pretrained BatchNorm statistics, but weights: none has "
                "none to keep; set freeze_bn_stats: false (e.g. --set freeze_bn_stats=false)",
                "freeze_bn_stats",
                "weights",
            )
        return self

    def flat(self) -> dict[str, str]:
        """Flattened `a.b.c -> value` view, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(obj)

        walk("", self.model_dump(mode="json"))
        return out


_HINTS = {
    "encoder": "an encoder name from `medxfer models`",
    "stages": "e.g. [{epoch: 0, groups: 0}, {epoch: 2, groups: 2}, {epoch: 4, groups: all}] (from the top)",
    "optim.lr": "a positive float such as 1e-3",
    "data.size": "one int per spatial dim, e.g. [64, 64] for 2D, [40, 40, 40] for 3D",
    "focal.alpha": "auto, null, or one weight >= 0 per class, e.g. [1.0, 3.0]",
}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The recipe section a field holds (StageCfg for list[StageCfg]), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe can set (`optim.lr`, `data.batch_size`, `stages.epoch` for each stage's)."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        sub = _model_in(info.annotation)
        if sub is not None:
            keys += recipe_keys(sub, f"{prefix}{name}.")
    return keys


def did_you_mean(key: str) -> str | None:
    """The recipe key a mistyped or unqualified `key` most likely meant: `lr` -> `optim.lr`, `data.batchsize` ->
    `data.batch_size`. An exact leaf name wins (`lr` is a leaf of optim only), then the closest full key, then the
    closest leaf."""
    keys = [k for k in recipe_keys() if not k.startswith("stages.")]  # a stage key lives in a list item
    leaf = key.rsplit(".", 1)[-1]
    exact = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    if exact:
        return min(exact, key=len)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_leaf = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


class _Hints(dict):
    """The fix for a pydantic error location: list indices and union tags ('focal.alpha.list[float]') resolve to
    their field's hint; a key the section does not have gets the keys it does have."""

    def get(self, field: str, default: Any = None) -> Any:
        node: type[BaseModel] | None = Recipe
        path: list[str] = []
        for part in field.split("."):
            if part.isdigit():  # a list index
                continue
            if node is None:  # past a plain value: what follows is a union tag
                break
            if part not in node.model_fields:
                if not part.isidentifier():  # not a field name: a model validator's own message
                    break
                where = ".".join(path) or "the top level"
                guess = did_you_mean(".".join([*path, part]))
                mean = f"did you mean `{guess}`? " if guess else ""
                return mean + f"{part!r} is not a key of {where}; its keys: " + ", ".join(node.model_fields)
            path.append(part)
            node = _model_in(node.model_fields[part].annotation)
        for i in range(len(path), 0, -1):
            if ".".join(path[:i]) in self:
                return self[".".join(path[:i])]
        return default


def default_recipe_path(dims: int) -> Path:
    return Path(str(resources.files("medxfer") / "recipes" / f"default_{dims}d.yaml"))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def _fail(source: str, problems: dict[str, list[str]]) -> None:
    """One SpecError in format_validation_error's layout: each problem under its field, then the fix."""
    lines = [
        f"  - field '{field}': {p}" + (f"\n    fix: {_HINTS[field]}" if field in _HINTS else "")
        for field, found in problems.items()
        for p in found
    ]
    if lines:
        raise SpecError(f"{source}: invalid ({len(lines)} problem(s))\n" + "\n".join(lines))


def _validate(tree: dict[str, Any], source: str, **context: Any) -> Recipe:
    try:
        return Recipe.model_validate(tree, context=context)
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc, _Hints(_HINTS))) from None


def check_recipe(
    recipe: Recipe,
    *,
    dims: int | None = None,
    n_classes: int | None = None,
    group_names: Sequence[str] | None = None,
    source: str = "recipe",
) -> None:
    """Check a Recipe against context: the spec's dims and class count, the built model's layer-group names.

    Skips what is None; raises one SpecError listing every problem, each naming the field, the bad value and
    what to write instead. ``load_recipe`` already checks dims (and n_classes when given).
    """
    ctx = {"dims": dims, "n_classes": n_classes, "group_names": None if group_names is None else list(group_names)}
    _validate(recipe.model_dump(mode="python"), source, **ctx)


def check_stages(stages: Sequence[StageCfg], group_names: Sequence[str], source: str = "recipe") -> None:
    """``stages`` on their own and against the built model's layer-group names (stem first), for the Unfreezer."""
    _fail(source, {"stages": stage_problems(stages), "encoder": group_problems(group_names)})


def check_focal_alpha(alpha: str | Sequence[float] | None, n_classes: int, source: str = "recipe") -> None:
    """focal.alpha against the spec's class count, for the loss."""
    _fail(source, {"focal.alpha": alpha_problems(alpha, n_classes)})


def load_recipe(
    path: Path | None,
    dims: int,
    overrides: list[str] | None = None,
    weights: Path | None = None,
    *,
    n_classes: int | None = None,
) -> Recipe:
    """Packaged default for `dims`, deep-merged with the user's file, then `--set` overrides, then `--weights`.

    Checked against `dims` (and `n_classes`, the spec's class count, when given) before anything runs.
    """
    tree: dict[str, Any] = yaml.safe_load(default_recipe_path(dims).read_text())
    source = str(default_recipe_path(dims).name)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such recipe file")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: {yaml_error_text(exc)}") from None
        if not isinstance(user, dict):
            raise SpecError(f"{path}: expected a mapping at the top level")
        tree = _deep_merge(tree, user)
        source = str(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
        source += f" + --set {key}"
    if weights is not None:
        tree["weights"] = str(weights)
    return _validate(tree, source, dims=dims, n_classes=n_classes)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(tree: dict[str, Any]) -> Recipe:
    """Rebuild a stored (already validated) recipe, e.g. from a checkpoint."""
    return Recipe.model_validate(tree)

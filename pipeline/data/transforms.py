"""MONAI transforms built from the spec and the recipe: one deterministic part, then one random part.

Input is a manifest row as a dict, ``{"files": [...], "source_kind": "dicom"|"nifti"}``; output is
``{"image": float32 tensor (C, *spatial)}``. The deterministic part is what training caches and what
predict/export run (``load_inference_tensor``), so the two can never drift apart:

1. load with our own readers (``medxfer.io.dicom.read_series`` / ``medxfer.io.nifti.read_volume``), in the
   manifest's file order; DICOM is never regrouped here. MONAI's ``LoadImage`` was measured at 5-10x
   the raw reader, and it would redo the series logic ingest already did;
2. channel first (C = 1: the readers return grayscale), as a MetaTensor carrying the RAS+ affine;
3. 3D only: reorient to RAS (axis 0 -> Right, 1 -> Anterior, 2 -> Superior), so ``preprocess.spacing``
   and ``size`` are given in that (x, y, z) order whatever the source orientation. 2D images keep
   their row/column layout (projection images have no meaningful RAS reorientation);
4. resample to ``spec.preprocess.spacing`` when set (bilinear; edge values extend);
5. intensity to [0, 1] (``spec.preprocess.intensity``):
   - ``ct_window`` (level, width): HU in [level - width/2, level + width/2] -> [0, 1], clipped;
   - ``zscore``: z = (x - mean) / std over the whole image, clipped to [-3, 3], then (z + 3) / 6;
   - ``scale``: per-image 1st..99th percentile -> [0, 1], clipped (percentiles, not min/max, so one
     hot pixel or a burned-in marker does not squash the contrast of the rest);
6. fit to ``recipe.data.size`` (else ``spec.preprocess.size``; none: native size): ``resize``
   (bilinear/trilinear, anti-aliased when shrinking) or ``crop_pad`` (centre crop / zero pad, which is
   the darkest value after step 5). ``fit: auto`` crops/pads when a spacing is set (keep the mm scale),
   else resizes. Intensity comes before the fit so padding is black, not a mid-grey HU value;
7. a plain contiguous float32 tensor (no MetaTensor: cheaper to cache, collate and ``torch.load``).

The random part (training only) runs on the cached tensor every epoch: albumentations for 2D, behind
``medxfer.data.augment2d``, per sample in the loader; for 3D (flips, one affine warp for rotation + zoom,
intensity shift) once per batch in the training loop on the training device (``medxfer.data.batch_augment``),
with the same draws as the per-sample MONAI transforms (``monai_random_transforms``, the reference).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from medxfer.config.recipe import Recipe
from medxfer.config.spec import DataSpec
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandShiftIntensityd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    Transform,
)

# Bump when the deterministic output for an unchanged config changes (it is part of every cache key).
TRANSFORM_VERSION = 1
SCALE_PERCENTILES = (1.0, 99.0)
ZSCORE_CLIP = 3.0


# ------------------------------------------------------------------------------------------- reading


def read_study(files: Sequence[str], source_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 array, 4x4 RAS+ affine) of one study, through the one module that owns the format.

    Every read passes the shared pixel checks (``medxfer.io.checks.check_pixels``): a study whose pixels are
    NaN/Inf or constant raises InputError with its reason code, so the training cache quarantines it and
    predict reports it, instead of a NaN tensor reaching the model.
    """
    from medxfer.io.checks import check_pixels

    if source_kind == "dicom":
        from medxfer.io.dicom import read_series

        arr, affine = read_series(list(files))
    elif source_kind == "nifti":
        from medxfer.io.nifti import read_volume

        if len(files) != 1:
            raise ValueError(f"a NIfTI study is one file, got {len(files)}")
        arr, affine = read_volume(files[0])
    else:
        raise ValueError(f"unknown source_kind {source_kind!r} (expected dicom or nifti)")
    check_pixels(arr)
    return arr, affine


class LoadStudyd(MapTransform):
    """Reads ``files`` with our readers into ``image``: a channel-first MetaTensor with its affine."""

    def __init__(self, dims: int, keys: str = "image"):
        super().__init__(keys)
        self.dims = dims

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        arr, affine = read_study(d["files"], d["source_kind"])
        if arr.ndim != self.dims:
            raise ValueError(f"expected a {self.dims}D image, got {arr.ndim}D of shape {list(arr.shape)}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        for key in self.keys:
            d[key] = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
        return d


class ToPlainTensord(MapTransform):
    """MetaTensor -> plain contiguous float32 tensor."""

    def __init__(self, keys: str = "image"):
        super().__init__(keys)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if isinstance(x, MetaTensor):
                x = x.as_tensor()
            d[key] = torch.as_tensor(x, dtype=torch.float32).contiguous()
        return d


class Augment2Dd(MapTransform, Randomizable):
    """The 2D random part: ``medxfer.data.augment2d`` on each channel-first image, reseeded with MONAI's RNG."""

    def __init__(self, cfg: dict[str, Any], keys: str = "image"):
        MapTransform.__init__(self, keys)
        from medxfer.data.augment2d import build_augment2d

        self.aug = build_augment2d(cfg)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawned loader workers
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Augment2Dd:
        super().set_random_state(seed, state)
        # Seeding albumentations once per (epoch, worker), not per sample: per-sample reseeding cost ~1/3 of a call.
        self.aug.seed(int(self.R.randint(2**31 - 1)))
        return self

    def randomize(self, data: Any = None) -> None:  # albumentations draws its own parameters
        pass

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = (x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)).numpy()
            with self._lock:  # albumentations' generators are shared state
                out = (
                    self.aug(arr[0].copy())[None]
                    if arr.shape[0] == 1
                    else self.aug(np.ascontiguousarray(arr.transpose(1, 2, 0))).transpose(2, 0, 1)
                )
            d[key] = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return d


# ------------------------------------------------------------------------------------------- config


# The recipe reaches this module checked against the spec's dims (data.size length, data.augment keys and
# ranges: medxfer.config.recipe, when load_recipe is given the dims), and preprocess.size by the spec itself.


def output_size(spec: DataSpec, recipe: Recipe) -> list[int] | None:
    size = recipe.data.size or spec.preprocess.size
    return list(size) if size is not None else None


def fit_mode(spec: DataSpec, recipe: Recipe) -> str | None:
    if output_size(spec, recipe) is None:
        return None
    if recipe.data.fit != "auto":
        return recipe.data.fit
    return "crop_pad" if spec.preprocess.spacing is not None else "resize"


def deterministic_config(spec: DataSpec, recipe: Recipe) -> dict[str, Any]:
    """Everything the cached output depends on besides the file content."""
    return {
        "version": TRANSFORM_VERSION,
        "dims": spec.dims,
        "orientation": "RAS" if spec.dims == 3 else None,
        "spacing": spec.preprocess.spacing,
        "intensity": spec.preprocess.intensity.model_dump(mode="json"),
        "scale_percentiles": list(SCALE_PERCENTILES),
        "size": output_size(spec, recipe),
        "fit": fit_mode(spec, recipe),
    }


def config_hash(spec: DataSpec, recipe: Recipe) -> str:
    blob = json.dumps(deterministic_config(spec, recipe), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- building


def _intensity(spec: DataSpec) -> list[Transform]:
    it = spec.preprocess.intensity
    if it.mode == "ct_window":
        level, width = it.window  # validated in spec.py
        return [
            ScaleIntensityRanged(
                "image", a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True
            )
        ]
    if it.mode == "zscore":
        return [
            NormalizeIntensityd("image"),
            ScaleIntensityRanged("image", a_min=-ZSCORE_CLIP, a_max=ZSCORE_CLIP, b_min=0.0, b_max=1.0, clip=True),
        ]
    return [
        ScaleIntensityRangePercentilesd(
            "image", lower=SCALE_PERCENTILES[0], upper=SCALE_PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
        )
    ]


def deterministic_transforms(spec: DataSpec, recipe: Recipe) -> Compose:
    """Load -> (RAS) -> (spacing) -> intensity -> fit -> plain tensor. Cached in training; used as-is by predict."""
    dims = spec.dims
    steps: list[Transform] = [LoadStudyd(dims)]
    if dims == 3:
        steps.append(Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if spec.preprocess.spacing is not None:
        steps.append(Spacingd("image", pixdim=list(spec.preprocess.spacing), mode="bilinear", padding_mode="border"))
    steps += _intensity(spec)
    size, fit = output_size(spec, recipe), fit_mode(spec, recipe)
    if fit == "resize":
        steps.append(
            Resized("image", spatial_size=size, mode="bilinear" if dims == 2 else "trilinear", anti_aliasing=True)
        )
    elif fit == "crop_pad":
        steps.append(ResizeWithPadOrCropd("image", spatial_size=size, mode="constant"))
    steps.append(ToPlainTensord())
    return Compose(steps)


def flip_axes(flip: Any) -> list[int]:
    if flip is True:
        return [0]  # left-right after RAS reorientation: bilateral anatomy stays plausible
    return list(flip) if isinstance(flip, list) else []


def batched_augmentation(spec: DataSpec, recipe: Recipe) -> bool:
    """True when the random part runs once per batch in the training loop (``medxfer.data.batch_augment``).

    3D: always (flips, the rotation + zoom warp and the intensity shift are all batched); the loader then only
    moves cached tensors. 2D keeps albumentations per sample in the loader (11.7x the MONAI loop already).
    """
    cfg = recipe.data.augment
    return spec.dims == 3 and any(bool(v) for v in cfg.values())


def monai_random_transforms(spec: DataSpec, recipe: Recipe) -> Compose | None:
    """The per-sample random part as MONAI transforms (3D) or albumentations (2D); None when it is empty.

    For 3D this is the reference that ``medxfer.data.batch_augment`` reproduces batch-wise (same draws, same
    warp: tests/data/test_batch_augment.py), and what the MONAI baseline of benchmarks/data_path.py runs.
    """
    cfg = recipe.data.augment
    if not cfg:
        return None
    if spec.dims == 2:
        aug = Augment2Dd(cfg)
        return None if aug.aug.identity else Compose([aug])
    steps: list[Transform] = [RandFlipd("image", prob=0.5, spatial_axis=a) for a in flip_axes(cfg.get("flip"))]
    rot, scale = math.radians(float(cfg.get("rotate", 0))), float(cfg.get("scale", 0))
    if rot or scale:
        # One warp for rotation and zoom together: a single interpolation, and the costliest step done once.
        # With a fixed output size the identity sampling grid is built once and reused (cache_grid): that
        # grid cost as much as the interpolation itself (64^3, one thread: ~37 ms -> ~21 ms per sample).
        size = output_size(spec, recipe)
        steps.append(
            RandAffined(
                "image",
                prob=1.0,
                rotate_range=(rot,) * 3,
                scale_range=(scale,) * 3,
                mode="bilinear",
                padding_mode="zeros",
                spatial_size=size,
                cache_grid=size is not None,
            )
        )
    if cfg.get("intensity_shift"):
        steps.append(RandShiftIntensityd("image", offsets=float(cfg["intensity_shift"]), prob=1.0))
    if not steps:
        return None
    steps.append(ToPlainTensord())
    return Compose(steps)


def random_transforms(spec: DataSpec, recipe: Recipe) -> Compose | None:
    """The loader's per-sample random part; None when it is empty or runs per batch (``batched_augmentation``)."""
    if batched_augmentation(spec, recipe):
        return None
    return monai_random_transforms(spec, recipe)


def build_transforms(spec: DataSpec, recipe: Recipe, train: bool) -> Compose:
    """Deterministic part, then (train only) the per-sample random part (``monai_random_transforms``), as one
    Compose: the single-sample view of what training applies (it batches the 3D part instead).

    The cache boundary is MONAI's: everything before the first Randomizable transform is deterministic
    (what CacheDataset/PersistentDataset would cache). ``medxfer.data.datasets`` uses the two halves directly.
    """
    det = deterministic_transforms(spec, recipe)
    rand = monai_random_transforms(spec, recipe) if train else None
    return Compose(list(det.transforms) + (list(rand.transforms) if rand is not None else []))


_DET_CACHE: dict[str, Compose] = {}
_DET_LOCK = threading.Lock()


def load_inference_tensor(files: Sequence[str], source_kind: str, spec: DataSpec, recipe: Recipe) -> torch.Tensor:
    """The training preprocessing (deterministic part) of one study: float32 tensor (C, *spatial) in [0, 1]."""
    key = config_hash(spec, recipe)
    with _DET_LOCK:
        det = _DET_CACHE.get(key)
        if det is None:
            det = _DET_CACHE[key] = deterministic_transforms(spec, recipe)
    return det({"files": list(files), "source_kind": source_kind})["image"]


def tta_views(spec: DataSpec, recipe: Recipe) -> list[tuple[int, ...]]:
    """Batch-tensor dims of each flipped view for ``evaluation.tta`` (empty: no mirroring).

    Only the flips the model saw in training: every non-empty combination of the augmentation's flip
    axes, as nnU-Net mirrors. 2D flips the image's columns (tensor dim 3 of B, C, H, W), as
    ``medxfer.data.augment2d`` does; 3D flips RAS axis a (dim 2 + a of B, C, D, H, W), as RandFlipd does.
    """
    if not recipe.evaluation.tta:
        return []
    flip = recipe.data.augment.get("flip")
    axes = ([3] if flip else []) if spec.dims == 2 else [2 + a for a in flip_axes(flip)]
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(1, 2 ** len(axes))]


def inference_model(model: torch.nn.Module, spec: DataSpec, recipe: Recipe) -> torch.nn.Module:
    """The model as evaluate, predict and export run it: wrapped in test-time mirroring when the recipe asks."""
    from medxfer.models.classifier import MirrorAverage

    views = tta_views(spec, recipe)
    return MirrorAverage(model, views).eval() if views else model

"""2D augmentation, and the only module that imports albumentations.

albumentations is no longer maintained upstream, so it stays behind this one small
interface: ``build_augment2d(cfg)`` returns a callable on one float32 image in
[0, 1] (H x W, or H x W x C) that returns an augmented float32 image of the same
shape, still in [0, 1]. Replacing the library means rewriting this file only.

Keys of ``cfg`` (``recipe.data.augment`` for 2D specs, checked by ``medxfer.config.recipe`` when the recipe
loads: unknown keys and out-of-range values are refused there, so this module only reads them):

- ``flip``: true -> horizontal flip with p = 0.5 (no vertical flip: anatomy is not
  symmetric top to bottom).
- ``rotate``: max degrees; the angle is uniform in [-rotate, rotate].
- ``scale``: zoom fraction s; one isotropic factor uniform in [1 - s, 1 + s].
- ``brightness``: max additive change, as a fraction of the [0, 1] range.
- ``contrast``: max contrast change; factor uniform in [1 - c, 1 + c].

Rotation and zoom are one affine warp (one interpolation), bilinear, zero fill.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

# cv2 constants, spelled out so this module does not need cv2 at import time.
_INTER_LINEAR = 1
_BORDER_CONSTANT = 0


class Augment2D:
    """Callable augmenter. ``seed(n)`` makes the following calls reproducible (per worker, per epoch)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = dict(cfg)
        import albumentations as A  # heavy; only this module imports it

        steps: list[Any] = []
        if cfg.get("flip"):
            steps.append(A.HorizontalFlip(p=0.5))
        rot, scale = float(cfg.get("rotate", 0)), float(cfg.get("scale", 0))
        if rot or scale:
            steps.append(
                A.Affine(
                    rotate=(-rot, rot),
                    scale=(1 - scale, 1 + scale),
                    keep_ratio=True,
                    interpolation=_INTER_LINEAR,
                    border_mode=_BORDER_CONSTANT,
                    fill=0,
                    p=1.0,
                )
            )
        bright, contrast = float(cfg.get("brightness", 0)), float(cfg.get("contrast", 0))
        self._clip = bool(bright or contrast)
        if self._clip:
            steps.append(
                A.RandomBrightnessContrast(
                    brightness_limit=bright, contrast_limit=contrast, brightness_by_max=True, p=1.0
                )
            )
        self._compose = A.Compose(steps, seed=0) if steps else None

    @property
    def identity(self) -> bool:
        return self._compose is None

    def seed(self, seed: int) -> None:
        # One shared generator pair: cheaper than Compose.set_random_seed, which builds one per transform.
        if self._compose is not None:
            self._compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._compose is None:
            return image
        # A guard on the data, not the recipe: albumentations reads uint8 as 0-255 and the [0, 1] clip below
        # assumes floats; the readers and the cache hand over float32.
        if image.dtype != np.float32:
            raise TypeError(f"augment2d expects float32 images in [0, 1], got {image.dtype}")
        out = self._compose(image=image)["image"]
        if self._clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out


def build_augment2d(cfg: dict[str, Any]) -> Augment2D:
    """The 2D augmenter for ``recipe.data.augment``, as ``medxfer.config.recipe`` validated it for 2D dims."""
    return Augment2D(cfg)

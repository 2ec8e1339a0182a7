"""The 2D augmentation wrapper: shape/dtype/range, reproducibility, no aliasing of the input.

Its keys and ranges are recipe rules, checked when the recipe loads: tests/config/test_recipe.py.
"""

from __future__ import annotations

import numpy as np
from medxfer.data.augment2d import build_augment2d

FULL = {"flip": True, "rotate": 15, "scale": 0.1, "brightness": 0.1, "contrast": 0.1}


def _img(seed: int = 0, shape: tuple[int, ...] = (32, 24)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_output_keeps_shape_dtype_and_unit_range_and_leaves_input_alone() -> None:
    aug = build_augment2d(FULL)
    x = _img()
    before = x.copy()
    for seed in range(5):
        aug.seed(seed)
        y = aug(x)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.array_equal(x, before)
    assert aug(_img(shape=(16, 16, 3))).shape == (16, 16, 3)


def test_seeded_calls_repeat_and_different_seeds_differ() -> None:
    aug = build_augment2d(FULL)
    x = _img()
    aug.seed(7)
    a = [aug(x) for _ in range(3)]
    aug.seed(7)
    b = [aug(x) for _ in range(3)]
    aug.seed(8)
    c = aug(x)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c)
    assert not np.array_equal(a[0], a[1])  # the stream advances between calls


def test_flip_only_gives_identity_or_horizontal_mirror() -> None:
    aug = build_augment2d({"flip": True})
    x = _img()
    aug.seed(0)
    outs = [aug(x) for _ in range(20)]
    flipped = [np.array_equal(o, x[:, ::-1]) for o in outs]
    same = [np.array_equal(o, x) for o in outs]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 3 <= sum(flipped) <= 17


def test_empty_config_is_identity() -> None:
    aug = build_augment2d({})
    x = _img()
    assert aug.identity and aug(x) is x

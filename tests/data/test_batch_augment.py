"""The batched 3D augmentation draws from the per-sample MONAI path's distributions and reproduces its output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_data import make_spec
from medxfer.config.recipe import load_recipe
from medxfer.data.batch_augment import BatchAugment, Draw, build_batch_augment
from medxfer.data.transforms import monai_random_transforms, random_transforms
from monai.transforms import RandAffined, RandFlipd, RandShiftIntensityd
from scipy import stats

AUG = "data.augment={flip: [0, 1, 2], rotate: 10, scale: 0.1, intensity_shift: 0.1}"


def _monai(size: int = 12):
    recipe = load_recipe(None, 3, [f"data.size=[{size},{size},{size}]", AUG])
    return monai_random_transforms(make_spec(3, "nifti"), recipe), recipe


def _angles_scales(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation angles and zoom factors of A = Rx @ Ry @ Rz @ S (columns of A are R's, scaled)."""
    scales = np.linalg.norm(affine, axis=0)
    r = affine / scales
    ay = math.asin(np.clip(r[0, 2], -1, 1))
    return np.array([math.atan2(-r[1, 2], r[2, 2]), ay, math.atan2(-r[0, 1], r[0, 0])]), scales


def _monai_draw(rand) -> Draw:
    """The parameters MONAI used in its last call, as a one-sample Draw.

    Read from the matrix the warp used, not from ``rotate_params``: RandAffined draws them three times per call
    (``randomize``, then ``rand_affine_grid(...)``, which builds the grid, then ``rand_affine(..., randomize=True)``
    with that grid), so the attributes hold a later, unused draw.
    """
    flips = np.zeros((1, 3), dtype=bool)
    angles, scales, shift = np.zeros((1, 3)), np.ones((1, 3)), np.zeros(1)
    for t in rand.transforms:
        if isinstance(t, RandFlipd):
            flips[0, t.flipper.spatial_axis] = t._do_transform
        elif isinstance(t, RandAffined):
            affine = np.asarray(t.rand_affine.rand_affine_grid.affine, dtype=np.float64)[:3, :3]
            angles[0], scales[0] = _angles_scales(affine)
        elif isinstance(t, RandShiftIntensityd):
            shift[0] = t.shifter._offset
    return Draw(flips, angles, scales, shift)


def _cat(draws: list[Draw]) -> Draw:
    return Draw(*(np.concatenate([getattr(d, k) for d in draws]) for k in ("flips", "angles", "scales", "shifts")))


def test_matrices_are_monais_create_rotate_and_create_scale() -> None:
    from monai.transforms.utils import create_rotate, create_scale

    aug = BatchAugment(rotate_deg=30, scale=0.3)
    draw = aug.draw(5, np.random.default_rng(0))
    ours = BatchAugment.matrices(draw)
    for i in range(5):
        ref = (create_rotate(3, list(draw.angles[i])) @ create_scale(3, list(draw.scales[i])))[:3, :3]
        assert np.allclose(ours[i], ref, atol=1e-12)
        assert np.allclose(_angles_scales(ours[i])[0], draw.angles[i]) and np.allclose(
            _angles_scales(ours[i])[1], draw.scales[i]
        )


def test_3d_random_part_runs_per_batch_not_in_the_loader() -> None:
    spec, recipe = make_spec(3, "nifti"), load_recipe(None, 3)
    assert random_transforms(spec, recipe) is None  # the loader only moves cached tensors
    aug = build_batch_augment(spec, recipe)
    assert aug is not None and aug.describe()["rotate_deg"] == 10
    assert build_batch_augment(spec, load_recipe(None, 3, ["data.augment={}"])) is None
    assert build_batch_augment(make_spec(2, "dicom"), load_recipe(None, 2)) is None  # 2D: albumentations


def test_a_fixed_draw_gives_the_per_sample_monai_output() -> None:
    """Same parameters -> same volume as RandFlipd x3 + RandAffined + RandShiftIntensityd, to 1e-5."""
    rand, recipe = _monai(12)
    aug = build_batch_augment(make_spec(3, "nifti"), recipe)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 12, 12, 12, generator=g)
    rand.set_random_state(seed=3)
    refs, draws = [], []
    for i in range(len(x)):
        refs.append(rand({"image": x[i].clone()})["image"])
        draws.append(_monai_draw(rand))
    assert any(d.flips.any() for d in draws) and not all(d.flips.all() for d in draws)
    draw = _cat(draws)
    out = aug.apply(x, draw)
    ref = torch.stack(refs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float((out - ref).abs().max()) < 1e-5


def test_non_cubic_volume_matches_monai_too() -> None:
    recipe = load_recipe(None, 3, ["data.size=[8,12,10]", "data.augment={rotate: 20, scale: 0.2, flip: [1]}"])
    rand = monai_random_transforms(make_spec(3, "nifti"), recipe)
    aug = build_batch_augment(make_spec(3, "nifti"), recipe)
    x = torch.rand(1, 1, 8, 12, 10, generator=torch.Generator().manual_seed(1))
    rand.set_random_state(seed=5)
    ref = rand({"image": x[0].clone()})["image"]
    assert float((aug.apply(x, _monai_draw(rand))[0] - ref).abs().max()) < 1e-5


def test_draws_follow_the_per_sample_distributions() -> None:
    """KS tests of the batched draws against MONAI's own draws (and the nominal uniforms), per parameter."""
    rand, recipe = _monai(4)
    aug = build_batch_augment(make_spec(3, "nifti"), recipe)
    n = 600
    batched = [aug.draw(n // 6, aug.generator(epoch=0, step=s)) for s in range(6)]
    ours = _cat(batched)
    rand.set_random_state(seed=11)
    theirs_list = []
    for _ in range(n):
        rand({"image": torch.zeros(1, 4, 4, 4)})
        theirs_list.append(_monai_draw(rand))
    theirs = _cat(theirs_list)
    rot = math.radians(10)
    for k in range(3):
        for a, b, lo, hi in ((ours.angles, theirs.angles, -rot, rot), (ours.scales, theirs.scales, 0.9, 1.1)):
            assert stats.ks_2samp(a[:, k], b[:, k]).pvalue > 1e-3
            assert stats.kstest(a[:, k], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
            assert lo <= a[:, k].min() and a[:, k].max() <= hi
        # flips: Bernoulli(0.5) per axis, independent of the other axes
        assert abs(ours.flips[:, k].mean() - 0.5) < 4 * math.sqrt(0.25 / n)
        assert abs(theirs.flips[:, k].mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(np.corrcoef(ours.angles.T)[0, 1]) < 0.15  # axes drawn independently, as MONAI does
    assert stats.ks_2samp(ours.shifts, theirs.shifts).pvalue > 1e-3
    assert stats.kstest(ours.shifts, stats.uniform(-0.1, 0.2).cdf).pvalue > 1e-3


def test_same_seed_epoch_step_same_batch_and_steps_differ() -> None:
    aug = BatchAugment(flip=(0,), rotate_deg=10, scale=0.1, intensity_shift=0.1, seed=7)
    x = torch.rand(4, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    a, b = aug(x, epoch=1, step=3), aug(x, epoch=1, step=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, epoch=1, step=4)) and not torch.equal(a, aug(x, epoch=2, step=3))
    other_rank = BatchAugment(flip=(0,), rotate_deg=10, scale=0.1, intensity_shift=0.1, seed=7, rank=1)
    assert not torch.equal(a, other_rank(x, epoch=1, step=3))


def test_identity_draw_is_the_input_and_shapes_are_checked() -> None:
    aug = BatchAugment(rotate_deg=10)
    x = torch.rand(2, 1, 6, 6, 6)
    ident = Draw(np.zeros((2, 3), bool), np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2))
    assert float((aug.apply(x, ident) - x).abs().max()) < 1e-6
    flip0 = Draw(np.array([[True, False, False]] * 2), np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2))
    assert float((aug.apply(x, flip0) - torch.flip(x, (2,))).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        aug.apply(torch.rand(2, 1, 6, 6), ident)
    with pytest.raises(ValueError, match="batch of 3"):
        aug.apply(torch.rand(3, 1, 6, 6, 6), ident)

"""Deterministic preprocessing (shape, dtype, range, orientation, windowing, spacing) and the random part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image2d, write_nifti, write_series
from helpers_data import make_spec
from medxfer.config.recipe import load_recipe
from medxfer.config.spec import SpecError
from medxfer.data.transforms import (
    build_transforms,
    config_hash,
    inference_model,
    load_inference_tensor,
    monai_random_transforms,
    random_transforms,
    tta_views,
)


def _native(dims: int, *extra: str):
    return load_recipe(None, dims, ["data.size=null", *extra])


def test_2d_dicom_comes_out_channel_first_float_in_unit_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    px = rng.integers(0, 101, (40, 30)).astype(np.uint8)
    px[0, 0] = 255  # one hot pixel must not squash the contrast (percentile scaling)
    f = write_image2d(tmp_path / "a.dcm", px, pixel_spacing=(0.5, 0.5))
    spec = make_spec(2, "dicom")
    recipe = load_recipe(None, 2)
    x = load_inference_tensor([str(f)], "dicom", spec, recipe)
    assert isinstance(x, torch.Tensor) and not hasattr(x, "affine")
    assert x.shape == (1, *recipe.data.size) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    native = load_inference_tensor([str(f)], "dicom", spec, _native(2))
    assert native.shape == (1, 40, 30)
    assert 0.4 < float(native.median()) < 0.6


def _marker_volume() -> np.ndarray:
    vol = np.zeros((4, 5, 6), np.float32)
    vol[1, 2, 3] = 100.0
    vol[0, 0, 0] = 50.0
    return vol


def test_lps_and_permuted_niftis_come_out_ras(tmp_path: Path) -> None:
    vol = _marker_volume()
    ras = write_nifti(tmp_path / "ras.nii.gz", vol, affine=np.diag([1.0, 2.0, 3.0, 1.0]))
    # Same anatomy stored with x and y reversed (LPS axes): voxel i sits at world x = -(i - 3) mm.
    lps_aff = np.array([[-1.0, 0, 0, 3.0], [0, -2.0, 0, 8.0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    lps = write_nifti(tmp_path / "lps.nii.gz", vol[::-1, ::-1, :].copy(), affine=lps_aff)
    # And stored as (z, x, y): array axes permuted, affine columns with them.
    perm_aff = np.array([[0, 1.0, 0, 0], [0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    perm = write_nifti(tmp_path / "perm.nii.gz", vol.transpose(2, 0, 1).copy(), affine=perm_aff)
    spec = make_spec(3, "nifti", intensity={"mode": "ct_window", "window": [50, 100]})  # linear 0..100 -> 0..1
    recipe = _native(3)
    out = [load_inference_tensor([str(p)], "nifti", spec, recipe) for p in (ras, lps, perm)]
    assert out[0].shape == (1, 4, 5, 6)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.equal(out[0][0], torch.from_numpy(vol) / 100)


def test_ct_series_is_windowed_and_reoriented(tmp_path: Path) -> None:
    # write_series: stored 100 + 10k + ((r + c) % 7) on slice k, intercept -1024 -> HU = stored - 1024.
    files = write_series(tmp_path / "ct", n=6, rows=16, cols=12)
    spec = make_spec(3, "dicom", intensity={"mode": "ct_window", "window": [-900, 100]})
    x = load_inference_tensor([str(f) for f in files], "dicom", spec, _native(3))
    # LPS axial (slices, rows, cols) -> RAS: axis 0 = reversed columns, 1 = reversed rows, 2 = slices.
    assert x.shape == (1, 12, 16, 6)
    hu = lambda k, r, c: 100 + 10 * k + (r + c) % 7 - 1024  # noqa: E731
    for k, r, c in ((0, 0, 0), (3, 5, 2), (5, 15, 11)):
        expected = min(max((hu(k, r, c) + 950) / 100, 0.0), 1.0)
        assert float(x[0, 11 - c, 15 - r, k]) == pytest.approx(expected, abs=1e-5)
    assert bool((x[0, :, :, 1:] >= x[0, :, :, :-1] - 0.07).all())  # brighter towards superior


def test_zscore_spacing_and_crop_pad(tmp_path: Path) -> None:
    vol = np.random.default_rng(1).normal(100, 20, (8, 8, 8)).astype(np.float32)
    f = str(write_nifti(tmp_path / "v.nii.gz", vol, spacing=(1.0, 1.0, 1.0)))
    z = make_spec(3, "nifti", intensity={"mode": "zscore"})
    x = load_inference_tensor([f], "nifti", z, _native(3))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and abs(float(x.mean()) - 0.5) < 0.05
    resampled = make_spec(3, "nifti", spacing=[2.0, 2.0, 2.0])
    assert load_inference_tensor([f], "nifti", resampled, _native(3)).shape == (1, 4, 4, 4)
    padded = load_inference_tensor([f], "nifti", resampled, load_recipe(None, 3, ["data.size=[6, 6, 6]"]))
    assert padded.shape == (1, 6, 6, 6)  # fit auto -> crop_pad because a spacing is set
    assert float(padded[0, 0].abs().max()) == 0.0 and float(padded[0, 1:5, 1:5, 1:5].min()) >= 0.0


def test_wrong_dims_is_an_error(tmp_path: Path) -> None:
    f = write_image2d(tmp_path / "a.dcm", pixel_spacing=(1.0, 1.0))
    with pytest.raises(RuntimeError) as exc:
        load_inference_tensor([str(f)], "dicom", make_spec(3, "dicom"), load_recipe(None, 3))
    assert "expected a 3D image" in str(exc.value.__cause__)


@pytest.mark.parametrize("dims", [2, 3])
def test_eval_pipeline_equals_inference_and_train_adds_randomness(tmp_path: Path, dims: int) -> None:
    if dims == 2:
        f = write_image2d(tmp_path / "a.dcm", np.random.default_rng(0).integers(0, 200, (20, 20), dtype=np.uint8))
        spec, kind = make_spec(2, "dicom"), "dicom"
    else:
        f = write_nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).random((10, 10, 10), dtype=np.float32))
        spec, kind = make_spec(3, "nifti"), "nifti"
    recipe = load_recipe(None, dims)
    row = {"files": [str(f)], "source_kind": kind}
    ref = load_inference_tensor([str(f)], kind, spec, recipe)
    assert torch.equal(build_transforms(spec, recipe, train=False)(row)["image"], ref)
    train = build_transforms(spec, recipe, train=True)
    train.set_random_state(seed=0)
    a, b = train(row)["image"], train(row)["image"]
    assert a.shape == ref.shape and a.dtype == torch.float32 and type(a) is torch.Tensor
    assert not torch.equal(a, ref) and not torch.equal(a, b)


def test_config_hash_tracks_preprocessing_only() -> None:
    spec = make_spec(2, "dicom")
    base = config_hash(spec, load_recipe(None, 2))
    assert config_hash(spec, load_recipe(None, 2, ["data.augment={}", "data.batch_size=4"])) == base
    assert config_hash(spec, load_recipe(None, 2, ["data.size=[64, 64]"])) != base
    assert config_hash(spec, load_recipe(None, 2, ["data.fit=crop_pad"])) != base
    assert config_hash(make_spec(2, "dicom", intensity={"mode": "zscore"}), load_recipe(None, 2)) != base


def test_3d_augment_keys_are_checked() -> None:
    with pytest.raises(SpecError, match="brightness"):
        load_recipe(None, 3, ["data.augment.brightness=0.1"])
    assert random_transforms(make_spec(3, "nifti"), load_recipe(None, 3, ["data.augment={}"])) is None


def test_3d_rotation_and_zoom_are_one_cached_warp() -> None:
    from monai.transforms import RandAffined

    recipe = load_recipe(None, 3, ["data.size=[16,16,16]", "data.augment={rotate: 10, scale: 0.1}"])
    rand = monai_random_transforms(make_spec(3, "nifti"), recipe)  # the per-sample reference of batch_augment
    warps = [t for t in rand.transforms if isinstance(t, RandAffined)]
    assert len(warps) == 1 and warps[0].rand_affine._cached_grid is not None  # one interpolation, grid reused
    rand.set_random_state(0)
    out = rand({"image": torch.rand(1, 16, 16, 16)})["image"]
    assert out.shape == (1, 16, 16, 16) and out.dtype == torch.float32


def test_tta_views_follow_the_flip_augmentation() -> None:
    s2, s3 = make_spec(2, "dicom"), make_spec(3, "nifti")
    assert tta_views(s2, load_recipe(None, 2, ["evaluation.tta=true"])) == [(3,)]
    assert tta_views(s2, load_recipe(None, 2, ["evaluation.tta=false"])) == []
    assert tta_views(s2, load_recipe(None, 2, ["evaluation.tta=true", "data.augment={}"])) == []
    assert tta_views(s3, load_recipe(None, 3, ["evaluation.tta=true"])) == [(2,)]
    assert tta_views(s3, load_recipe(None, 3, ["evaluation.tta=true", "data.augment.flip=[0, 2]"])) == [
        (2,),
        (4,),
        (2, 4),
    ]
    model = torch.nn.Conv2d(1, 2, 1)
    assert inference_model(model, s2, load_recipe(None, 2, ["evaluation.tta=false"])) is model


@pytest.mark.parametrize("dims", [2, 3])
def test_tta_mirrors_the_axis_the_augmentation_flips(dims: int) -> None:
    """Mirroring along an axis the model never saw flipped would average in an unfamiliar image."""
    spec = make_spec(dims, "dicom" if dims == 2 else "nifti")
    recipe = load_recipe(None, dims, ["evaluation.tta=true", "data.augment={flip: true}", "data.size=null"])
    x = torch.arange(float(4**dims)).reshape(1, *[4] * dims) / 4**dims  # (C, *spatial), asymmetric everywhere
    rand = monai_random_transforms(spec, recipe)  # 3D: the per-sample reference of medxfer.data.batch_augment
    rand.set_random_state(seed=0)
    flipped = next(y for y in (rand({"image": x.clone()})["image"] for _ in range(20)) if not torch.equal(y, x))
    (dims_flipped,) = tta_views(spec, recipe)
    assert torch.equal(flipped[None], torch.flip(x[None], dims_flipped))

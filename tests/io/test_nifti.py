"""medxfer.io.nifti: every reject reason, read_volume axis convention, write_volume round trip."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers import write_nifti
from medxfer.io import nifti


def vol(shape=(6, 7, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def code_of(path, dims=3) -> str:
    with pytest.raises(nifti.NiftiError) as exc:
        nifti.inspect(path, dims)
    return exc.value.code


def test_write_and_read_round_trip(tmp_path):
    aff = np.diag([-1.5, -1.5, 2.0, 1.0])
    aff[:3, 3] = [10, 20, -30]
    p = nifti.write_volume(tmp_path / "a.nii.gz", vol(), affine=aff)
    arr, got = nifti.read_volume(p)
    assert arr.dtype == np.float32 and arr.shape == (6, 7, 8)  # nibabel's (i, j, k) order
    assert np.array_equal(arr, vol()) and np.allclose(got, aff)
    info = nifti.inspect(p, 3)
    assert info.shape == [6, 7, 8] and info.spacing == [1.5, 1.5, 2.0] and info.orientation == "LPS"
    assert info.intensity_min == 0 and info.intensity_max == vol().max()
    hdr = nib.load(str(p)).header
    assert int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0


def test_trailing_singleton_axes_are_dropped(tmp_path):
    p = write_nifti(tmp_path / "a.nii.gz", vol((5, 5, 5, 1)))
    assert nifti.read_volume(p)[0].shape == (5, 5, 5)
    assert nifti.inspect(p, 3).shape == [5, 5, 5]
    p2 = write_nifti(tmp_path / "b.nii.gz", vol((9, 8, 1)), spacing=(0.5, 0.5, 1.0))
    info = nifti.inspect(p2, 2)
    assert info.shape == [9, 8] and info.spacing == [0.5, 0.5]


def test_4d_where_3d_expected_and_2d_in_3d_spec(tmp_path):
    assert code_of(write_nifti(tmp_path / "t.nii.gz", vol((4, 4, 4, 3)))) == "wrong_dims"
    assert code_of(write_nifti(tmp_path / "f.nii.gz", vol((4, 4, 1)))) == "wrong_dims"


def test_nan_and_inf_voxels(tmp_path):
    v = vol()
    v[1, 2, 3] = np.nan
    v[2, 2, 2] = np.inf
    p = write_nifti(tmp_path / "n.nii.gz", v)
    with pytest.raises(nifti.NiftiError) as exc:
        nifti.inspect(p, 3)
    assert exc.value.code == "nonfinite_pixels" and "2 NaN/Inf" in exc.value.message


def test_qform_sform_disagreement(tmp_path):
    p = write_nifti(tmp_path / "q.nii.gz", vol())
    img = nib.load(str(p))
    shifted = img.affine.copy()
    shifted[:3, 3] += [0, 0, 25.0]
    img.header.set_qform(shifted, code=1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.header.get_sform(), img.header), str(p))
    assert code_of(p) == "qform_sform_mismatch"
    # Only one of them set: nothing to disagree with.
    img = nib.load(str(p))
    img.header.set_qform(shifted, code=0)
    nib.save(img, str(p))
    assert nifti.inspect(p, 3).shape == [6, 7, 8]


def test_bad_affine(tmp_path):
    hdr = nib.Nifti1Image(vol(), np.eye(4)).header.copy()
    hdr["srow_y"] = [0, 0, 0, 0]  # a singular sform: the y axis maps nowhere
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    p = tmp_path / "z.nii"
    nib.save(nib.Nifti1Image(vol(), None, header=hdr), str(p))
    assert code_of(p) == "bad_affine"


def test_not_nifti_and_truncated(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"definitely not a nifti file" * 10)
    assert code_of(junk) == "not_nifti"
    good = write_nifti(tmp_path / "g.nii", vol((20, 20, 20)))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(good.read_bytes()[:-5000])
    assert code_of(cut) == "truncated"
    good_gz = write_nifti(tmp_path / "g.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)))
    cut_gz = tmp_path / "cut.nii.gz"
    cut_gz.write_bytes(good_gz.read_bytes()[:-3000])
    assert code_of(cut_gz) == "truncated"


def test_is_nifti():
    assert nifti.is_nifti("a/b.nii") and nifti.is_nifti("b.nii.gz") and not nifti.is_nifti("b.img")

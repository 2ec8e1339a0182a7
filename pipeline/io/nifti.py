"""NIfTI, and the only module that imports nibabel.

``inspect`` runs the ingest checks on one file and returns either its facts or a
reason code; ``read_volume`` is what training and predict use. Arrays keep
nibabel's axis order (i, j, k); the affine maps them to RAS+ millimetres.
Trailing singleton axes are dropped, so an (x, y, z, 1) file reads as 3D and
an (x, y, 1) file as 2D.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from medxfer.io import checks

# nibabel logs header fix-ups to the terminal; ingest reports problems as reason codes instead.
logging.getLogger("nibabel").setLevel(logging.ERROR)
SUFFIXES = (".nii", ".nii.gz")
# This module's rows of the one reason table (medxfer.io.checks.REASONS); the pixel checks there
# (too_small, too_large, constant_image, nonfinite_pixels) apply here too.
REASONS = checks.reasons("nifti")
# qform can only store rotations + zooms + shear-free matrices to float32 precision; a real
# disagreement is a different position or orientation, far above this.
_QS_TOL_MM = 1e-3


class NiftiError(checks.InputError):
    """An unusable volume; ``code`` is a key of medxfer.io.checks.REASONS. No PHI (no path) in the text."""


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(SUFFIXES)


@dataclass
class VolumeInfo:
    shape: list[int]
    spacing: list[float]
    orientation: str
    affine: np.ndarray
    intensity_min: float
    intensity_max: float
    content_hash: str


def _squeeze(arr_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(arr_shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _gzip_cut_short(path: str | Path) -> bool:
    """True for a .gz whose stream ends before its end marker (a copy cut short); read only once loading failed."""
    if not str(path).endswith(".gz"):
        return False
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except EOFError:
        return True
    except (OSError, zlib.error):
        return False
    return False


def _load(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    try:
        img = nib.load(str(path))
    except Exception:
        if _gzip_cut_short(path):  # nibabel only says "Cannot work out file type": the stream ends inside the header
            raise NiftiError("truncated", "NIfTI file is cut short (its gzip stream ends early)") from None
        raise NiftiError("not_nifti", "not a readable NIfTI file") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise NiftiError("not_nifti", f"not a NIfTI image ({type(img).__name__})")
    return img


def check_voxel_type(img: nib.Nifti1Image) -> None:
    """One real number per voxel, before reading: RGB24/structured types cannot become float32 (numpy raises
    DTypePromotionError) and complex ones would silently lose their imaginary part."""
    dt = np.dtype(img.get_data_dtype())
    if dt.fields is not None or dt.kind == "V":
        raise NiftiError("unsupported_dtype", f"voxel type {dt.str} is not one number per voxel (e.g. RGB24)")
    if dt.kind == "c":
        raise NiftiError(
            "complex_data", f"complex voxels ({dt.name}); save the magnitude (or the part you mean) as real numbers"
        )


def check_size(img: nib.Nifti1Image) -> None:
    """Zero-size or too-thin volumes, and ones above the decoded-size cap, from the header alone."""
    shape = tuple(int(s) for s in img.shape)
    try:
        # nibabel's axis order: the first two axes are the image plane, further ones are slices (or time).
        checks.check_shape(shape, plane_axes=(0, 1))
    except checks.InputError as exc:
        raise NiftiError(exc.code, exc.message) from None


def _data(img: nib.Nifti1Image) -> np.ndarray:
    check_voxel_type(img)
    check_size(img)
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32)
    # OverflowError: a vox_offset far past any file (found by tests/fuzz: numpy's memmap overflows a C long).
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, OverflowError):
        raise NiftiError("truncated", "voxel data is cut short or corrupt") from None
    return arr.reshape(_squeeze(arr.shape))


def check_header(img: nib.Nifti1Image, dims: int) -> tuple[int, ...]:
    """Header-level checks; returns the squeezed shape."""
    shape = _squeeze(tuple(int(s) for s in img.shape))
    if len(shape) != dims:
        what = {2: "2D", 3: "3D", 4: "4D"}.get(len(shape), f"{len(shape)}D")
        raise NiftiError("wrong_dims", f"{what} volume of shape {list(shape)} where a {dims}D one is expected")
    aff = img.affine
    zooms = img.header.get_zooms()[:dims]
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12 or min(zooms) <= 0:
        raise NiftiError("bad_affine", "affine is singular or voxel sizes are zero/non-finite")
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode > 0 and scode > 0:
        try:
            q, s = hdr.get_qform(), hdr.get_sform()
        except (ValueError, np.linalg.LinAlgError):
            # nibabel refuses quaternion parameters that are no rotation (found by tests/fuzz: "w2 should be
            # positive, but is -2.9e+76"); the affine is as unusable as a singular one.
            raise NiftiError("bad_affine", "qform quaternion is not a rotation; fix or re-export the header") from None
        # Compare where they send the corners of the volume, in mm: robust to how each is stored.
        corners = np.array(
            [[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2] if dims == 3 else 1)],
            float,
        ).T
        diff = float(np.max(np.abs(q @ corners - s @ corners)))
        if diff > max(_QS_TOL_MM, 1e-4 * float(np.max(np.abs(s @ corners)))):
            raise NiftiError(
                "qform_sform_mismatch",
                f"qform and sform disagree by up to {diff:.3g} mm; "
                "fix the header (e.g. set qform = sform) or re-export",
            )
    return shape


def inspect(path: str | Path, dims: int) -> VolumeInfo:
    """All ingest checks on one file (reads the voxels once); NiftiError with a reason code if unusable."""
    img = _load(path)
    check_voxel_type(img)
    check_size(img)  # a zero-size axis would stop check_header's min(zooms) and the reductions below
    check_header(img, dims)
    arr = _data(img)
    try:
        checks.check_pixels(arr)
    except checks.InputError as exc:
        raise NiftiError(exc.code, exc.message.replace("pixel", "voxel")) from None
    zooms = [float(z) for z in img.header.get_zooms()[:dims]]
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    axes = nib.aff2axcodes(img.affine)
    if None in axes[:dims]:
        # nibabel gives no axis code for a column far shorter than the others (found by tests/fuzz): the voxel
        # grid has no orientation a reader could trust.
        raise NiftiError("bad_affine", "affine gives an image axis no direction; fix or re-export the header")
    codes = "".join(axes)[:dims]
    return VolumeInfo(list(arr.shape), zooms, codes, img.affine, float(arr.min()), float(arr.max()), h.hexdigest())


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 array in nibabel's axis order, trailing singleton axes dropped; 4x4 RAS affine)."""
    img = _load(path)
    return _data(img), np.asarray(img.affine, float)


def write_volume(
    path: str | Path,
    array: np.ndarray,
    spacing: tuple[float, ...] | None = None,
    affine: np.ndarray | None = None,
    qform_code: int = 1,
    sform_code: int = 1,
) -> Path:
    """Write a NIfTI-1 volume with spacing and affine set (qform and sform agree)."""
    if affine is None:
        sp = list(spacing or [1.0] * array.ndim)[:3] + [1.0] * (3 - min(array.ndim, 3))
        affine = np.diag([*sp, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    if array.ndim > 3:
        img.header.set_zooms(tuple(img.header.get_zooms()[:3]) + (1.0,) * (array.ndim - 3))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path

"""Input validity shared by ingest and predict: the reject reason table, the size cap and the pixel checks.

Every reason code an input can be rejected with (rejects.csv ``reason_code``, predict's ``error`` prefix,
a failed study in the training cache) is a key of ``REASONS`` below, the one table the docs point at.
The readers (``medxfer.io.dicom``, ``medxfer.io.nifti``) and ingest call ``check_shape`` before they decode
and check what they decoded (``check_pixels``, or DICOM's per-slice equivalent in ``sample_pixels``), so ingest
and predict refuse the same inputs for the same reason.
Nothing here quotes a path or a header value: messages are built from numbers and codes only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from medxfer.core.errors import MedxferError

# A side this short is a strip, not an image: a 1x4096 "image" (issue 14) reached predict's saliency map and
# grew to 18 GB. The smallest real inputs are MedMNIST's 28x28; 4 still takes the tiny test volumes.
MIN_SIDE = 4
# Decoded float32 bytes above which an input is refused before decoding. 2 GiB is a 512x1024x1024 CT; the
# largest series in the shared test data (GE MR, 130x256x256) decodes to 34 MB, and predict's peak memory on a
# study is a small multiple of its decoded size, so this keeps one input well inside a 16 GB worker.
DEFAULT_MAX_DECODED_MB = 2048
MAX_DECODED_ENV = "MEDXFER_MAX_DECODED_MB"

# Reason code -> (where it is found, what it means). Kept in one table so the docs, ingest's report and
# predict's error column all speak the same codes.
REASONS: dict[str, tuple[str, str]] = {
    # discovery (ingest's walk of source.root, predict's inputs)
    "not_found": ("discovery", "a predict input does not exist"),
    "dangling_link": ("discovery", "a symbolic link under source.root points at nothing"),
    "no_path_column": ("discovery", "a predict input CSV without a 'path' column (one study per row)"),
    # DICOM files and series (medxfer.io.dicom)
    "not_dicom": ("dicom", "not a DICOM file (a NIfTI file given to a DICOM model says so)"),
    "truncated": ("dicom, nifti", "file is cut short (header, pixel or voxel data incomplete)"),
    "unreadable": ("dicom, nifti", "file could not be opened or read"),
    "no_pixel_data": ("dicom", "a DICOM object without an image (DICOMDIR, report, presentation state)"),
    "wrong_transfer_syntax": ("dicom", "the file's TransferSyntaxUID claims an encoding its bytes do not have"),
    "missing_tags": ("dicom", "lacks StudyInstanceUID, SeriesInstanceUID, Rows or Columns"),
    "no_series_selected": ("dicom", "no series of the study passed the spec's series rules"),
    "missing_position": ("dicom", "ImagePositionPatient or ImageOrientationPatient missing in a volume"),
    "mixed_orientation": ("dicom", "slices of one stack are not parallel"),
    "inconsistent_pixel_spacing": ("dicom", "slices of one stack have different pixel spacing"),
    "duplicate_position": ("dicom", "two or more slices share one position"),
    "missing_slices": ("dicom", "gaps in the slice positions (missing slices)"),
    "uneven_spacing": ("dicom", "slice spacing varies beyond the tolerance"),
    "gantry_tilt": ("dicom", "slice positions advance off the slice normal (tilted gantry)"),
    "multiframe_no_geometry": ("dicom", "multi-frame file without per-frame position and orientation"),
    "undecodable": ("dicom", "pixel data cannot be decoded (any slice of the chosen series)"),
    # NIfTI files (medxfer.io.nifti)
    "not_nifti": ("nifti", "not a readable NIfTI file"),
    "bad_affine": ("nifti", "affine is singular or has zero/non-finite voxel sizes"),
    "qform_sform_mismatch": ("nifti", "qform and sform are both set and disagree"),
    "wrong_dims": ("nifti", "another number of dimensions than the spec's dims (e.g. 4D where 3D is expected)"),
    "unsupported_dtype": ("nifti", "voxel type that is not one number per voxel (RGB, structured)"),
    "complex_data": ("nifti", "complex voxels: dropping the imaginary part would silently change the image"),
    # pixels, both formats (this module)
    "too_small": ("pixels", f"an image side shorter than {MIN_SIDE} pixels, or a zero-size dimension"),
    "too_large": ("pixels", "the decoded image would exceed the size cap (MEDXFER_MAX_DECODED_MB)"),
    "constant_image": ("pixels", "every pixel has the same value (e.g. RescaleSlope 0): nothing to learn from"),
    "nonfinite_pixels": ("pixels", "NaN or Inf pixels after rescaling, or a model output that is not finite"),
    # labels CSV and the join (medxfer.ingest.ingest)
    "blank_key": ("labels", "a labels row with an empty key column"),
    "no_label": ("labels", "a usable study has no row in the labels CSV"),
    "unknown_class": ("labels", "the label is not one of the spec's classes"),
    "duplicate_label": ("labels", "the labels CSV lists one key more than once"),
    "label_without_study": ("labels", "a labels row whose key matches no study found under source.root"),
    "duplicate_study_key": ("labels", "two studies share one label key (e.g. one AccessionNumber)"),
    "mixed_patients": ("labels", "one study's files carry different PatientIDs"),
}


def reasons(where: str) -> dict[str, str]:
    """Code -> meaning for one source ("dicom", "nifti", "pixels", "labels", "discovery")."""
    return {code: text for code, (src, text) in REASONS.items() if where in [s.strip() for s in src.split(",")]}


class InputError(MedxferError):
    """An input refused by a shared check; ``code`` is a key of REASONS. No PHI (no path) in the text."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def max_decoded_bytes() -> int:
    """The size cap in bytes: ``MEDXFER_MAX_DECODED_MB`` when set to a positive number, else the default."""
    raw = os.environ.get(MAX_DECODED_ENV, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MAX_DECODED_MB
    except ValueError:
        mb = DEFAULT_MAX_DECODED_MB
    return int((mb if mb > 0 else DEFAULT_MAX_DECODED_MB) * 2**20)


def check_shape(shape: Sequence[int], samples: int = 1, plane_axes: tuple[int, int] = (-2, -1)) -> None:
    """Before decoding: refuse zero-size or too-thin images and ones whose float32 decode exceeds the cap.

    ``shape`` is the image's shape; the two ``plane_axes`` (DICOM: rows, cols; NIfTI: i, j) are held to
    MIN_SIDE, further axes (slices, frames) only to non-zero. ``samples`` multiplies the bytes (colour
    planes are decoded before they are turned gray).
    """
    dims = [int(s) for s in shape]
    if not dims or min(dims) <= 0:
        raise InputError("too_small", f"zero-size dimension in shape {dims}")
    plane = [dims[i] for i in plane_axes] if len(dims) >= 2 else dims * 2
    if min(plane) < MIN_SIDE:
        raise InputError("too_small", f"image of {plane[0]}x{plane[1]} pixels; at least {MIN_SIDE} per side needed")
    n = float(np.prod(dims, dtype=np.float64)) * max(int(samples), 1) * 4
    cap = max_decoded_bytes()
    if n > cap:
        raise InputError(
            "too_large",
            f"decoded size would be {n / 2**20:.0f} MB, above the {cap / 2**20:.0f} MB cap; "
            f"raise it with {MAX_DECODED_ENV}=... if this input is meant to be read",
        )


def check_pixels(arr: np.ndarray) -> None:
    """After decoding (rescale applied): refuse NaN/Inf pixels and constant images."""
    a = np.asarray(arr)
    if a.size == 0:
        raise InputError("too_small", f"zero-size array of shape {list(a.shape)}")
    finite = np.isfinite(a)
    if not finite.all():
        bad = int(a.size - np.count_nonzero(finite))
        raise InputError("nonfinite_pixels", f"{bad} NaN/Inf pixel(s) of {a.size} after rescaling")
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        raise InputError("constant_image", f"every pixel is {lo:g} (e.g. RescaleSlope 0): no image content")

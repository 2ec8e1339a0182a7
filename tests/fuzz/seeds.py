"""Seed corpora: valid files of each kind, written by the test helpers (real pydicom / nibabel output).

Mutating valid files reaches the readers' deep paths (pixel-data length walk, sequences, qform/sform), which
random bytes never get past the magic number to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers

from helpers import (  # noqa: E402
    spec_dict,
    write_image2d,
    write_multiframe,
    write_nifti,
    write_series,
)

REPO = Path(__file__).resolve().parents[2]


def _dicom_seeds(tmp: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    files = [
        write_image2d(tmp / "us.dcm", rng.integers(0, 200, (8, 8), dtype=np.uint8)),
        write_image2d(tmp / "rgb.dcm", rng.integers(0, 200, (6, 6, 3), dtype=np.uint8)),
        write_image2d(tmp / "cr.dcm", modality="CR", pixel_spacing=(0.2, 0.2), RescaleSlope="2"),
        write_multiframe(tmp / "enh.dcm", n_frames=3, rows=6, cols=6),
        write_series(tmp / "ct", n=1, rows=6, cols=6)[0],
        write_series(tmp / "jpg", n=1, rows=6, cols=6, undecodable=True)[0],
    ]
    return [f.read_bytes() for f in files]


def _nifti_seeds(tmp: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i, shape in enumerate([(6, 6, 5), (8, 8), (5, 5, 4, 1)]):
        p = write_nifti(tmp / f"v{i}.nii", rng.random(shape, dtype=np.float32), spacing=(1.0, 2.0, 3.0)[: len(shape)])
        out += [b"\0" + p.read_bytes(), b"\1" + p.read_bytes()]  # first byte: .nii / .nii.gz (see targets.nifti)
    return out


def _spec_seeds() -> list[bytes]:
    out = [p.read_bytes() for p in sorted((REPO / "data_specs").glob("*.yaml"))]
    d = spec_dict("fz", "dicom", 2, "dicom", series={"modality": ["US"], "description_exclude": ["(?i)scout"]})
    out.append(yaml.safe_dump(d).encode())
    d = spec_dict("fz3", "nifti", 3, "nifti", patient="patient", preprocess={"intensity": {"mode": "zscore"}})
    out.append(yaml.safe_dump(d).encode())
    return out


def write_seeds(target: str, folder: Path) -> list[Path]:
    """Write the seed corpus of one target into ``folder`` (created); returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / ".src"
    work.mkdir(exist_ok=True)
    if target in ("dicom_header", "dicom_fast"):
        blobs = _dicom_seeds(work)
    elif target == "nifti":
        blobs = _nifti_seeds(work)
    elif target == "spec":
        blobs = _spec_seeds()
    else:
        raise KeyError(target)
    out = []
    for i, b in enumerate(blobs):
        p = folder / f"seed{i:02d}"
        p.write_bytes(b)
        out.append(p)
    import shutil

    shutil.rmtree(work)
    return out

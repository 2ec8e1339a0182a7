"""Manifest and splits rows (as ingest and split write them) over small real DICOM/NIfTI files.

The files come from the shared builders in tests/helpers.py; the rows follow the manifest contract
(study_key, label_index, source_kind, files, shape, spacing, content_hash, ...), so data-path tests
do not depend on running ingest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from helpers import write_image2d, write_nifti
from medxfer.config.spec import DataSpec


def content_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def study_key(i: int) -> str:
    return "st-" + hashlib.sha256(f"study{i}".encode()).hexdigest()[:20]


def make_spec(dims: int, kind: str, **preprocess: Any) -> DataSpec:
    labels = {"csv": "labels.csv", "key": "path" if kind == "nifti" else "StudyInstanceUID"}
    return DataSpec.model_validate(
        {
            "name": f"t{dims}d",
            "task": "binary",
            "dims": dims,
            "source": {"kind": kind, "root": "."},
            "labels": labels,
            "classes": ["neg", "pos"],
            "positive_class": "pos",
            "preprocess": preprocess,
        }
    )


def manifest_row(
    i: int, label: int, kind: str, files: list[str], arr: np.ndarray, spacing: list[float]
) -> dict[str, Any]:
    return {
        "study_key": study_key(i),
        "patient_key": "pt-" + study_key(i)[3:],
        "label": ["neg", "pos"][label],
        "label_index": label,
        "modality": "US" if arr.ndim == 2 else "CT",
        "source_kind": kind,
        "files": files,
        "n_slices": 1 if arr.ndim == 2 else arr.shape[0],
        "shape": list(arr.shape),
        "spacing": spacing,
        "orientation": "",
        "intensity_min": float(arr.min()),
        "intensity_max": float(arr.max()),
        "content_hash": content_hash(arr),
        "series_key": "se-x",
    }


def frames(rows: list[dict[str, Any]], split_of: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(rows)
    splits = pd.DataFrame(
        {
            "study_key": manifest["study_key"],
            "patient_key": manifest["patient_key"],
            "label": manifest["label"],
            "split": split_of,
            "fold": -1,
        }
    )
    return manifest, splits


def dataset_2d(
    root: Path, n: int = 12, shape: tuple[int, int] = (24, 20), seed: int = 0, split_of: list[str] | None = None
) -> tuple[DataSpec, pd.DataFrame, pd.DataFrame]:
    """n single-image DICOM studies; label i % 2; a class-dependent bright blob so labels are learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        px = rng.integers(0, 120, size=shape).astype(np.uint8)
        if label:
            px[4:10, 4:10] = 250
        f = write_image2d(root / f"img{i}.dcm", px, pixel_spacing=(0.5, 0.5))
        rows.append(manifest_row(i, label, "dicom", [str(f)], px.astype(np.float32), [0.5, 0.5]))
    split_of = split_of or [("train", "train", "val", "test")[i % 4] if n >= 8 else "train" for i in range(n)]
    manifest, splits = frames(rows, split_of)
    return make_spec(2, "dicom"), manifest, splits


def dataset_3d(
    root: Path, n: int = 8, shape: tuple[int, int, int] = (10, 12, 8), seed: int = 0, split_of: list[str] | None = None
) -> tuple[DataSpec, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        vol = rng.normal(0, 1, size=shape).astype(np.float32)
        f = write_nifti(root / f"vol{i}.nii.gz", vol, spacing=(1.0, 1.0, 2.0))
        rows.append(manifest_row(i, i % 2, "nifti", [str(f)], vol, [1.0, 1.0, 2.0]))
    split_of = split_of or ["train"] * (n - 2) + ["val", "test"]
    manifest, splits = frames(rows, split_of)
    return make_spec(3, "nifti", intensity={"mode": "zscore"}), manifest, splits

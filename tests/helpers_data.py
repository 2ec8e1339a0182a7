"""Small DICOM/NIfTI studies plus the manifest and splits rows ingest would write, for data-path tests.

Files are written through the project's own writers (pipeline.dicom / pipeline.nifti) and, for CT
series with rescale and geometry, with pydicom directly. Manifest rows follow the contract in the
ingest docs (study_key, label_index, files, shape, spacing, content_hash, ...).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.dicom import generate_uid, write_2d_image
from pipeline.nifti import write_volume
from pipeline.spec import DataSpec


def content_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def study_key(i: int) -> str:
    return "st-" + hashlib.sha256(f"study{i}".encode()).hexdigest()[:20]


def make_spec(dims: int, kind: str, **preprocess: Any) -> DataSpec:
    labels = {"csv": "labels.csv", "key": "path" if kind == "nifti" else "StudyInstanceUID"}
    return DataSpec.model_validate({
        "name": f"t{dims}d", "task": "binary", "dims": dims, "source": {"kind": kind, "root": "."},
        "labels": labels, "classes": ["neg", "pos"], "positive_class": "pos", "preprocess": preprocess})


def write_dicom_2d(path: Path, pixels: np.ndarray, spacing: tuple[float, float] = (0.5, 0.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_2d_image(path, pixels, {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
                                  "Modality": "US", "PixelSpacing": list(spacing)})
    return path


def write_ct_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float] = (2.0, 0.8, 0.8),
                    slope: float = 1.0, intercept: float = -1024.0) -> list[str]:
    """An axial CT series, one file per slice (hu: (slices, rows, cols)); returns files ordered by position."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    stored = np.round((hu - intercept) / slope).astype(np.uint16)
    files = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        path = folder / f"s{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[0])]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored[k].tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        files.append(str(path))
    return files


def manifest_row(i: int, label: int, kind: str, files: list[str], arr: np.ndarray,
                 spacing: list[float]) -> dict[str, Any]:
    return {"study_key": study_key(i), "patient_key": "pt-" + study_key(i)[3:], "label": ["neg", "pos"][label],
            "label_index": label, "modality": "US" if arr.ndim == 2 else "CT", "source_kind": kind,
            "files": files, "n_slices": 1 if arr.ndim == 2 else arr.shape[0], "shape": list(arr.shape),
            "spacing": spacing, "orientation": "", "intensity_min": float(arr.min()),
            "intensity_max": float(arr.max()), "content_hash": content_hash(arr), "series_key": "se-x"}


def frames(rows: list[dict[str, Any]], split_of: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(rows)
    splits = pd.DataFrame({"study_key": manifest["study_key"], "patient_key": manifest["patient_key"],
                           "label": manifest["label"], "split": split_of, "fold": -1})
    return manifest, splits


def dataset_2d(root: Path, n: int = 12, shape: tuple[int, int] = (24, 20), seed: int = 0,
               split_of: list[str] | None = None) -> tuple[DataSpec, pd.DataFrame, pd.DataFrame]:
    """n single-image DICOM studies; label i % 2; a class-dependent bright blob so labels are learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        px = rng.integers(0, 120, size=shape).astype(np.uint8)
        if label:
            px[4:10, 4:10] = 250
        f = write_dicom_2d(root / f"img{i}.dcm", px)
        rows.append(manifest_row(i, label, "dicom", [str(f)], px.astype(np.float32), [0.5, 0.5]))
    split_of = split_of or [("train", "train", "val", "test")[i % 4] if n >= 8 else "train" for i in range(n)]
    manifest, splits = frames(rows, split_of)
    return make_spec(2, "dicom"), manifest, splits


def dataset_3d(root: Path, n: int = 8, shape: tuple[int, int, int] = (10, 12, 8), seed: int = 0,
               split_of: list[str] | None = None) -> tuple[DataSpec, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        vol = rng.normal(0, 1, size=shape).astype(np.float32)
        f = write_volume(root / f"vol{i}.nii.gz", vol, spacing=(1.0, 1.0, 2.0))
        rows.append(manifest_row(i, i % 2, "nifti", [str(f)], vol, [1.0, 1.0, 2.0]))
    split_of = split_of or ["train"] * (n - 2) + ["val", "test"]
    manifest, splits = frames(rows, split_of)
    return make_spec(3, "nifti", intensity={"mode": "zscore"}), manifest, splits

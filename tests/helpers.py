"""Builders for small, real DICOM and NIfTI datasets (written with pydicom and nibabel), for any test.

Ready-made datasets (fixtures in tests/conftest.py; each call builds a fresh copy under tmp_path):
  tiny_dicom2d  -> Dataset: 40 single-image US studies (2 classes "neg"/"pos", 20 each, 32x32 px, class "pos"
                   has a bright blob), 24 patients (some with 2-3 studies), DICOM tree + labels.csv + spec.yaml.
  tiny_nifti3d  -> Dataset: 40 NIfTI volumes (2 classes "neg"/"pos", 12^3 voxels, spacing 2x2x3 mm),
                   labels.csv keyed by path with a patient column + spec.yaml.
  shared_data   -> Path of ../shared/data (skips the test with a reason when absent).
  Dataset has .spec_path, .spec (loaded DataSpec), .root, .labels_csv, .workspace (an empty folder to
  use as --workspace), .phi (planted identifiers that must never appear in outputs).
  Example:  def test_x(tiny_dicom2d): ingest(tiny_dicom2d.spec, tiny_dicom2d.workspace)

Builders for your own edge cases (all return the paths they wrote):
  make_dicom2d_dataset(root, n_studies=40, ...)  /  make_nifti3d_dataset(root, n_studies=40, ...)
  write_series(folder, n=6, ...)   one CT/MR series; control spacing, positions, orientation, tilt,
                                   pixel spacing, rescale, image type, description, transfer syntax...
  write_image2d(path, ...)         one single-frame 2D image (US by default; CR, DX, MG, SC...)
  write_multiframe(path, ...)      one enhanced multi-frame volume, with or without per-frame geometry
  write_nifti(path, data, ...)     one NIfTI volume via medxfer.io.nifti.write_volume
  write_spec(path, **fields)       a spec YAML; `spec_dict(...)` gives the dict to tweak first
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from medxfer.config.spec import DataSpec, load_spec
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# Strings planted in headers, folder names and labels-side patient columns; tests assert none reaches an
# output other than the local PHI files (pseudonym map, scan cache) and path columns.
PHI = {
    "name": "PLANTEDNAME^HELGA",
    "id": "PLANTED-ID-770011",
    "institution": "PLANTED ST. MERCY INSTITUTE",
    "birth": "19330217",
    "date": "20010911",
    "accession": "PLANTEDACC99",
    "physician": "PLANTEDDOC^IVO",
}


@dataclass
class Dataset:
    spec_path: Path
    root: Path
    labels_csv: Path
    workspace: Path
    classes: list[str]
    n_studies: int
    study_uids: list[str] = field(default_factory=list)
    phi: list[str] = field(default_factory=list)

    @property
    def spec(self) -> DataSpec:
        return load_spec(self.spec_path)


def _uid(*entropy: object) -> str:
    return generate_uid(entropy_srcs=[str(e) for e in entropy]) if entropy else generate_uid()


def _base(sop_class: str, attrs: dict[str, Any], transfer_syntax: str = ExplicitVRLittleEndian) -> DicomDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = attrs.get("SOPInstanceUID") or _uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = DicomDataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    defaults = {
        "PatientName": "TEST^PATIENT",
        "PatientID": "P0",
        "StudyDate": "20200101",
        "StudyTime": "120000",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyID": "1",
    }
    for k, v in {**defaults, **attrs}.items():
        if k != "SOPInstanceUID" and v is not None:
            setattr(ds, k, v)
    return ds


def _set_pixels(ds: DicomDataset, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    ds.SamplesPerPixel = 1 if arr.ndim == 2 or (arr.ndim == 3 and "NumberOfFrames" in ds) else arr.shape[-1]
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    elif "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2"
    shape = arr.shape[-3:-1] if ds.SamplesPerPixel == 3 else arr.shape[-2:]
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    signed = arr.dtype.kind == "i"
    bits = 8 if arr.dtype.itemsize == 1 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.tobytes()


def _save(ds: DicomDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_image2d(
    path: Path,
    pixels: np.ndarray | None = None,
    *,
    modality: str = "US",
    sop_class: str = US_IMAGE,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "P0",
    patient_name: str = "TEST^PATIENT",
    series_number: int = 1,
    instance_number: int = 1,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY"),
    description: str = "",
    pixel_spacing: tuple[float, float] | None = None,
    photometric: str | None = None,
    n_frames: int | None = None,
    **attrs: Any,
) -> Path:
    """One single-frame (or plain multi-frame with n_frames) 2D image."""
    if pixels is None:
        pixels = np.random.default_rng(0).integers(0, 200, (16, 16), dtype=np.uint8)
    a = {
        "Modality": modality,
        "StudyInstanceUID": study_uid or _uid(),
        "SeriesInstanceUID": series_uid or _uid(),
        "PatientID": patient_id,
        "PatientName": patient_name,
        "SeriesNumber": series_number,
        "InstanceNumber": instance_number,
        "ImageType": list(image_type),
        "SeriesDescription": description,
        **attrs,
    }
    if pixel_spacing is not None:
        a["PixelSpacing" if modality not in ("CR", "DX", "MG") else "ImagerPixelSpacing"] = list(pixel_spacing)
    ds = _base(sop_class, a)
    if photometric:
        ds.PhotometricInterpretation = photometric
    if n_frames:
        ds.NumberOfFrames = n_frames
    _set_pixels(ds, pixels)
    return _save(ds, Path(path))


def write_series(
    folder: Path,
    n: int = 6,
    *,
    rows: int = 16,
    cols: int = 16,
    spacing: float = 2.0,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    positions: list[Any] | None = None,
    tilt_deg: float = 0.0,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_ref: str | None = None,
    patient_id: str = "P0",
    patient_name: str = "TEST^PATIENT",
    series_number: int = 2,
    description: str = "AX",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    orientations: list[tuple[float, ...]] | None = None,
    pixel_spacings: list[tuple[float, float]] | None = None,
    names: str = "shuffled",
    undecodable: bool = False,
    **attrs: Any,
) -> list[Path]:
    """One CT/MR series; slice k has stored value 100 + 10*k everywhere (plus a small gradient).

    Files and InstanceNumbers are shuffled by default so that only ImagePositionPatient gives the order.
    ``positions``: explicit per-slice positions (None entries drop the tag). ``tilt_deg`` shifts each
    slice along the column direction as a tilted CT gantry does. ``undecodable`` stores a JPEG
    transfer syntax with bytes no decoder accepts.
    """
    folder = Path(folder)
    study_uid = study_uid or _uid()
    series_uid = series_uid or _uid()
    frame_of_ref = frame_of_ref or _uid()
    o = np.asarray(orientation, float)
    normal = np.cross(o[:3], o[3:])
    if positions is None:
        shift = np.tan(np.radians(tilt_deg)) * spacing
        positions = [list(np.asarray(origin) + k * spacing * normal + k * shift * o[3:]) for k in range(n)]
    rng = np.random.default_rng(n)
    order = rng.permutation(n) if names == "shuffled" else np.arange(n)
    paths = []
    sop = CT_IMAGE if modality == "CT" else MR_IMAGE
    for k in range(n):
        a = {
            "Modality": modality,
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "FrameOfReferenceUID": frame_of_ref,
            "PatientID": patient_id,
            "PatientName": patient_name,
            "SeriesNumber": series_number,
            "InstanceNumber": int(order[k]) + 1,
            "SeriesDescription": description,
            "ImageType": list(image_type),
            "ImageOrientationPatient": [float(x) for x in (orientations[k] if orientations else orientation)],
            "PixelSpacing": list(pixel_spacings[k] if pixel_spacings else pixel_spacing),
            "SliceThickness": spacing,
            "RescaleSlope": slope,
            "RescaleIntercept": intercept,
            **attrs,
        }
        if positions[k] is not None:
            a["ImagePositionPatient"] = [float(x) for x in positions[k]]
        ts = pydicom.uid.JPEGBaseline8Bit if undecodable else ExplicitVRLittleEndian
        ds = _base(sop, a, transfer_syntax=ts)
        px = (100 + 10 * k + np.add.outer(np.arange(rows), np.arange(cols)) % 7).astype(np.int16)
        _set_pixels(ds, px)
        if undecodable:
            ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg stream" + bytes(32)])
            ds["PixelData"].VR = "OB"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        paths.append(_save(ds, folder / f"IM{int(order[k]) + 1:04d}"))
    return paths


def write_multiframe(
    path: Path,
    n_frames: int = 5,
    *,
    geometry: bool = True,
    rows: int = 12,
    cols: int = 12,
    spacing: float = 2.5,
    study_uid: str | None = None,
    patient_id: str = "P0",
    series_number: int = 3,
    modality: str = "CT",
    **attrs: Any,
) -> Path:
    """An enhanced multi-frame volume (frames stored in reverse position order), optionally without geometry."""
    a = {
        "Modality": modality,
        "StudyInstanceUID": study_uid or _uid(),
        "SeriesInstanceUID": _uid(),
        "FrameOfReferenceUID": _uid(),
        "PatientID": patient_id,
        "SeriesNumber": series_number,
        "InstanceNumber": 1,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SeriesDescription": "ENH",
        "NumberOfFrames": n_frames,
        **attrs,
    }
    ds = _base(ENHANCED_CT, a)
    if geometry:
        shared = DicomDataset()
        po, pm, pv = DicomDataset(), DicomDataset(), DicomDataset()
        po.ImageOrientationPatient = list(AXIAL)
        pm.PixelSpacing = [0.7, 0.7]
        pm.SliceThickness = spacing
        pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 1, -1000, "HU"
        shared.PlaneOrientationSequence = Sequence([po])
        shared.PixelMeasuresSequence = Sequence([pm])
        shared.PixelValueTransformationSequence = Sequence([pv])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per = []
        for f in range(n_frames):
            item, pp = DicomDataset(), DicomDataset()
            pp.ImagePositionPatient = [0.0, 0.0, float((n_frames - 1 - f) * spacing)]
            item.PlanePositionSequence = Sequence([pp])
            per.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    # Frame f lies at position index n-1-f, so after sorting slice k holds value 100 + 10*k.
    frames = np.stack([np.full((rows, cols), 100 + 10 * (n_frames - 1 - f), np.int16) for f in range(n_frames)])
    _set_pixels(ds, frames)
    return _save(ds, Path(path))


def write_nifti(
    path: Path, data: np.ndarray, spacing: tuple[float, ...] = (2.0, 2.0, 3.0), affine: np.ndarray | None = None
) -> Path:
    from medxfer.io.nifti import write_volume

    return write_volume(path, data, spacing=spacing, affine=affine)


def spec_dict(
    name: str,
    kind: str,
    dims: int,
    root: str,
    labels: str = "labels.csv",
    key: str | None = None,
    classes: tuple[str, str] = ("neg", "pos"),
    patient: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "task": "binary",
        "dims": dims,
        "source": {"kind": kind, "root": root},
        "labels": {"csv": labels, "key": key or ("StudyInstanceUID" if kind == "dicom" else "path"), "column": "label"},
        "classes": list(classes),
        "positive_class": classes[1],
        "split": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 0},
    }
    if patient:
        d["labels"]["patient"] = patient
    for k, v in extra.items():
        d[k] = v
    return d


def write_spec(path: Path, d: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def write_labels(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _class_image(rng: np.random.Generator, positive: bool, size: int) -> np.ndarray:
    img = rng.normal(60, 12, (size, size))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def _owners(n: int) -> list[int]:
    """Patient index per study: 24 patients for 40 studies (some with 2-3 studies), classes interleaved."""
    pattern = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]  # 10 studies -> 6 patients
    out, base = [], 0
    while len(out) < n:
        out += [base + p for p in pattern]
        base += 6
    return out[:n]


def make_dicom2d_dataset(
    root: Path,
    n_studies: int = 40,
    size: int = 32,
    classes: tuple[str, str] = ("neg", "pos"),
    name: str = "tiny-dicom2d",
    plant_phi: bool = True,
    seed: int = 0,
) -> Dataset:
    """A 2D US dataset: one single-image study per row of labels.csv, alternating classes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data = root / "dicom"
    owners = _owners(n_studies)
    rows, uids = [], []
    for i in range(n_studies):
        p = owners[i]
        positive = i % 2 == 1
        pid = PHI["id"] if (plant_phi and p == 0) else f"PID{p:04d}"
        pname = PHI["name"] if (plant_phi and p == 0) else f"PATIENT^{p:04d}"
        uid = _uid("tiny2d", seed, i)
        folder = data / (f"{PHI['name'].replace('^', '_')}" if plant_phi and p == 0 else f"PAT{p:04d}") / f"ST{i:03d}"
        extra = (
            {
                "InstitutionName": PHI["institution"],
                "PatientBirthDate": PHI["birth"],
                "StudyDate": PHI["date"],
                "AccessionNumber": f"ACC{i:05d}",
                "ReferringPhysicianName": PHI["physician"],
            }
            if plant_phi
            else {}
        )
        write_image2d(
            folder / "IM0001",
            _class_image(rng, positive, size),
            study_uid=uid,
            patient_id=pid,
            patient_name=pname,
            pixel_spacing=(0.5, 0.5),
            **extra,
        )
        rows.append([uid, classes[int(positive)]])
        uids.append(uid)
    labels = write_labels(root / "labels.csv", ["StudyInstanceUID", "label"], rows)
    spec = write_spec(
        root / "spec.yaml", spec_dict(name, "dicom", 2, "dicom", classes=classes, series={"modality": ["US"]})
    )
    ws = root / "ws"
    ws.mkdir(exist_ok=True)
    phi = list(PHI.values()) if plant_phi else []
    return Dataset(spec, data, labels, ws, list(classes), n_studies, uids, phi)


def make_nifti3d_dataset(
    root: Path,
    n_studies: int = 40,
    size: int = 12,
    classes: tuple[str, str] = ("neg", "pos"),
    name: str = "tiny-nifti3d",
    seed: int = 0,
) -> Dataset:
    """A 3D NIfTI dataset: one volume per study, labels keyed by path with a patient column."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    owners = _owners(n_studies)
    rows = []
    for i in range(n_studies):
        positive = i % 2 == 1
        vol = rng.normal(0, 1, (size, size, size)).astype(np.float32)
        if positive:
            c = size // 2
            vol[c - 2 : c + 2, c - 2 : c + 2, c - 2 : c + 2] += 4.0
        pid = f"{PHI['id']}" if owners[i] == 0 else f"SUBJ{owners[i]:03d}"
        rel = f"sub-{owners[i]:03d}/scan{i:03d}.nii.gz"
        write_nifti(root / "nifti" / rel, vol)
        rows.append([rel, classes[int(positive)], pid])
    labels = write_labels(root / "labels.csv", ["path", "label", "patient"], rows)
    spec = write_spec(root / "spec.yaml", spec_dict(name, "nifti", 3, "nifti", classes=classes, patient="patient"))
    ws = root / "ws"
    ws.mkdir(exist_ok=True)
    return Dataset(spec, root / "nifti", labels, ws, list(classes), n_studies, [], [PHI["id"]])


def dicom_uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(str(path), stop_before_pixels=True).get(keyword))


def write_nifti_raw(path: Path, data: np.ndarray, dtype: Any = None) -> Path:
    """A NIfTI written with nibabel as given (no medxfer checks): zero-size axes, RGB24, complex voxels."""
    import nibabel as nib

    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]), dtype=dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def set_dicom_attrs(path: Path, **attrs: Any) -> Path:
    """Rewrite one DICOM file with some top-level attributes changed (e.g. RescaleSlope='NaN')."""
    ds = pydicom.dcmread(str(path))
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


# The cheapest real training run, for tests about what reaches MLflow or a server, not about accuracy.
CHEAP_RUN = [
    "weights=none",
    "data.size=[32,32]",
    "data.batch_size=8",
    "optim.warmup_epochs=0",
    "stages=[{epoch: 0, groups: all}]",
    "data.augment={}",
]

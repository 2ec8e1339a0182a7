"""``medxfer demo``: the bundled MedMNIST sets written out the way hospital data arrives.

BreastMNIST becomes a DICOM tree: one ultrasound study per image (mostly US
Image Storage, some Secondary Captures), files without a suffix in folders named
after (synthetic) patients, several studies for some patients, and synthetic
names, IDs, dates and institutions that look like PHI so the pipeline's
pseudonymisation is exercised. AdrenalMNIST3D becomes one NIfTI volume per
study with spacing and affine set, in BIDS-like folders, plus a labels CSV with
a patient column. Both keep MedMNIST's train/val/test membership: a
``medmnist_split`` column in the labels and a ``pinned_test.csv`` listing the
MedMNIST test studies, so results compare with the published numbers.

Output is deterministic (seeded names, UIDs derived from fixed entropy).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
BREAST_CLASSES = ("malignant", "benign")  # MedMNIST label 0 = malignant, 1 = normal/benign
ADRENAL_CLASSES = ("normal", "hyperplasia")  # label 1 = hyperplasia
_FIRST = [
    "JANE",
    "MARY",
    "ANNA",
    "LINDA",
    "SARAH",
    "EMMA",
    "OLIVIA",
    "SOFIA",
    "GRACE",
    "NORA",
    "ELLEN",
    "RUTH",
    "CLARA",
    "IRIS",
    "MAYA",
    "LENA",
    "ROSA",
    "VERA",
    "ALICE",
    "HANNA",
]
_LAST = [
    "DOE",
    "SMITH",
    "JOHANSSON",
    "GARCIA",
    "MUELLER",
    "ROSSI",
    "NOVAK",
    "KOWALSKI",
    "MARTIN",
    "DUBOIS",
    "SILVA",
    "JANSEN",
    "NIELSEN",
    "OKAFOR",
    "TANAKA",
    "HOLM",
    "BRENNAN",
    "LINDQVIST",
    "MORENO",
    "FISCHER",
]
_SITES = ["NORTHBRIDGE GENERAL HOSPITAL", "ST. AGATHA MEDICAL CENTRE", "RIVERSIDE WOMEN'S CLINIC"]


def _npz(name: str) -> Any:
    with resources.as_file(resources.files("medxfer") / "demo_data" / name) as p:
        return np.load(p)


def _patients(n: int, rng: np.random.Generator) -> list[int]:
    """Patient index per study: most patients have one study, some two or three (follow-up visits)."""
    owner, pid = [], 0
    while len(owner) < n:
        k = int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))
        owner.extend([pid] * k)
        pid += 1
    return owner[:n]


@dataclass
class DemoResult:
    out: Path
    datasets: dict[str, dict[str, Any]]
    elapsed_s: float

    def summary(self) -> dict[str, Any]:
        return {"stage": "demo", "out": str(self.out), "datasets": self.datasets, "elapsed_s": self.elapsed_s}

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [
            (name, f"{d['studies']} studies, {d['patients']} patients -> {d['root']}")
            for name, d in self.datasets.items()
        ]
        rows.append(("time", f"{self.elapsed_s:.1f} s"))
        return "demo data", rows


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_breast(out: Path, limit: int | None = None) -> dict[str, Any]:
    from medxfer.io import dicom

    data = _npz("breastmnist.npz")
    rng = np.random.default_rng(20240229)
    root = out / "dicom"
    labels, pinned = [], []
    n_patients = 0
    for split in SPLITS:
        imgs, labs = data[f"{split}_images"], data[f"{split}_labels"][:, 0]
        n = len(imgs) if limit is None else min(limit, len(imgs))
        owner = _patients(n, rng)
        visit: dict[int, int] = {}
        people: dict[int, dict[str, str]] = {}
        for i in range(n):
            p = owner[i]
            if p not in people:
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                people[p] = {
                    "name": f"{last}^{first}",
                    "folder": f"{last}_{first}_{n_patients:04d}",
                    "id": f"MRN{int(rng.integers(100, 1000))}{n_patients:05d}",
                    "site": str(rng.choice(_SITES)),
                    "birth": f"{int(rng.integers(1940, 2000))}{int(rng.integers(1, 13)):02d}"
                    f"{int(rng.integers(1, 29)):02d}",
                }
                n_patients += 1
            who = people[p]
            visit[p] = visit.get(p, 0) + 1
            date = f"{int(rng.integers(2015, 2024))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            study_uid = dicom.generate_uid("medxfer-demo", "breastmnist", split, i, "study")
            sc = rng.random() < 0.1
            attrs = {
                "SOPInstanceUID": dicom.generate_uid("medxfer-demo", "breastmnist", split, i, "sop"),
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": dicom.generate_uid("medxfer-demo", "breastmnist", split, i, "series"),
                "PatientName": who["name"],
                "PatientID": who["id"],
                "PatientBirthDate": who["birth"],
                "PatientSex": "F",
                "InstitutionName": who["site"],
                "StudyDate": date,
                "SeriesDate": date,
                "ContentDate": date,
                "StudyTime": "101500",
                "AccessionNumber": f"A{int(rng.integers(10**7, 10**8))}",
                "ReferringPhysicianName": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^^DR",
                "StudyID": str(visit[p]),
                "StudyDescription": "US BREAST",
                "SeriesDescription": "Breast US",
                "Modality": "US",
                "SeriesNumber": 1,
                "InstanceNumber": 1,
                "Manufacturer": "medxfer demo",
                "ImageType": ["ORIGINAL", "PRIMARY"] if not sc else ["DERIVED", "SECONDARY"],
            }
            if sc:
                attrs["ConversionType"] = "WSD"
            else:
                attrs["SequenceOfUltrasoundRegions"] = dicom.ultrasound_regions(imgs.shape[1:], delta_cm=0.18)
            folder = root / who["folder"] / f"{date}_US_BREAST" / ("SC0001" if sc else "SE0001")
            folder.mkdir(parents=True, exist_ok=True)
            dicom.write_2d_image(
                folder / "IM00001", imgs[i], attrs, sop_class=dicom.SECONDARY_CAPTURE if sc else dicom.US_IMAGE_STORAGE
            )
            labels.append([study_uid, BREAST_CLASSES[int(labs[i])], split])
            if split == "test":
                pinned.append([study_uid])
    _write_csv(out / "labels.csv", ["StudyInstanceUID", "label", "medmnist_split"], labels)
    _write_csv(out / "pinned_test.csv", ["StudyInstanceUID"], pinned)
    return {
        "studies": len(labels),
        "patients": n_patients,
        "root": str(root),
        "labels": str(out / "labels.csv"),
        "pinned_test": str(out / "pinned_test.csv"),
        "format": "dicom",
    }


def write_adrenal(out: Path, limit: int | None = None) -> dict[str, Any]:
    from medxfer.io import nifti

    data = _npz("adrenalmnist3d.npz")
    rng = np.random.default_rng(20240301)
    root = out / "nifti"
    labels, pinned = [], []
    n_patients = 0
    spacing = 1.5
    for split in SPLITS:
        imgs, labs = data[f"{split}_images"], data[f"{split}_labels"][:, 0]
        n = len(imgs) if limit is None else min(limit, len(imgs))
        owner = _patients(n, rng)
        ids: dict[int, str] = {}
        visit: dict[int, int] = {}
        for i in range(n):
            p = owner[i]
            if p not in ids:
                ids[p] = f"ADR{int(rng.integers(10**5, 10**6))}{n_patients:04d}"
                n_patients += 1
            visit[p] = visit.get(p, 0) + 1
            sub, ses = ids[p], f"{visit[p]:02d}"
            rel = f"sub-{sub}/ses-{ses}/sub-{sub}_ses-{ses}_ct.nii.gz"
            # LPS-ordered axes as a DICOM-to-NIfTI converter writes them, with a scanner-like origin.
            affine = np.diag([-spacing, -spacing, spacing, 1.0])
            affine[:3, 3] = [20.0, 180.0, -120.0] + rng.normal(0, 5, 3)
            nifti.write_volume(root / rel, np.ascontiguousarray(imgs[i]), affine=affine)
            labels.append([rel, ADRENAL_CLASSES[int(labs[i])], sub, split])
            if split == "test":
                pinned.append([rel])
    _write_csv(out / "labels.csv", ["path", "label", "patient", "medmnist_split"], labels)
    _write_csv(out / "pinned_test.csv", ["path"], pinned)
    return {
        "studies": len(labels),
        "patients": n_patients,
        "root": str(root),
        "labels": str(out / "labels.csv"),
        "pinned_test": str(out / "pinned_test.csv"),
        "format": "nifti",
    }


def write_demo(out: Path, limit: int | None = None) -> DemoResult:
    """Write both demo datasets under ``out`` (replacing earlier demo output there)."""
    import shutil

    from medxfer.core import ui

    t0 = time.perf_counter()
    out = Path(out)
    datasets = {}
    for name, fn in (("breastmnist", write_breast), ("adrenalmnist3d", write_adrenal)):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        ui.info(f"writing demo dataset {name}")
        datasets[name] = fn(target, limit)
    return DemoResult(out.resolve(), datasets, round(time.perf_counter() - t0, 2))

"""medxfer.demo: a realistic DICOM tree and NIfTI set from the bundled MedMNIST files, usable by the shipped specs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from medxfer.config.spec import load_spec
from medxfer.core.workspace import Workspace
from medxfer.demo import write_demo
from medxfer.ingest.ingest import ingest
from medxfer.ingest.manifest import read_manifest
from medxfer.ingest.split import split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    res = write_demo(base / "demo-data", limit=12)
    return base, res


def test_breast_is_a_realistic_dicom_tree(demo):
    base, res = demo
    info = res.summary()["datasets"]["breastmnist"]
    assert info["studies"] == 36  # 12 per MedMNIST split
    files = sorted(p for p in Path(info["root"]).rglob("*") if p.is_file())
    assert len(files) == 36 and not any(p.suffix for p in files)
    assert all(len(p.relative_to(info["root"]).parts) == 4 for p in files)  # patient/study/series/image
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "US" and ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.7")
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert pydicom.uid.UID(uid).is_valid
    assert "^" in str(ds.PatientName) and ds.PatientID.startswith("MRN") and len(ds.StudyDate) == 8
    assert ds.InstitutionName and ds.pixel_array.shape == (28, 28)
    labels = pd.read_csv(info["labels"])
    assert set(labels["label"]) <= {"malignant", "benign"} and labels["StudyInstanceUID"].is_unique
    assert (labels["medmnist_split"].value_counts() == 12).all()
    pinned = pd.read_csv(info["pinned_test"])
    assert set(pinned["StudyInstanceUID"]) == set(labels.loc[labels.medmnist_split == "test", "StudyInstanceUID"])
    # MedMNIST label 0 is malignant: the first training image's label survives the round trip.
    npz = np.load(REPO / "pipeline" / "demo_data" / "breastmnist.npz")
    first = labels.iloc[0]
    assert first["label"] == ("malignant" if npz["train_labels"][0, 0] == 0 else "benign")


def test_adrenal_is_one_nifti_per_study_with_geometry(demo):
    base, res = demo
    info = res.summary()["datasets"]["adrenalmnist3d"]
    labels = pd.read_csv(info["labels"])
    assert len(labels) == 36 and list(labels.columns) == ["path", "label", "patient", "medmnist_split"]
    img = nib.load(str(Path(info["root"]) / labels.iloc[0]["path"]))
    assert img.shape == (28, 28, 28) and img.header.get_zooms() == (1.5, 1.5, 1.5)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    assert labels["patient"].nunique() < len(labels)  # some patients have several studies
    assert set(labels["label"]) <= {"normal", "hyperplasia"}


def test_deterministic(demo, tmp_path):
    base, _ = demo
    write_demo(tmp_path / "again", limit=12)
    a = pd.read_csv(base / "demo-data" / "breastmnist" / "labels.csv")
    b = pd.read_csv(tmp_path / "again" / "breastmnist" / "labels.csv")
    assert a.equals(b)


@pytest.mark.parametrize("spec_name", ["breastmnist_demo.yaml", "adrenal3d_demo.yaml"])
def test_shipped_specs_ingest_and_split_the_demo(demo, spec_name, tmp_path):
    base, _ = demo
    # The shipped specs point at ../demo-data from data_specs/: recreate that layout.
    (base / "data_specs").mkdir(exist_ok=True)
    shutil.copy(REPO / "data_specs" / spec_name, base / "data_specs" / spec_name)
    spec = load_spec(base / "data_specs" / spec_name)
    res = ingest(spec, tmp_path / "ws")
    assert res.report["n_studies"] == 36 and res.report["n_rejects"] == 0
    man = read_manifest(Workspace.for_spec(tmp_path / "ws", spec.name).manifest)
    assert man["patient_key"].nunique() < len(man)
    sp = split(spec, tmp_path / "ws")
    df = pd.read_csv(Workspace.for_spec(tmp_path / "ws", spec.name).splits)
    # The MedMNIST test studies are exactly the pinned test set (plus any group they pull along).
    assert sp.report["pinned_test"]["in_manifest"] == 12
    assert (df.split == "test").sum() >= 12 and len(sp.report["counts"]) == 3

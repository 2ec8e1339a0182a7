"""Identifying folder and file names never leave the local side of the workspace.

Sites name folders after patients ("Doe^John"), MRNs and birth dates, and put the institution on top. After
ingest and split, no workspace file but the local side (pseudonym map, file map, key) may hold any of them;
the manifest's paths stay resolvable for the stages that open the files.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import spec_dict as make_spec_dict
from helpers import write_image2d, write_labels, write_nifti, write_spec
from medxfer.config.spec import load_spec
from medxfer.core.workspace import Workspace
from medxfer.ingest.ingest import ingest
from medxfer.ingest.manifest import read_file_map, read_manifest
from medxfer.ingest.split import split
from medxfer.io.phi import Pseudonymizer, is_generic_name, scan_for_phi, shareable_name, shareable_path

SITE = "StMungoHospital"
MARKERS = ["Doe^John", "MRN-0012345", "19650312", SITE]
# Folder names per patient: three of them are the markers themselves, the rest ordinary but not generic.
PATIENT_DIRS = ["Doe^John", "MRN-0012345", "19650312", "Roe^Jane", "Smith_A", "Brown_B", "Lee_C", "Khan_D"]


def _image(rng: np.random.Generator, positive: bool) -> np.ndarray:
    img = rng.integers(0, 60, (24, 24)).astype(np.uint8)
    if positive:
        img[8:16, 8:16] += 150
    return img


def build_dicom_tree(base: Path) -> Path:
    """16 US studies under SITE/<patient>/<birth date>_<n>/, PHI in folders, file names and headers; plus a
    note file, a dangling link and a labels row without a study (rejects with inputs under the same names)."""
    rng = np.random.default_rng(0)
    root = base / "export"
    rows = []
    for i in range(16):
        p = i % len(PATIENT_DIRS)
        folder = root / SITE / PATIENT_DIRS[p] / f"{MARKERS[2]}_{i:02d}"
        name = "Doe^John.dcm" if p == 0 else "IM0001"  # a file named after the patient, and a generic one
        uid = f"1.2.826.0.1.3680043.8.498.{19650312}{i:03d}"  # a UID that embeds the birth date
        write_image2d(
            folder / name,
            _image(rng, i % 2 == 1),
            study_uid=uid,
            patient_id=f"MRN-0012345-{p}" if p else "MRN-0012345",
            patient_name="Doe^John" if p == 0 else f"Other^{p}",
            pixel_spacing=(0.5, 0.5),
            InstitutionName=SITE,
            PatientBirthDate="19650312",
        )
        rows.append([uid, "pos" if i % 2 else "neg"])
    (root / SITE / "Doe^John" / "notes about Doe^John.txt").write_text("MRN-0012345 born 19650312\n")
    os.symlink(root / "nowhere.dcm", root / SITE / "MRN-0012345" / "MRN-0012345.dcm")
    rows.append(["1.2.826.0.1.3680043.8.498.999", "neg"])
    write_labels(base / f"{SITE}_labels.csv", ["StudyInstanceUID", "label"], rows)
    d = make_spec_dict("phi-dicom", "dicom", 2, "export", labels=f"{SITE}_labels.csv", series={"modality": ["US"]})
    return write_spec(base / "spec.yaml", d)


def build_nifti_tree(base: Path) -> Path:
    """16 NIfTI volumes as SITE/<patient>/<birth date>_<n>.nii.gz (one named after the patient), keyed by path."""
    rng = np.random.default_rng(1)
    root = base / "nifti"
    rows = []
    for i in range(16):
        p = i % len(PATIENT_DIRS)
        rel = f"{SITE}/{PATIENT_DIRS[p]}/" + ("Doe^John.nii.gz" if p == 0 and i < 8 else f"{MARKERS[2]}_{i:02d}.nii.gz")
        vol = rng.normal(0, 1, (10, 10, 10)).astype(np.float32)
        vol[3:7, 3:7, 3:7] += 4.0 * (i % 2)
        write_nifti(root / rel, vol)
        rows.append([rel, "pos" if i % 2 else "neg", PATIENT_DIRS[p]])
    write_labels(base / "labels.csv", ["path", "label", "patient"], rows)
    return write_spec(base / "spec.yaml", make_spec_dict("phi-nifti", "nifti", 3, "nifti", patient="patient"))


def _local_side(wsd: Workspace) -> list[Path]:
    return [wsd.pseudonym_map, wsd.file_map, wsd.key_file]


def _check_workspace(spec_path: Path, ws: Path) -> Workspace:
    spec = load_spec(spec_path)
    ingest(spec, ws, workers=1)
    split(spec, ws)
    wsd = Workspace.for_spec(ws, spec.name)
    assert wsd.manifest.is_file() and wsd.splits.is_file() and wsd.scan_cache.is_file()
    hits = scan_for_phi([ws], MARKERS, exclude=_local_side(wsd))
    assert not hits, hits
    # The local side holds them (that is what it is for), owner-only.
    for f in (wsd.pseudonym_map, wsd.file_map):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert scan_for_phi([wsd.file_map], MARKERS)
    # The stages that open files get the real paths back; the file map also leads from each reject to its input.
    man = read_manifest(wsd.manifest)
    assert all(Path(f).is_file() for fs in man["files"] for f in fs)
    raw = read_manifest(wsd.manifest, resolve=False)
    assert all(not Path(f).is_absolute() for fs in raw["files"] for f in fs)
    real = read_file_map(wsd.file_map)
    rej = pd.read_csv(wsd.rejects, keep_default_na=False)
    assert all(i.rsplit(":", 1)[0] in real for i in rej["input"])
    return wsd


def test_dicom_tree_markers_stay_on_the_local_side(tmp_path: Path) -> None:
    wsd = _check_workspace(build_dicom_tree(tmp_path / "d"), tmp_path / "ws")
    rej = pd.read_csv(wsd.rejects, keep_default_na=False).set_index("reason_code")["input"]
    assert {"not_dicom", "dangling_link", "label_without_study"} <= set(rej.index)
    # Generic names stay readable; the labels CSV named after the site is pseudonymised too (extension kept).
    assert rej["label_without_study"].startswith("p-") and rej["label_without_study"].split(":")[0].endswith(".csv")
    raw = read_manifest(wsd.manifest, resolve=False)
    names = {f.split("/")[-1] for fs in raw["files"] for f in fs}
    assert "IM0001" in names and any(n.startswith("p-") and n.endswith(".dcm") for n in names)


def test_nifti_tree_markers_stay_on_the_local_side(tmp_path: Path) -> None:
    _check_workspace(build_nifti_tree(tmp_path / "n"), tmp_path / "ws")


def test_shareable_manifest_is_the_same_wherever_the_data_lies_and_the_cache_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDXFER_PSEUDONYM_KEY", "k" * 40)
    a = build_dicom_tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "b", symlinks=True)
    b = tmp_path / "moved" / "b" / "spec.yaml"
    ra, rb = ingest(load_spec(a), tmp_path / "wa"), ingest(load_spec(b), tmp_path / "wb")
    ma = read_manifest(Workspace.for_spec(tmp_path / "wa", "phi-dicom").manifest, resolve=False)
    mb = read_manifest(Workspace.for_spec(tmp_path / "wb", "phi-dicom").manifest, resolve=False)
    # manifest_content_hash ignores `files`; the shareable `files` themselves no longer differ either.
    assert ra.report["manifest_hash"] == rb.report["manifest_hash"]
    assert ma["files"].tolist() == mb["files"].tolist()
    # The scan cache (keyed by HMACs of paths, no path inside) still serves a re-ingest, and still sees a change.
    again = ingest(load_spec(a), tmp_path / "wa")
    assert again.report["files"]["read"] == 0 and again.report["manifest_hash"] == ra.report["manifest_hash"]
    f = next((tmp_path / "a" / "export").rglob("IM0001"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ingest(load_spec(a), tmp_path / "wa").report["files"]["read"] == 1
    cache = pd.read_parquet(Workspace.for_spec(tmp_path / "wa", "phi-dicom").scan_cache).to_csv()
    assert str(tmp_path) not in cache and "IM0001" not in cache and "export" not in cache


def test_a_workspace_copied_without_its_file_map_says_how_to_fix(tmp_path: Path) -> None:
    from medxfer.core.errors import MedxferError

    spec = load_spec(build_nifti_tree(tmp_path / "n"))
    ingest(spec, tmp_path / "ws")
    wsd = Workspace.for_spec(tmp_path / "ws", spec.name)
    wsd.file_map.unlink()
    assert len(read_manifest(wsd.manifest, columns=["study_key", "label"])) == 16  # no paths asked: fine
    with pytest.raises(MedxferError, match="file map file_map.csv is missing.*rerun `medxfer ingest"):
        read_manifest(wsd.manifest)


@pytest.mark.parametrize(
    ("name", "generic"),
    [
        ("DICOM", True),
        ("IM0001", True),
        ("series1", True),
        ("SE2", True),
        ("img_003.dcm", True),
        ("case_00012.nii.gz", True),
        ("001", True),
        ("README.txt", True),
        ("Doe^John", False),
        ("MRN-0012345", False),
        ("19650312", False),  # 8 digits: a date or an ID, not a counter
        ("0012345", False),
        (SITE, False),
        ("1.2.840.113619.2.55.3", False),  # a UID is the identifier the study/series keys pseudonymise
        ("patient_0042", False),
        ("sub-001", False),
        ("Doe^John.dcm", False),
        ("", False),
    ],
)
def test_generic_name_rule(name: str, generic: bool) -> None:
    assert is_generic_name(name) is generic


def test_shareable_paths_are_relative_keyed_and_keep_known_extensions() -> None:
    p, q = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    root = "/data/site"
    got = shareable_path(f"{root}/{SITE}/Doe^John/SE2/IM0001", root, p)
    parts = got.split("/")
    assert parts[2:] == ["SE2", "IM0001"] and all(x.startswith("p-") and len(x) == 18 for x in parts[:2])
    assert got == shareable_path(f"{root}/{SITE}/Doe^John/SE2/IM0001", root, p)  # stable under one key
    assert shareable_name("Doe^John", p) != shareable_name("Doe^John", q)  # unguessable without the key
    assert shareable_name("Doe^John.nii.gz", p).endswith(".nii.gz")
    assert shareable_path(root, root, p) == "."
    assert shareable_path("/elsewhere/labels.csv", root, p) == "labels.csv"  # outside the root: the name only


def test_the_memoised_sharer_ingest_uses_agrees_with_the_rule() -> None:
    from medxfer.io.phi import PathSharer

    p, root = Pseudonymizer(b"c" * 32), "/data/site"
    paths = [
        f"{root}/{SITE}/Doe^John/SE2/IM0001",
        f"{root}/{SITE}/Doe^John/SE2/IM0002",
        f"{root}/x.dcm",
        root,
        "/data/sitex/a.dcm",  # a sibling whose name starts like the root: outside it
        f"{root}/../other/MRN-0012345.dcm",
        "/elsewhere/labels.csv",
    ]
    share = PathSharer(root, p)
    assert [share(x) for x in paths] == [shareable_path(x, root, p) for x in paths]

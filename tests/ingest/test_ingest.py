"""The ingest stage end to end: every reject reason, label mismatches, PHI, incremental re-runs, exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from helpers import (
    AXIAL,
    PHI,
    make_dicom2d_dataset,
    make_nifti3d_dataset,
    spec_dict,
    write_labels,
    write_multiframe,
    write_nifti,
    write_series,
    write_spec,
)
from medxfer.config.spec import load_spec
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace
from medxfer.ingest.ingest import ingest, resolve_inputs
from medxfer.ingest.manifest import MANIFEST_COLUMNS, read_file_map, read_manifest
from medxfer.io.phi import scan_for_phi

MEDXFER = Path(sys.executable).parent / "medxfer"
PHI_HEADERS = {
    "InstitutionName": PHI["institution"],
    "PatientBirthDate": PHI["birth"],
    "StudyDate": PHI["date"],
    "AccessionNumber": PHI["accession"],
    "ReferringPhysicianName": PHI["physician"],
}
DICOM_REASONS = {
    "not_dicom",
    "truncated",
    "no_pixel_data",
    "missing_tags",
    "missing_position",
    "duplicate_position",
    "missing_slices",
    "uneven_spacing",
    "gantry_tilt",
    "mixed_orientation",
    "inconsistent_pixel_spacing",
    "multiframe_no_geometry",
    "undecodable",
    "no_series_selected",
    "mixed_patients",
}
LABEL_REASONS = {"no_label", "unknown_class", "duplicate_label", "label_without_study"}


def z(*zs: float) -> list[list[float]]:
    return [[0.0, 0.0, float(v)] for v in zs]


def build_messy_ct_tree(base: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A CT tree with 6 good studies and one study per reject reason; returns (spec, uid per case, needles)."""
    root = base / "export"
    uid = {}
    patient_dir = root / PHI["name"].replace("^", "_")  # exports name folders after patients
    phi = dict(patient_id=PHI["id"], patient_name=PHI["name"], **PHI_HEADERS)

    def study(case: str, **kw) -> list[Path]:
        uid[case] = kw.pop("study_uid", None) or pydicom.uid.generate_uid()
        return write_series(patient_dir / case / "SE2", study_uid=uid[case], **{**phi, **kw})

    # Good studies. "multi" has a localizer and two candidate series; the patient has several studies.
    for case in ("good_a", "good_b", "good_c", "good_d", "nolabel", "unknown", "dup_same", "dup_conflict"):
        study(case, n=6)
    write_series(
        patient_dir / "good_a" / "SE1",
        n=3,
        study_uid=uid["good_a"],
        series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        description="SCOUT",
        **phi,
    )
    write_series(
        patient_dir / "good_a" / "SE3", n=4, study_uid=uid["good_a"], series_number=3, description="AX THICK", **phi
    )
    study("missing_position", positions=[*z(0, 2), None, *z(6, 8, 10)])
    study("duplicate_position", positions=z(0, 2, 4, 4, 6, 8))
    study("missing_slices", positions=z(0, 2, 4, 10, 12, 14))
    study("uneven_spacing", positions=z(0, 2, 4.5, 6, 8, 10))
    study("gantry_tilt", tilt_deg=12.0)
    study("mixed_orientation", orientations=[AXIAL] * 5 + [(1.0, 0.0, 0.0, 0.0, 0.999, 0.0447)])
    study("inconsistent_pixel_spacing", pixel_spacings=[(0.8, 0.8)] * 5 + [(0.9, 0.9)])
    study("undecodable", undecodable=True)
    study("no_series_selected", n=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    uid["multiframe_no_geometry"] = pydicom.uid.generate_uid()
    write_multiframe(
        patient_dir / "mf" / "IMG",
        geometry=False,
        study_uid=uid["multiframe_no_geometry"],
        patient_id=PHI["id"],
        PatientName=PHI["name"],
        **PHI_HEADERS,
    )
    uid["mixed_patients"] = pydicom.uid.generate_uid()
    write_series(root / "mixed" / "a", n=3, study_uid=uid["mixed_patients"], patient_id="PA", **PHI_HEADERS)
    write_series(root / "mixed" / "b", n=3, study_uid=uid["mixed_patients"], patient_id="PB", **PHI_HEADERS)
    # File-level problems.
    junk = root / "junk"
    junk.mkdir(parents=True)
    (junk / "README.txt").write_text(f"export of {PHI['name']}\n")
    [src] = write_series(base / "tmp1", n=1, **phi)
    (junk / "truncated").write_bytes(src.read_bytes()[:-200])
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.save_as(junk / "nopixels")
    ds = pydicom.dcmread(src)
    del ds.StudyInstanceUID
    ds.save_as(junk / "nouid")

    classes = {"good_a": "pos", "good_b": "pos", "good_c": "neg", "good_d": "neg"}
    rows = [[uid[c], classes.get(c, "neg")] for c in uid if c != "nolabel"]
    rows = [[u, "maybe" if u == uid["unknown"] else lab] for u, lab in rows]
    rows += [[uid["dup_same"], "neg"], [uid["dup_conflict"], "pos"], ["1.2.3.4.5.6.7", "neg"]]
    write_labels(base / "labels.csv", ["StudyInstanceUID", "label"], rows)
    spec = write_spec(
        base / "spec.yaml", spec_dict("messy-ct", "dicom", 3, "export", series={"modality": ["CT"], "min_slices": 2})
    )
    needles = list(PHI.values()) + list(uid.values())
    return spec, uid, needles


@pytest.fixture
def messy(tmp_path):
    spec, uid, needles = build_messy_ct_tree(tmp_path / "m")
    return load_spec(spec), uid, needles, tmp_path / "ws"


def rejects_of(ws: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(Workspace.for_spec(ws, name).rejects, keep_default_na=False)


def test_every_dicom_and_label_reason_is_reported(messy):
    spec, uid, _, ws = messy
    res = ingest(spec, ws, workers=2)
    rej = rejects_of(ws, spec.name)
    assert set(rej["reason_code"]) == DICOM_REASONS | LABEL_REASONS
    assert res.report["class_counts"] == {"neg": 3, "pos": 2}  # good_c, good_d, dup_same | good_a, good_b
    assert res.report["rejects_by_reason"]["duplicate_label"] == 2  # the repeated row + the conflicting key
    man = read_manifest(Workspace.for_spec(ws, spec.name).manifest)
    assert list(man.columns) == MANIFEST_COLUMNS
    row = man.iloc[0]
    assert row.study_key.startswith("st-") and row.patient_key.startswith("pt-")
    assert row["shape"] == [6, 16, 16] and row["spacing"] == pytest.approx([2.0, 0.8, 0.8])
    assert row.orientation == "SPL" and row.modality == "CT" and row.source_kind == "dicom"
    assert row.intensity_min == pytest.approx(100 - 1024) and len(row.content_hash) == 64
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in row.files) and row.n_slices == 6
    # On disk: relative to source.root, the patient-named and case-named folders pseudonymised, "SE2" kept.
    raw = read_manifest(Workspace.for_spec(ws, spec.name).manifest, resolve=False)
    assert all(not Path(f).is_absolute() and f.split("/")[-2] == "SE2" for fs in raw["files"] for f in fs)
    assert all(f.startswith("p-") for fs in raw["files"] for f in fs)
    # One patient, several studies: one patient key.
    assert man["patient_key"].nunique() == 1
    # The localizer study chose the 6-slice series and logged why the others lost.
    sel = pd.read_csv(Workspace.for_spec(ws, spec.name).series_selection)
    assert {"image_type", "preference"} <= set(sel["reason_code"].dropna())
    assert res.report["series_not_chosen_by_reason"]["image_type"] >= 2


def test_rejects_point_at_the_input_and_name_no_identifiers(messy):
    spec, uid, needles, ws = messy
    ingest(spec, ws, workers=2)
    rej = rejects_of(ws, spec.name)
    by_code = dict(zip(rej.reason_code, rej.input, strict=False))
    # Shareable inputs; the local file map leads back to the real path.
    real = read_file_map(Workspace.for_spec(ws, spec.name).file_map)
    assert by_code["duplicate_position"].startswith("p-") and by_code["duplicate_position"].endswith("/SE2")
    assert real[by_code["duplicate_position"]] == str(
        spec.root / PHI["name"].replace("^", "_") / "duplicate_position" / "SE2"
    )
    assert by_code["not_dicom"].endswith("README.txt")
    assert Path(real[by_code["not_dicom"]]).read_text().startswith("export of")
    last_line = len((spec.labels_csv).read_text().splitlines())  # the row with a key no study has
    assert by_code["label_without_study"] == f"labels.csv:{last_line}"
    assert real["labels.csv"] == str(spec.labels_csv)
    assert not scan_for_phi("\n".join(rej["message"]), needles)


def test_no_phi_in_any_output_or_cli_stream(messy, tmp_path):
    spec, uid, needles, ws = messy
    proc = subprocess.run(
        [str(MEDXFER), "ingest", str(spec.spec_path), "--workspace", str(ws), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n_studies"] == 5 and summary["n_rejects"] > 15
    proc2 = subprocess.run(
        [str(MEDXFER), "split", str(spec.spec_path), "--workspace", str(ws), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    wsd = Workspace.for_spec(ws, spec.name)
    # Only the local side (the pseudonym map, the file map, the key) may hold identifiers or folder names:
    # manifest (paths included), rejects (inputs included), series selection and the scan cache are shareable.
    streams = tmp_path / "streams.txt"
    streams.write_text(proc.stdout + proc.stderr + proc2.stdout + proc2.stderr)
    local_only = [wsd.pseudonym_map, wsd.file_map, wsd.key_file]
    hits = scan_for_phi([ws, streams], [*needles, "good_a", "dup_conflict"], exclude=local_only)
    assert not hits, hits
    # The map is the one place that can undo pseudonyms.
    mapping = pd.read_csv(wsd.pseudonym_map)
    assert PHI["id"] in set(mapping["original"]) and uid["good_a"] in set(mapping["original"])


def test_strict_turns_any_reject_into_an_error(messy):
    spec, _, _, ws = messy
    with pytest.raises(StageError, match="--strict: .* rejected"):
        ingest(spec, ws, strict=True)
    assert Workspace.for_spec(ws, spec.name).rejects.is_file()  # written before failing


def test_nothing_usable_and_empty_class_exit_nonzero(tmp_path):
    base = tmp_path / "d"
    (base / "data").mkdir(parents=True)
    (base / "data" / "a.txt").write_text("x")
    write_labels(base / "labels.csv", ["StudyInstanceUID", "label"], [["1.2.3", "neg"]])
    spec = load_spec(write_spec(base / "s.yaml", spec_dict("none", "dicom", 2, "data")))
    with pytest.raises(StageError, match="nothing usable"):
        ingest(spec, tmp_path / "ws")
    ds = make_dicom2d_dataset(tmp_path / "one", n_studies=6)
    labels = pd.read_csv(ds.labels_csv)
    labels["label"] = "neg"
    labels.to_csv(ds.labels_csv, index=False)
    with pytest.raises(StageError, match=r"class\(es\) \['pos'\] have no usable studies"):
        ingest(ds.spec, ds.workspace)


def test_incremental_rerun_reads_only_changed_files(tiny_dicom2d, monkeypatch):
    d = tiny_dicom2d
    first = ingest(d.spec, d.workspace)
    assert first.report["files"] == {
        "seen": 40,
        "read": 40,
        "cached": 0,
        "header_fallbacks": 0,
        "hidden_skipped": 0,
        "ignored": 0,
    }
    again = ingest(d.spec, d.workspace)
    assert again.report["files"]["read"] == 0 and again.report["files"]["cached"] == 40
    assert again.report["manifest_hash"] == first.report["manifest_hash"]
    one = next(d.root.rglob("IM0001"))
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert ingest(d.spec, d.workspace).report["files"]["read"] == 1
    # Another key: cached pseudonyms are meaningless, everything is read again and keys change.
    monkeypatch.setenv("MEDXFER_PSEUDONYM_KEY", "another-key-for-this-test")
    other = ingest(d.spec, d.workspace)
    assert other.report["files"]["read"] == 40
    assert other.report["manifest_hash"] != first.report["manifest_hash"]


def test_2d_dataset_report_and_summary(tiny_dicom2d):
    res = ingest(tiny_dicom2d.spec, tiny_dicom2d.workspace)
    s = res.summary()
    assert s["n_studies"] == 40 and s["n_patients"] == 24 and s["class_counts"] == {"neg": 20, "pos": 20}
    assert s["imbalance_ratio"] == 1.0 and s["n_rejects"] == 0
    rep = json.loads(Path(s["outputs"]["report"]).read_text())
    assert rep["shape"]["common"] == {"32x32": 40} and rep["spacing"]["median"] == [0.5, 0.5]
    assert rep["studies_per_patient"] == {"1": 12, "2": 8, "3": 4}
    assert rep["spec_hash"] == tiny_dicom2d.spec.content_hash()
    title, rows = res.table()
    assert "ingest" in title and dict(rows)["studies"].startswith("40 usable")
    man = read_manifest(Path(s["outputs"]["manifest"]))
    assert set(man["orientation"]) == {"unknown"} and set(man["n_slices"]) == {1}


def test_accession_number_key_and_shared_accession(tmp_path):
    base = tmp_path / "acc"
    uids = []
    for i, acc in enumerate(["ACC1", "ACC2", "ACC3", "ACC3"]):
        uids.append(pydicom.uid.generate_uid())
        write_series(base / "data" / f"s{i}", n=3, study_uid=uids[-1], AccessionNumber=acc, patient_id=f"P{i}")
    write_labels(base / "labels.csv", ["acc", "label"], [["ACC1", "neg"], ["ACC2", "pos"], ["ACC3", "pos"]])
    d = spec_dict("acc", "dicom", 3, "data", key="AccessionNumber")
    d["labels"]["column"] = "label"
    d["labels"]["key"] = "AccessionNumber"
    spec_path = write_spec(base / "s.yaml", d)
    labels = pd.read_csv(base / "labels.csv").rename(columns={"acc": "AccessionNumber"})
    labels.to_csv(base / "labels.csv", index=False)
    res = ingest(load_spec(spec_path), tmp_path / "ws")
    assert res.report["class_counts"] == {"neg": 1, "pos": 1}
    assert res.report["rejects_by_reason"] == {"duplicate_study_key": 2}


def build_nifti_tree(base: Path) -> Path:
    rng = np.random.default_rng(1)
    root = base / "vols"
    rows = []
    for i in range(4):
        rel = f"{PHI['name'].replace('^', '_')}/good{i}.nii.gz"
        write_nifti(root / rel, rng.normal(size=(8, 8, 8)).astype(np.float32))
        rows.append([rel, ["neg", "pos"][i % 2], PHI["id"] if i < 2 else "OTHER"])
    nan = rng.normal(size=(8, 8, 8)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    write_nifti(root / "nan.nii.gz", nan)
    write_nifti(root / "4d.nii.gz", rng.normal(size=(8, 8, 8, 3)).astype(np.float32))
    (root / "junk.nii").write_bytes(b"not nifti" * 50)
    big = write_nifti(base / "tmp" / "big.nii", rng.normal(size=(16, 16, 16)).astype(np.float32))
    (root / "cut.nii").write_bytes(big.read_bytes()[:-4000])
    import nibabel as nib

    img = nib.load(str(write_nifti(root / "qs.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))))
    q = img.affine.copy()
    q[:3, 3] += 30
    img.header.set_qform(q, code=1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.header.get_sform(), img.header), str(root / "qs.nii.gz"))
    (root / "sidecar.json").write_text("{}")
    rows += [
        [p, "neg", "X"] for p in ("nan.nii.gz", "4d.nii.gz", "junk.nii", "cut.nii", "qs.nii.gz", "./missing.nii.gz")
    ]
    write_labels(base / "labels.csv", ["path", "label", "patient"], rows)
    return write_spec(base / "s.yaml", spec_dict("nii", "nifti", 3, "vols", patient="patient"))


def test_nifti_rejects_patients_and_paths(tmp_path):
    spec = load_spec(build_nifti_tree(tmp_path / "n"))
    res = ingest(spec, tmp_path / "ws")
    rej = rejects_of(tmp_path / "ws", spec.name)
    assert set(rej["reason_code"]) == {
        "nonfinite_pixels",
        "wrong_dims",
        "not_nifti",
        "truncated",
        "qform_sform_mismatch",
        "label_without_study",
    }
    assert res.report["files"]["ignored"] == 1  # the JSON sidecar
    man = read_manifest(Workspace.for_spec(tmp_path / "ws", spec.name).manifest)
    assert len(man) == 4 and man["patient_key"].nunique() == 2 and set(man["source_kind"]) == {"nifti"}
    assert man.iloc[0]["shape"] == [8, 8, 8] and man.iloc[0]["spacing"] == [2.0, 2.0, 3.0]
    wsd = Workspace.for_spec(tmp_path / "ws", spec.name)
    assert not scan_for_phi(
        [wsd.ingest_report, wsd.splits if wsd.splits.exists() else wsd.ingest_report],
        [PHI["id"], PHI["name"].replace("^", "_")],
    )
    assert not scan_for_phi(
        read_manifest(wsd.manifest).drop(columns=["files"]).to_csv(), [PHI["id"], PHI["name"].replace("^", "_")]
    )


def test_nifti_source_reached_through_a_symlink(tmp_path):
    # source.root names the data through a symlink (a shared drive, a worktree): keys are paths relative to
    # the root as the user gave it, and nothing may crash on a resolved/unresolved mix of the two.
    ds = make_nifti3d_dataset(tmp_path / "real", n_studies=6, size=8)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    tree = yaml.safe_load(ds.spec_path.read_text())
    tree["source"]["root"] = str(tmp_path / "link" / "nifti")
    ds.spec_path.write_text(yaml.safe_dump(tree))
    res = ingest(load_spec(ds.spec_path), tmp_path / "ws")
    s = res.summary()
    assert s["n_studies"] == 6 and s["n_rejects"] == 0 and s["class_counts"] == {"neg": 3, "pos": 3}


def test_resolve_inputs_for_predict(tmp_path, messy):
    spec, uid, _, _ = messy
    root = spec.root
    patient_dir = next(p for p in root.iterdir() if p.name.startswith("PLANTED"))
    items = resolve_inputs(
        [patient_dir / "good_a", patient_dir / "gantry_tilt", root / "junk" / "README.txt", tmp_path / "missing"], spec
    )
    by_input = {Path(i.input).name: i for i in items}
    assert by_input["good_a"].reason_code is None and len(by_input["good_a"].files) == 6
    assert by_input["gantry_tilt"].reason_code == "gantry_tilt"
    assert by_input["README.txt"].reason_code == "not_dicom"
    assert by_input["missing"].reason_code == "not_found"
    # A folder with several studies yields one item per study; a CSV with a path column expands.
    csv = tmp_path / "inputs.csv"
    pd.DataFrame({"path": [str(patient_dir)]}).to_csv(csv, index=False)
    items = resolve_inputs([csv], spec)
    usable = [i for i in items if i.reason_code is None]
    assert len(usable) == 8 and all(i.source_kind == "dicom" for i in items)
    assert {i.reason_code for i in items} >= {"duplicate_position", "undecodable", "multiframe_no_geometry"}


def test_resolve_inputs_nifti(tmp_path):
    spec = load_spec(build_nifti_tree(tmp_path / "n"))
    items = resolve_inputs([spec.root], spec)
    assert sum(i.reason_code is None for i in items) == 4
    assert {i.reason_code for i in items} >= {"nonfinite_pixels", "wrong_dims", "not_nifti"}


def test_real_series_mr_volume_and_kits_quarantine(shared_data, tmp_path):
    root = shared_data / "dicom"
    mr = pydicom.dcmread(next((root / "ge_mr_t1_mprage").iterdir()), stop_before_pixels=True).StudyInstanceUID
    ct = pydicom.dcmread(next((root / "kits_ct_dupe_positions").iterdir()), stop_before_pixels=True).StudyInstanceUID
    write_labels(tmp_path / "labels.csv", ["StudyInstanceUID", "label"], [[mr, "neg"], [ct, "pos"]])
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict("real", "dicom", 3, str(root))))
    with pytest.raises(StageError, match=r"\['pos'\] have no usable studies"):
        ingest(spec, tmp_path / "ws")
    wsd = Workspace.for_spec(tmp_path / "ws", "real")
    man = read_manifest(wsd.manifest)
    [row] = man.itertuples()
    assert row.shape == [130, 256, 256] and row.spacing[0] == pytest.approx(1.2, abs=1e-3)
    assert row.modality == "MR" and len(row.files) == 130
    rej = pd.read_csv(wsd.rejects)
    [kits] = rej[rej.reason_code != "not_dicom"].itertuples()
    real = read_file_map(wsd.file_map)
    assert kits.reason_code == "duplicate_position" and real[kits.input].endswith("kits_ct_dupe_positions")
    assert "1 of 11 slices share a position" in kits.message
    # The LICENSE/CITATION text files next to the series are listed, not silently skipped.
    assert all(real[p].endswith(("LICENSE", "CITATION")) for p in rej[rej.reason_code == "not_dicom"].input)


def test_series_description_never_stored_and_rules_hold_on_a_cached_rerun(tmp_path):
    """SeriesDescription is free text (here a planted name): no workspace file but the map and the key holds it,
    and a description rule still picks the right series when the headers come from the scan cache."""
    name = PHI["name"]
    root, rows = tmp_path / "data", []
    for i, label in enumerate(("neg", "pos")):
        uid = pydicom.uid.generate_uid()
        write_series(root / f"S{i}" / "A", n=6, study_uid=uid, patient_id=f"P{i}", description=f"T1 AX {name}")
        # More slices and a lower series number: without the rule this one would win.
        kw = dict(study_uid=uid, patient_id=f"P{i}", series_number=1, description=f"{name} SCOUT")
        write_series(root / f"S{i}" / "B", n=9, **kw)
        rows.append([uid, label])
    write_labels(tmp_path / "labels.csv", ["StudyInstanceUID", "label"], rows)
    series = {"modality": ["CT"], "description_exclude": ["(?i)scout"]}
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict("desc", "dicom", 3, "data", series=series)))
    ws = tmp_path / "ws"
    wsd = Workspace.for_spec(ws, "desc")
    first = ingest(spec, ws)
    assert list(read_manifest(wsd.manifest)["n_slices"]) == [6, 6]
    again = ingest(spec, ws)
    assert again.report["files"]["read"] == 0 and again.report["files"]["cached"] == 30
    assert list(read_manifest(wsd.manifest)["n_slices"]) == [6, 6]
    assert again.report["manifest_hash"] == first.report["manifest_hash"]
    hits = scan_for_phi([ws], [name], exclude=[wsd.pseudonym_map, wsd.key_file])
    assert not hits, hits
    # Parquet may compress a value out of sight of a byte scan: the decoded cache must not hold it either.
    assert name.lower() not in pd.read_parquet(wsd.scan_cache).to_csv().lower()


def test_decode_threads_only_for_several_studies_of_big_slices():
    """Small slices decode faster in one thread (the checks hold the GIL); see ingest._THREAD_MIN_PIXELS."""
    from types import SimpleNamespace

    from medxfer.ingest import ingest as ingest_mod

    def chosen(n, px):
        return [(None, SimpleNamespace(first=SimpleNamespace(rows=px, cols=px)), None)] * n

    assert not ingest_mod._decode_in_threads(chosen(250, 32))
    assert not ingest_mod._decode_in_threads(chosen(200, 128))
    assert ingest_mod._decode_in_threads(chosen(100, 256))
    assert not ingest_mod._decode_in_threads(chosen(1, 512))  # one study: one task

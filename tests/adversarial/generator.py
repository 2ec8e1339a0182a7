"""A generated corpus of hostile inputs with planted identifiers, each case with the outcome it must get.

    corpus = build_corpus(tmp_path)
    corpus.cases        # list[Case]: id, cls, fmt, stage, expect (Expect), path, markers
    corpus.markers      # marker -> where it was planted (a header attribute, a folder name, a CSV column...)
    corpus.spec_2d      # DICOM US 2D spec: 36 trainable studies + the bad DICOM/labels cases (ingest -> register)
    corpus.spec_ct      # DICOM CT 3D spec: series-level cases (ingest only)
    corpus.spec_nii     # NIfTI 3D spec: volume cases (ingest only)
    corpus.predict_inputs  # paths for `medxfer predict` / the pyfunc, in order, one Case each

Classes (``Case.cls``) follow issue 14's "Why" plus the PHI part of its "What to build":
  crash      once a traceback (zero-size NIfTI axis, RGB24, 1x4096 strip, `[/]` in a path, bad quaternion, ...)
  accepted   accepted although it should not be (slope 0, 1x1, constant, complex, NaN/Inf, one bad slice)
  silent     silent or misleading (dangling link, blank key, cut header, big-endian claim, NIfTI given to DICOM,
             root climbing out, root that is a file, field names)
  phi        identifiers: every PS3.15 Annex E Basic Profile attribute below, private tags, folder and file names,
             labels-CSV extra columns, free text in a spec's YAML error line
  good       valid inputs that must stay accepted (RGB, a study folder named "None", markers only in PHI places)

Expected outcomes (``Expect.kind``): "reject" (rejects.csv row with ``code``), "predict_error" (an error row
starting "code:" with NaN probabilities and no decision), "cli_error" (exit code ``rc`` and one line matching
``match``, no traceback), "accepted" (in the manifest, or a finite prediction with a decision).

Markers: "PHIMARK" + 4 digits for text attributes, unique dates/times/UIDs for DA/TM/DT/UI ones (matched with
digit boundaries, so a probability such as 0.41902031 is no hit). Every marker is unique to where it was planted.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset as DicomDataset
from pydicom.sequence import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared builders

from helpers import (  # noqa: E402
    set_dicom_attrs,
    spec_dict,
    write_image2d,
    write_labels,
    write_multiframe,
    write_nifti,
    write_nifti_raw,
    write_series,
    write_spec,
)

# PS3.15 (2023) Annex E, Table E.1-1, Basic Application Level Confidentiality Profile: the attributes with a
# text, date, time or UID value that a single-frame image can carry at the top level (sequences, overlays, curves
# and numeric-only attributes left out; OtherPatientIDsSequence is planted as a sequence below). From the table's
# D/Z/X/U actions, 118 attributes.
ANNEX_E = [
    "AccessionNumber",
    "PatientID",
    "PatientBirthDate",
    "PatientName",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyID",
    "StudyTime",
    "ConsultingPhysicianName",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialSubjectID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "AcquisitionComments",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "CassetteID",
    "CommentsOnThePerformedProcedureStep",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "CurveDate",
    "DateOfInstallation",
    "DateOfLastCalibration",
    "DateOfSecondaryCapture",
    "DerivationDescription",
    "DischargeDiagnosisDescription",
    "EthnicGroup",
    "GantryID",
    "GeneratorID",
    "HumanPerformerName",
    "HumanPerformerOrganization",
    "IdentifyingComments",
    "ImageComments",
    "ImagingServiceRequestComments",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InsurancePlanIdentification",
    "IssuerOfPatientID",
    "LastMenstrualDate",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults",
    "NetworkID",
    "Occupation",
    "OrderEnteredBy",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientComments",
    "PatientAddress",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientInstitutionResidence",
    "PatientMotherBirthName",
    "PatientReligiousPreference",
    "PatientTelephoneNumbers",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "PlateID",
    "PreMedication",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestedProcedureComments",
    "RequestedProcedureID",
    "RequestingPhysician",
    "RequestingService",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "RetrieveAETitle",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepLocation",
    "ScheduledStationName",
    "ScheduledStudyLocation",
    "SeriesDescription",
    "ServiceEpisodeID",
    "SpecimenShortDescription",
    "StationAETitle",
    "StudyComments",
    "StudyDescription",
    "StudyIDIssuer",
    "TimeOfLastCalibration",
    "TimezoneOffsetFromUTC",
    "VisitComments",
    "AcquisitionDate",
    "AcquisitionTime",
    "RequestedProcedureDescription",
    "InstanceCreationDate",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDateTime",
    "DeviceSerialNumber",
    "InstanceCreationTime",
    "InstitutionName",
    "OperatorsName",
    "StationName",
    "ContentDate",
    "ContentTime",
    "ContrastBolusAgent",
    "ContentCreatorName",
    "DetectorID",
    "InstanceCreatorUID",
    "DeviceUID",
]
# Set per study (a patient's ID groups the split; UIDs are unique by definition), the rest once for all.
PER_STUDY = {"PatientID", "PatientName", "AccessionNumber", "StudyID"}

CLASSES = ("neg", "pos")
N_GOOD = 36  # trainable 2D studies: 3 splits x 2 classes with a few patients each
UID_ROOT = "1.2.826.0.1.3680043.10.5151"  # planted UIDs: matched as whole numbers (digit boundaries)
MARK = "PHIMARK"


@dataclass
class Expect:
    kind: str  # reject | predict_error | cli_error | accepted
    code: str | None = None  # reason code (reject, predict_error)
    rc: int | None = None  # exit code (cli_error)
    match: str | None = None  # regex the one error line must match (cli_error)


@dataclass
class Case:
    id: str
    cls: str  # crash | accepted | silent | phi | good
    fmt: str  # dicom | nifti | labels | spec | path
    stage: str  # ingest-2d | ingest-ct | ingest-nii | predict | cli
    expect: Expect
    path: Path | None = None  # the input (a file or study folder; a spec for cli cases)
    study_uid: str | None = None  # DICOM study-level cases: the StudyInstanceUID the reject is keyed on
    markers: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)  # cli cases: the command line


@dataclass
class Corpus:
    root: Path
    cases: list[Case]
    markers: dict[str, str]
    spec_2d: Path
    spec_ct: Path
    spec_nii: Path
    predict_inputs: list[Path]
    workspace: Path

    def by_stage(self, stage: str) -> list[Case]:
        return [c for c in self.cases if c.stage == stage]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for c in self.cases:
            out.setdefault(c.cls, {}).setdefault(c.fmt, 0)
            out[c.cls][c.fmt] += 1
        return out


class _Marks:
    """Unique marker values by VR; remembers where each was planted."""

    def __init__(self) -> None:
        self.n = 0
        self.where: dict[str, str] = {}

    def _next(self) -> int:
        self.n += 1
        return self.n

    def text(self, where: str) -> str:
        m = f"{MARK}{self._next():04d}"
        self.where[m] = where
        return m

    def value(self, keyword: str, where: str) -> str:
        vr = pydicom.datadict.dictionary_VR(keyword)
        n = self._next()
        if vr == "DA":
            v = (_dt.date(1901, 1, 1) + _dt.timedelta(days=37 * n)).strftime("%Y%m%d")
        elif vr == "TM":
            v = f"{n % 24:02d}{n % 60:02d}{(7 * n) % 60:02d}.{515100 + n}"
        elif vr == "DT":
            v = (_dt.datetime(1902, 1, 1) + _dt.timedelta(days=41 * n, seconds=n)).strftime("%Y%m%d%H%M%S")
        elif vr == "UI":
            v = f"{UID_ROOT}.{n}"
        elif vr == "PN":
            v = f"{MARK}{n:04d}^HELGA"
        else:  # LO, SH, LT, ST, UT, AE, CS: all take 16 upper-case characters
            v = f"{MARK}{n:04d}"
        key = v.split("^")[0]
        self.where[key] = where
        return v

    def uid(self, where: str) -> str:
        v = f"{UID_ROOT}.{self._next()}"
        self.where[v] = where
        return v


def _class_image(rng: np.random.Generator, positive: bool, size: int = 32, rgb: bool = False) -> np.ndarray:
    img = rng.normal(60, 12, (size, size))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img] * 3, -1) if rgb else img


def _cut(path: Path, at: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:at] if at > 0 else data[:at])
    return path


# ------------------------------------------------------------------------------------------------ 2D DICOM


def _annex_e_attrs(marks: _Marks, shared: dict[str, str], i: int, patient: int) -> dict[str, Any]:
    attrs = dict(shared)
    for kw in PER_STUDY:
        attrs[kw] = marks.value(kw, f"{kw} of study {i}") if kw != "PatientID" else f"{MARK}P{patient:03d}"
    marks.where[attrs["PatientID"]] = f"PatientID of patient {patient}"
    return attrs


def _plant_extras(path: Path, marks: _Marks, i: int) -> None:
    """A private block and a sequence, which write_image2d's keyword attributes cannot express."""
    ds = pydicom.dcmread(str(path))
    block = ds.private_block(0x0099, f"ACME {marks.text(f'private creator, study {i}')}", create=True)
    block.add_new(0x01, "LO", marks.text(f"private LO (0099,xx01), study {i}"))
    block.add_new(0x02, "UT", f"free text naming {marks.text(f'private UT, study {i}')}")
    item = DicomDataset()
    item.PatientID = marks.text(f"OtherPatientIDsSequence PatientID, study {i}")
    item.IssuerOfPatientID = marks.text(f"OtherPatientIDsSequence issuer, study {i}")
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.save_as(str(path), enforce_file_format=True)


def _build_2d(root: Path, marks: _Marks, cases: list[Case]) -> tuple[Path, list[list[str]]]:
    rng = np.random.default_rng(42)
    data = root / "us"
    shared = {kw: marks.value(kw, kw) for kw in ANNEX_E if kw not in PER_STUDY}
    rows: list[list[str]] = []
    uids: list[str] = []
    for i in range(N_GOOD):
        patient = i // 2 if i < 24 else i - 12  # 24 studies of 12 patients in pairs, then 12 single ones
        positive = i % 2 == 1
        uid = marks.uid(f"StudyInstanceUID of study {i}")
        # Sites name folders after patients: a marker in the patient folder and in the file name; one study sits in
        # a folder named "None" (train once refused it: "names a source file"), one is RGB.
        pdir = "None" if i == 5 else f"{MARK}{marks.n + 1:04d}_Doe^John"
        if i != 5:
            marks.where[f"{MARK}{marks.n + 1:04d}"] = f"patient folder name, study {i}"
            marks.n += 1
        fname = f"IM_{marks.text(f'file name, study {i}')}.dcm"
        attrs = _annex_e_attrs(marks, shared, i, patient)
        attrs["SeriesInstanceUID"] = marks.uid(f"SeriesInstanceUID of study {i}")
        attrs["SOPInstanceUID"] = marks.uid(f"SOPInstanceUID of study {i}")
        p = write_image2d(
            data / pdir / f"ST{i:03d}" / fname,
            _class_image(rng, positive, rgb=(i == 7)),
            study_uid=uid,
            patient_id=attrs.pop("PatientID"),
            patient_name=attrs.pop("PatientName"),
            pixel_spacing=(0.5, 0.5),
            description=attrs.pop("SeriesDescription"),
            **attrs,
        )
        if i % 6 == 0:
            _plant_extras(p, marks, i)
        rows.append(
            [uid, CLASSES[int(positive)], marks.text(f"labels.csv comment, study {i}"), f"{MARK}P{patient:03d}"]
        )
        uids.append(uid)
        if i in (5, 7, 0):
            what = {5: "study folder named None", 7: "RGB ultrasound", 0: "private tags + sequence with markers"}[i]
            cases.append(
                Case(f"good-{what.replace(' ', '-')}", "good", "dicom", "ingest-2d", Expect("accepted"), p.parent, uid)
            )
    # One case per planted attribute or place, so the report counts what was planted, not files.
    for kw in [
        *ANNEX_E,
        "OtherPatientIDsSequence",
        "private",
        "patient folder",
        "file name",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    ]:
        ms = sorted(m for m, w in marks.where.items() if w == kw or w.startswith((f"{kw} of", f"{kw} ", f"{kw},")))
        ms += sorted(
            m for m, w in marks.where.items() if kw in ("private", "patient folder", "file name") and w.startswith(kw)
        )
        assert ms, kw
        cases.append(
            Case(
                f"phi-{kw.replace(' ', '-')}",
                "phi",
                "dicom",
                "ingest-2d",
                Expect("accepted"),
                data,
                markers=sorted(set(ms)),
            )
        )

    def bad(cid: str, cls: str, code: str, pixels: np.ndarray | None = None, labelled: bool = True, **kw: Any) -> Path:
        uid = marks.uid(f"StudyInstanceUID of case {cid}")
        p = write_image2d(
            data / "bad" / cid / "IM0001.dcm",
            pixels if pixels is not None else _class_image(rng, False),
            study_uid=uid,
            patient_id=f"{MARK}Q{len(cases):03d}",
            **kw,
        )
        if labelled:
            rows.append([uid, "neg", "", ""])
        cases.append(
            Case(f"dicom-{cid}", cls, "dicom", "ingest-2d", Expect("reject", code), p, uid if labelled else None)
        )
        return p

    # crashes once
    bad("strip-1x4096", "crash", "too_small", np.arange(4096, dtype=np.uint16).reshape(1, 4096) % 251, False)
    # accepted but should not be
    bad("one-pixel", "accepted", "too_small", np.array([[7]], np.uint8), False)
    bad("slope-zero", "accepted", "constant_image", RescaleSlope="0", RescaleIntercept="5")
    bad("constant", "accepted", "constant_image", np.full((16, 16), 9, np.uint8))
    bad("slope-nan", "accepted", "nonfinite_pixels", RescaleSlope="NaN")
    bad("slope-1e38", "accepted", "nonfinite_pixels", RescaleSlope="1e38")
    p = bad("undecodable-jpeg", "accepted", "undecodable")
    ds = pydicom.dcmread(str(p))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg stream" + bytes(32)])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(p), enforce_file_format=True)
    # silent or misleading
    for at in (140, 300, 600):
        _cut(bad(f"cut-header-{at}", "silent", "truncated", labelled=False), at)
    _cut(bad("cut-pixels", "silent", "truncated", labelled=False), -40)
    p = bad("big-endian-claim", "silent", "wrong_transfer_syntax", labelled=False)
    raw = bytearray(p.read_bytes())
    j = raw.find(b"1.2.840.10008.1.2.1\0")
    raw[j : j + 20] = b"1.2.840.10008.1.2.2\0"
    p.write_bytes(bytes(raw))
    p = bad("native-length-mismatch", "silent", "truncated", labelled=False)
    ds = pydicom.dcmread(str(p))
    ds.PixelData = ds.PixelData[:-20]  # an element 20 bytes short of Rows x Columns, the file itself whole
    ds.save_as(str(p), enforce_file_format=True)
    cases[-1].expect = Expect("reject", "undecodable")
    p = data / "bad" / "not-dicom" / f"notes_{marks.text('file name of a text file')}.dcm"
    p.parent.mkdir(parents=True)
    p.write_text(f"scanned by {marks.text('text file content')}\n")
    cases.append(Case("dicom-text-file", "silent", "dicom", "ingest-2d", Expect("reject", "not_dicom"), p))
    p = data / "bad" / "empty" / "IM0001.dcm"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    cases.append(Case("dicom-empty-file", "silent", "dicom", "ingest-2d", Expect("reject", "not_dicom"), p))
    p = write_nifti(
        data / "bad" / "nifti-in-dicom-tree" / "vol.nii.gz", rng.random((8, 8), dtype=np.float32), spacing=(1.0, 1.0)
    )
    cases.append(Case("dicom-nifti-in-tree", "silent", "nifti", "ingest-2d", Expect("reject", "not_dicom"), p))
    p = data / "bad" / "dangling" / f"{MARK}{marks.n + 1:04d}.dcm"
    marks.where[f"{MARK}{marks.n + 1:04d}"] = "dangling link name"
    marks.n += 1
    p.parent.mkdir(parents=True)
    os.symlink(root / "nowhere" / "gone.dcm", p)
    cases.append(Case("dicom-dangling-link", "silent", "path", "ingest-2d", Expect("reject", "dangling_link"), p))
    p = bad("no-study-uid", "silent", "missing_tags", labelled=False)
    ds = pydicom.dcmread(str(p))
    del ds.StudyInstanceUID
    ds.save_as(str(p), enforce_file_format=True)
    p = write_image2d(data / "bad" / "no-pixels" / "IM0001.dcm")
    ds = pydicom.dcmread(str(p))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(str(p), enforce_file_format=True)
    cases.append(Case("dicom-no-pixel-data", "silent", "dicom", "ingest-2d", Expect("reject", "no_pixel_data"), p))
    # one study, two files, two PatientIDs
    uid = marks.uid("StudyInstanceUID of case mixed-patients")
    for k in range(2):
        write_image2d(
            data / "bad" / "mixed-patients" / f"IM{k}.dcm",
            _class_image(rng, True),
            study_uid=uid,
            patient_id=f"{MARK}M{k}",
            instance_number=k + 1,
        )
    rows.append([uid, "pos", "", ""])
    cases.append(
        Case(
            "dicom-mixed-patients",
            "silent",
            "dicom",
            "ingest-2d",
            Expect("reject", "mixed_patients"),
            data / "bad" / "mixed-patients",
            uid,
        )
    )
    return data, rows


def _labels_cases(root: Path, rows: list[list[str]], marks: _Marks, cases: list[Case]) -> Path:
    rng = np.random.default_rng(7)
    data = root / "us"
    labels = root / "labels.csv"
    extra: list[list[str]] = []
    # blank key: a row with a label but no StudyInstanceUID
    extra.append(["", "pos", marks.text("comment on a blank-key row"), ""])
    cases.append(Case("labels-blank-key", "silent", "labels", "ingest-2d", Expect("reject", "blank_key"), labels))
    # unknown class, duplicate rows, label without study, a study without a row
    for cid, code, label, dup in (
        ("unknown-class", "unknown_class", "maybe", False),
        ("duplicate-label", "duplicate_label", "neg", True),
        ("no-label", "no_label", None, False),
    ):
        uid = marks.uid(f"StudyInstanceUID of case {cid}")
        p = write_image2d(
            data / "labels" / cid / "IM0001.dcm",
            _class_image(rng, False),
            study_uid=uid,
            patient_id=f"{MARK}L{len(cases):03d}",
        )
        if label is not None:
            extra.append([uid, label, "", ""])
        if dup:
            extra.append([uid, "pos", "", ""])
        cases.append(Case(f"labels-{cid}", "silent", "labels", "ingest-2d", Expect("reject", code), p.parent, uid))
    ghost = marks.uid("StudyInstanceUID of a label without study")
    extra.append([ghost, "neg", marks.text("comment on a label without study"), ""])
    cases.append(
        Case("labels-without-study", "silent", "labels", "ingest-2d", Expect("reject", "label_without_study"), labels)
    )
    cases.append(
        Case(
            "phi-labels-extra-columns",
            "phi",
            "labels",
            "ingest-2d",
            Expect("accepted"),
            labels,
            markers=[m for m, w in marks.where.items() if w.startswith(("labels", "comment"))],
        )
    )
    write_labels(labels, ["StudyInstanceUID", "label", "comment", "mrn"], rows + extra)
    return labels


# ------------------------------------------------------------------------------------------------ 3D DICOM


def _build_ct(root: Path, marks: _Marks, cases: list[Case]) -> Path:
    data = root / "ct"
    rows = []

    def series(cid: str, cls: str, code: str | None, **kw: Any) -> Path:
        uid = marks.uid(f"StudyInstanceUID of CT case {cid}")
        folder = data / cid
        write_series(
            folder,
            n=kw.pop("n", 6),
            study_uid=uid,
            patient_id=f"{MARK}C{len(rows):03d}",
            description=marks.text(f"CT SeriesDescription, case {cid}"),
            **kw,
        )
        rows.append([uid, "pos" if len(rows) % 2 else "neg"])
        cases.append(
            Case(
                f"ct-{cid}",
                cls,
                "dicom",
                "ingest-ct",
                Expect("accepted") if code is None else Expect("reject", code),
                folder,
                uid,
            )
        )
        return folder

    series("good-a", "good", None)
    series("good-b", "good", None)
    f = series("one-undecodable-slice", "accepted", "undecodable", names="ordered")
    bad = write_series(root / ".tmp-undec", n=6, undecodable=True)[2]
    victim = sorted(f.iterdir())[2]
    ds, src = pydicom.dcmread(str(victim)), pydicom.dcmread(str(bad))
    ds.file_meta.TransferSyntaxUID = src.file_meta.TransferSyntaxUID
    ds.PixelData = src.PixelData
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(str(victim), enforce_file_format=True)
    f = series("one-nan-slope-slice", "accepted", "nonfinite_pixels", names="ordered")
    set_dicom_attrs(sorted(f.iterdir())[1], RescaleSlope="NaN")
    series("slope-zero", "accepted", "constant_image", slope=0.0)
    pos = [[0.0, 0.0, 2.0 * k] for k in range(6)]
    series("missing-slices", "silent", "missing_slices", positions=[*pos[:3], *pos[4:], [0.0, 0.0, 14.0]])
    series("duplicate-position", "silent", "duplicate_position", positions=[*pos[:5], pos[4]])
    series("gantry-tilt", "silent", "gantry_tilt", tilt_deg=12.0)
    # Two orientations in one series are two stacks (a 3-plane localizer is one series): the first is chosen, the
    # other is listed in series_selection.csv with why it lost. Not a reject.
    series(
        "two-orientations-split",
        "good",
        None,
        orientations=[(1, 0, 0, 0, 1, 0)] * 3 + [(1, 0, 0, 0, 0, -1)] * 3,
    )
    series("uneven-spacing", "silent", "uneven_spacing", positions=[[0.0, 0.0, z] for z in (0, 2, 4, 6.8, 8.8, 10.8)])
    series("missing-position", "silent", "missing_position", positions=[*pos[:3], None, *pos[4:]])
    series(
        "mixed-pixel-spacing",
        "silent",
        "inconsistent_pixel_spacing",
        pixel_spacings=[(0.8, 0.8)] * 3 + [(0.5, 0.5)] * 3,
    )
    series("only-localizer", "silent", "no_series_selected", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    uid = marks.uid("StudyInstanceUID of CT case multiframe-no-geometry")
    p = write_multiframe(
        data / "multiframe-no-geometry" / "MF.dcm", geometry=False, study_uid=uid, patient_id=f"{MARK}C{len(rows):03d}"
    )
    rows.append([uid, "neg"])
    cases.append(
        Case(
            "ct-multiframe-no-geometry",
            "silent",
            "dicom",
            "ingest-ct",
            Expect("reject", "multiframe_no_geometry"),
            p.parent,
            uid,
        )
    )
    import shutil

    shutil.rmtree(root / ".tmp-undec")
    write_labels(root / "ct_labels.csv", ["StudyInstanceUID", "label"], rows)
    return write_spec(
        root / "ct.yaml",
        spec_dict(
            "adv-ct",
            "dicom",
            3,
            "ct",
            labels="ct_labels.csv",
            series={"modality": ["CT"], "description_exclude": ["(?i)scout"]},
        ),
    )


# ------------------------------------------------------------------------------------------------ NIfTI


def _nifti_volumes(folder: Path, marks: _Marks, dims: int = 3) -> list[tuple[str, str, str | None, Path]]:
    """(case id, class, expected code, path) for each hostile NIfTI, written under folder."""
    rng = np.random.default_rng(3)
    shape = (12, 12, 6) if dims == 3 else (16, 16)
    sp = (2.0, 2.0, 3.0)[:dims]
    out: list[tuple[str, str, str | None, Path]] = []

    def add(cid: str, cls: str, code: str | None, p: Path) -> None:
        out.append((cid, cls, code, p))

    good = rng.normal(0, 1, shape).astype(np.float32)
    add("good", "good", None, write_nifti(folder / f"sub-{MARK}{marks.n + 1:04d}" / "good.nii.gz", good, spacing=sp))
    marks.where[f"{MARK}{marks.n + 1:04d}"] = f"NIfTI subject folder ({dims}D)"
    marks.n += 1
    add(
        "zero-size-axis",
        "crash",
        "too_small",
        write_nifti_raw(folder / "zero.nii.gz", np.zeros((*shape[:-1], 0), np.float32)),
    )
    rgb = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    add("rgb24", "crash", "unsupported_dtype", write_nifti_raw(folder / "rgb.nii.gz", rgb))
    add(
        "constant",
        "accepted",
        "constant_image",
        write_nifti(folder / "const.nii.gz", np.full(shape, 3.0, np.float32), spacing=sp),
    )
    cplx = (rng.random(shape) + 1j * rng.random(shape)).astype(np.complex64)
    add("complex64", "accepted", "complex_data", write_nifti_raw(folder / "cplx.nii.gz", cplx))
    v = good.copy()
    v.flat[5] = np.nan
    add("nan-voxel", "accepted", "nonfinite_pixels", write_nifti(folder / "nan.nii.gz", v, spacing=sp))
    v = good.copy()
    v.flat[9] = np.inf
    add("inf-voxel", "accepted", "nonfinite_pixels", write_nifti(folder / "inf.nii.gz", v, spacing=sp))
    if dims == 3:
        add(
            "one-voxel-plane",
            "accepted",
            "too_small",
            write_nifti(folder / "thin.nii.gz", rng.random((1, 12, 6), dtype=np.float32), spacing=sp),
        )
        add(
            "4d",
            "silent",
            "wrong_dims",
            write_nifti(folder / "fourd.nii.gz", rng.random((8, 8, 4, 3), dtype=np.float32), spacing=sp),
        )
        import nibabel as nib

        # A zero third column (and voxel size): nibabel cannot write such an affine, so edit a valid header.
        p = write_nifti(folder / "singular.nii.gz", good, spacing=sp)
        img = nib.load(str(p))
        hdr = img.header.copy()
        hdr["srow_z"] = [0.0, 0.0, 0.0, 0.0]
        hdr["qform_code"] = 0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), str(p))
        add("singular-affine", "silent", "bad_affine", p)
        p = write_nifti(folder / "qs.nii.gz", good, spacing=sp)
        img = nib.load(str(p))
        shifted = img.affine.copy()
        shifted[:3, 3] += 25.0
        img.header.set_sform(shifted, code=1)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, img.header), str(p))
        add("qform-sform-mismatch", "silent", "qform_sform_mismatch", p)
    p = write_nifti(folder / "cut.nii.gz", good, spacing=sp)
    _cut(p, len(p.read_bytes()) // 2)
    add("cut-gzip", "silent", "truncated", p)
    p = folder / "fake.nii.gz"
    p.write_bytes(gzip.compress(f"not an image: {marks.text('text inside a fake NIfTI')}".encode()))
    add("not-nifti", "silent", "not_nifti", p)
    return out


def _build_nii(root: Path, marks: _Marks, cases: list[Case]) -> Path:
    data = root / "nii"
    rows = []
    for k, (cid, cls, code, p) in enumerate(_nifti_volumes(data, marks)):
        rel = p.relative_to(data).as_posix()
        rows.append([rel, CLASSES[k % 2], marks.text(f"NIfTI labels patient, case {cid}"), marks.text("NIfTI note")])
        cases.append(
            Case(
                f"nii-{cid}",
                cls,
                "nifti",
                "ingest-nii",
                Expect("accepted") if code is None else Expect("reject", code),
                p,
            )
        )
    # a second good volume, so the tiny dataset has two usable studies
    p = write_nifti(data / "good2.nii.gz", np.random.default_rng(5).normal(0, 1, (12, 12, 6)).astype(np.float32))
    rows.append(["good2.nii.gz", "pos", "SUBJ2", ""])
    write_labels(root / "nii_labels.csv", ["path", "label", "patient", "note"], rows)
    return write_spec(
        root / "nii.yaml", spec_dict("adv-nii", "nifti", 3, "nii", labels="nii_labels.csv", patient="patient")
    )


# ------------------------------------------------------------------------------------------------ predict


def _build_predict(root: Path, us: Path, marks: _Marks, cases: list[Case]) -> list[Path]:
    rng = np.random.default_rng(11)
    folder = root / "incoming" / f"{MARK}{marks.n + 1:04d}_Smith^Anna"
    marks.where[f"{MARK}{marks.n + 1:04d}"] = "predict input folder name"
    marks.n += 1
    inputs: list[Path] = []

    def add(cid: str, cls: str, code: str | None, p: Path, fmt: str = "dicom") -> None:
        inputs.append(p)
        cases.append(
            Case(
                f"predict-{cid}",
                cls,
                fmt,
                "predict",
                Expect("accepted") if code is None else Expect("predict_error", code),
                p,
            )
        )

    good_study = next(p for p in sorted(us.iterdir()) if p.name != "None" and p.name != "bad").iterdir()
    add("good-study-folder", "good", None, next(good_study))
    add(
        "good-file",
        "good",
        None,
        write_image2d(
            folder / f"{marks.text('predict file name')}.dcm",
            _class_image(rng, True),
            patient_name=marks.value("PatientName", "predict PatientName"),
            patient_id=marks.value("PatientID", "predict PatientID"),
            pixel_spacing=(0.5, 0.5),
        ),
    )
    add("missing-path", "silent", "not_found", folder / f"{marks.text('missing predict path')}.dcm", "path")
    add(
        "slope-1e38",
        "accepted",
        "nonfinite_pixels",
        write_image2d(folder / "huge.dcm", _class_image(rng, False), RescaleSlope="1e38"),
    )
    add(
        "strip-1x4096",
        "crash",
        "too_small",
        write_image2d(folder / "strip.dcm", np.arange(4096, dtype=np.uint16).reshape(1, 4096) % 251),
    )
    add("slope-zero", "accepted", "constant_image", write_image2d(folder / "flat.dcm", RescaleSlope="0"))
    p = folder / "report.dcm"
    p.write_text("not an image")
    add("text-file", "silent", "not_dicom", p)
    p = _cut(write_image2d(folder / "cut.dcm"), 300)
    add("cut-header", "silent", "truncated", p)
    p = folder / "gone.dcm"
    os.symlink(root / "nowhere.dcm", p)
    add("dangling-link", "silent", "not_found", p, "path")
    for cid, cls, code, q in _nifti_volumes(folder / "nii2d", marks, dims=2):
        add(f"nifti2d-{cid}", cls, code, q, "nifti")
    vol = write_nifti(folder / "vol3d.nii.gz", rng.random((8, 8, 8), dtype=np.float32))
    add("nifti-3d-to-2d-model", "silent", "wrong_dims", vol, "nifti")
    csv = folder / "list.csv"
    csv.write_text(f"file,who\n{folder / 'huge.dcm'},{marks.text('CSV column without path header')}\n")
    add("csv-without-path-column", "silent", "no_path_column", csv, "labels")
    return inputs


# ------------------------------------------------------------------------------------------------ specs (CLI)


def _build_specs(root: Path, marks: _Marks, cases: list[Case]) -> None:
    sdir = root / "specs"
    base = spec_dict("adv-spec", "dicom", 2, "../us", labels="../labels.csv", series={"modality": ["US"]})

    def add(cid: str, cls: str, path: Path, match: str, rc: int = 2, cmd: str = "check-spec") -> None:
        cases.append(
            Case(
                f"spec-{cid}", cls, "spec", "cli", Expect("cli_error", rc=rc, match=match), path, argv=[cmd, str(path)]
            )
        )

    add(
        "root-climbs-to-etc",
        "silent",
        write_spec(sdir / "etc.yaml", {**base, "source": {"kind": "dicom", "root": "../../../../etc"}}),
        r"source\.root.*climbs 4 folders",
    )
    add(
        "brackets-in-path",
        "crash",
        write_spec(sdir / "odd[/]name" / "spec.yaml", {**base, "classes": ["a"]}),
        r"\[/\].*classes.*\[normal, pneumonia\]",
    )
    p = sdir / "yaml-error.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"name: adv\nsource: {{kind: dicom, root: /data/{marks.text('path on a YAML error line')}: x\n")
    add("yaml-error-quotes-no-line", "phi", p, r"not valid YAML at line \d+")
    p = sdir / "latin1.yaml"
    p.write_bytes("name: adv\n# Ärztin Müller\n".encode("latin-1"))
    add("not-utf8", "crash", p, r"not UTF-8")
    add(
        "positive-class-not-a-class",
        "silent",
        write_spec(sdir / "pos.yaml", {**base, "positive_class": "malignant"}),
        r"field 'positive_class' \(with 'classes'\).*not one of the classes",
    )
    rootfile = sdir / "root-is-file.yaml"
    write_spec(rootfile, {**base, "source": {"kind": "dicom", "root": "../labels.csv"}})
    add("root-is-a-file", "silent", rootfile, r"source\.root: .* is a file")
    add(
        "root-missing",
        "silent",
        write_spec(sdir / "nofolder.yaml", {**base, "source": {"kind": "dicom", "root": "../nothing"}}),
        r"does not exist",
    )
    p = sdir / "list.yaml"
    p.write_text("- name: adv\n")
    add("top-level-list", "silent", p, r"expected a mapping")
    add("unknown-field", "silent", write_spec(sdir / "extra.yaml", {**base, "lables": {"csv": "x"}}), r"field 'lables'")
    add(
        "fractions-not-summing",
        "silent",
        write_spec(sdir / "fr.yaml", {**base, "split": {"fractions": {"train": 0.9, "val": 0.2, "test": 0.2}}}),
        r"field 'split\.fractions'.*sum to 1",
    )
    add("ingest-root-climbs", "silent", sdir / "etc.yaml", r"climbs", cmd="ingest")


def build_corpus(root: Path) -> Corpus:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marks = _Marks()
    cases: list[Case] = []
    us, rows = _build_2d(root, marks, cases)
    _labels_cases(root, rows, marks, cases)
    spec_2d = write_spec(
        root / "us.yaml",
        spec_dict(
            "adv-us",
            "dicom",
            2,
            "us",
            classes=CLASSES,
            series={"modality": ["US"], "description_exclude": ["(?i)localizer"]},
        ),
    )
    spec_ct = _build_ct(root, marks, cases)
    spec_nii = _build_nii(root, marks, cases)
    inputs = _build_predict(root, us, marks, cases)
    _build_specs(root, marks, cases)
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    ws = root / "ws"
    ws.mkdir(exist_ok=True)
    return Corpus(root, cases, dict(marks.where), spec_2d, spec_ct, spec_nii, inputs, ws)

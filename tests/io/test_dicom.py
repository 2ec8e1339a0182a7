"""medxfer.io.dicom: header scan, grouping, series rules, geometry reason codes, read_series."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import (
    AXIAL,
    CR_IMAGE,
    write_image2d,
    write_multiframe,
    write_series,
)
from medxfer.config.spec import SeriesRules
from medxfer.io import dicom
from medxfer.io.phi import Pseudonymizer
from pydicom.data import get_testdata_file

PSEUDO = Pseudonymizer(b"k" * 32, remember=False)


def headers(paths: list[Path]) -> list[dicom.Header]:
    return dicom.scan_headers([str(p) for p in paths], PSEUDO, workers=2)


def only_study(paths: list[Path]) -> list[dicom.Header]:
    studies = dicom.group_by_study(headers(paths))
    assert len(studies) == 1
    return next(iter(studies.values()))


def chosen_geometry(paths: list[Path], dims: int = 3, rules: SeriesRules | None = None) -> dicom.Geometry:
    cands = dicom.candidates(only_study(paths), dims)
    pick, _ = dicom.select_series(cands, rules or SeriesRules(), dims)
    assert pick is not None
    return dicom.check_geometry(pick, dims, tolerance=0.1)


def geometry_code(paths: list[Path], dims: int = 3) -> str:
    with pytest.raises(dicom.GeometryError) as exc:
        chosen_geometry(paths, dims)
    return exc.value.code


# -- file-level reasons -------------------------------------------------------------------------


def test_not_dicom_empty_and_unreadable_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("scan report\n" * 20)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    binary = tmp_path / "blob"
    binary.write_bytes(np.random.default_rng(0).bytes(4000))
    hs = headers([text, empty, binary])
    assert [h.error for h in hs] == ["not_dicom", "not_dicom", "not_dicom"]


def test_truncated_pixel_data_and_truncated_header(tmp_path):
    [p] = write_series(tmp_path / "s", n=1)
    data = p.read_bytes()
    cut_pixels = tmp_path / "cut_pixels"
    cut_pixels.write_bytes(data[:-100])
    cut_header = tmp_path / "cut_header"
    cut_header.write_bytes(data[:300])
    hs = headers([p, cut_pixels, cut_header])
    assert hs[0].error is None
    assert hs[1].error == "truncated"
    assert hs[2].error in ("truncated", "missing_tags", "no_pixel_data")


def test_truncated_encapsulated_pixel_data(tmp_path):
    src = Path(get_testdata_file("MR_small_jp2klossless.dcm"))
    cut = tmp_path / "jp2k_cut"
    cut.write_bytes(src.read_bytes()[:3000])  # inside the JPEG 2000 fragment
    ok, bad = headers([src, cut])
    assert ok.error is None and bad.error == "truncated"


def test_object_without_pixels_and_missing_tags(tmp_path):
    [p] = write_series(tmp_path / "s", n=1)
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix")
    ds = pydicom.dcmread(p)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "nouid")
    hs = headers([tmp_path / "nopix", tmp_path / "nouid"])
    assert [h.error for h in hs] == ["no_pixel_data", "missing_tags"]
    assert "SeriesInstanceUID" in hs[1].message


def test_headers_hold_pseudonyms_not_identifiers(tmp_path):
    paths = write_series(
        tmp_path / "s", n=2, patient_id="SECRET-PID", patient_name="SECRET^NAME", InstitutionName="SECRET HOSPITAL"
    )
    h = headers(paths)[0]
    blob = repr(h.to_dict())
    assert "SECRET" not in blob
    assert h.patient.startswith("pt-") and h.study.startswith("st-") and h.series.startswith("se-")
    # The cache record leaves the free-text SeriesDescription out; it is read again from the file on demand.
    rec = json.loads(json.dumps(h.to_record()))  # as ScanCache stores and reads it
    assert "SECRET" not in repr(rec) and "AX" not in rec
    back = dicom.Header.from_record(h.path, rec)
    assert "description" not in h.to_dict() and "description" not in dicom.RECORD_FIELDS and back.description is None
    assert back.series_description() == h.description == "AX" and back == h


# -- grouping and series rules ------------------------------------------------------------------


def test_localizer_and_two_candidates_prefer_rule_and_reasons(tmp_path):
    study = pydicom.uid.generate_uid()
    loc = write_series(
        tmp_path / "loc",
        n=3,
        study_uid=study,
        series_number=1,
        description="SCOUT",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    thin = write_series(tmp_path / "thin", n=8, study_uid=study, series_number=2, description="AX 1mm")
    thick = write_series(tmp_path / "thick", n=4, study_uid=study, series_number=3, description="AX 5mm SOFT")
    hs = only_study(loc + thin + thick)
    cands = dicom.candidates(hs, 3)
    assert len(cands) == 3
    # Default: most slices wins.
    pick, lost = dicom.select_series(cands, SeriesRules(), 3)
    assert pick.n_slices == 8
    assert sorted(n.code for n in lost) == ["image_type", "preference"]
    assert "LOCALIZER" in next(n.message for n in lost if n.code == "image_type")
    # A prefer rule overrides size; an exclude rule removes a series with its own reason.
    pick, lost = dicom.select_series(cands, SeriesRules(prefer=["(?i)soft"]), 3)
    assert pick.n_slices == 4
    pick, lost = dicom.select_series(cands, SeriesRules(description_exclude=["(?i)1mm"]), 3)
    assert pick.n_slices == 4 and "description_exclude" in {n.code for n in lost}
    pick, lost = dicom.select_series(cands, SeriesRules(min_slices=10), 3)
    assert pick is None and {n.code for n in lost} == {"image_type", "min_slices"}
    pick, lost = dicom.select_series(cands, SeriesRules(modality=["MR"]), 3)
    assert pick is None and {n.code for n in lost} == {"modality"}
    pick, _ = dicom.select_series(cands, SeriesRules(description_include=["(?i)5mm"]), 3)
    assert pick.n_slices == 4


def test_series_split_by_orientation_size_and_frame_of_reference(tmp_path):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ax = write_series(tmp_path / "ax", n=5, study_uid=study, series_uid=series)
    sag = write_series(tmp_path / "sag", n=4, study_uid=study, series_uid=series, orientation=(0, 1, 0, 0, 0, -1))
    big = write_series(tmp_path / "big", n=3, study_uid=study, series_uid=series, rows=20, cols=20)
    other_for = write_series(tmp_path / "for", n=2, study_uid=study, series_uid=series)
    cands = dicom.candidates(only_study(ax + sag + big + other_for), 3)
    assert sorted(c.n_slices for c in cands) == [2, 3, 4, 5]
    assert all("#" in c.key for c in cands)


def test_2d_spec_each_instance_is_a_candidate_volume_is_not(tmp_path):
    study = pydicom.uid.generate_uid()
    pa = write_image2d(
        tmp_path / "pa",
        modality="CR",
        sop_class=CR_IMAGE,
        study_uid=study,
        instance_number=1,
        description="PA",
        pixel_spacing=(0.2, 0.2),
    )
    lat = write_image2d(
        tmp_path / "lat", modality="CR", sop_class=CR_IMAGE, study_uid=study, instance_number=2, description="LAT"
    )
    cands = dicom.candidates(only_study([pa, lat]), 2)
    assert len(cands) == 2 and all(c.single for c in cands)
    pick, lost = dicom.select_series(cands, SeriesRules(prefer=["LAT"]), 2)
    assert pick.description == "LAT" and lost[0].code == "preference"
    geom = dicom.check_geometry(next(c for c in cands if c.description == "PA"), 2, 0.1)
    assert geom.shape == [16, 16] and geom.spacing == [0.2, 0.2] and geom.orientation == "unknown"
    vol = write_series(tmp_path / "ct", n=4)
    [c] = dicom.candidates(only_study(vol), 2)
    assert dicom.select_series([c], SeriesRules(), 2)[1][0].code == "dims"


# -- geometry -----------------------------------------------------------------------------------


def test_slices_sorted_by_position_not_instance_number_and_affine(tmp_path):
    paths = write_series(tmp_path / "s", n=7, spacing=2.5, pixel_spacing=(0.8, 0.6), slope=2.0, intercept=-1000)
    geom = chosen_geometry(paths)
    assert geom.shape == [7, 16, 16]
    assert geom.spacing == pytest.approx([2.5, 0.8, 0.6])
    assert geom.orientation == "SPL"  # slices inferior->superior, rows anterior->posterior, cols right->left
    arr, aff = dicom.read_series([str(p) for p in reversed(geom.files)])  # order of the argument is irrelevant
    assert arr.dtype == np.float32 and arr.shape == (7, 16, 16)
    # Stored value of slice k is 100 + 10k (+ <7 gradient); rescale 2x - 1000.
    assert np.allclose(arr[:, 0, 0], [2 * (100 + 10 * k) - 1000 for k in range(7)])
    # Voxel (k, r, c) -> RAS: x = -(origin_x + c*0.6), y = -(origin_y + r*0.8), z = origin_z + 2.5k.
    assert np.allclose(aff @ [3, 2, 1, 1], [-(-10 + 0.6), -(-20 + 1.6), 30 + 7.5, 1])


def test_oblique_stack_sorted_along_its_normal(tmp_path):
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    orient = (1.0, 0.0, 0.0, 0.0, c, -s)
    paths = write_series(tmp_path / "s", n=5, orientation=orient, spacing=3.0)
    geom = chosen_geometry(paths)
    assert geom.spacing[0] == pytest.approx(3.0)
    arr, _ = dicom.read_series(geom.files)
    assert list(arr[:, 0, 0]) == sorted(arr[:, 0, 0])


@pytest.mark.parametrize(
    "case, code",
    [
        ("missing", "missing_position"),
        ("duplicate", "duplicate_position"),
        ("gap", "missing_slices"),
        ("uneven", "uneven_spacing"),
        ("tilt", "gantry_tilt"),
        ("mixed_orientation", "mixed_orientation"),
        ("pixel_spacing", "inconsistent_pixel_spacing"),
    ],
)
def test_geometry_reason_codes(tmp_path, case, code):
    z = lambda zs: [[0.0, 0.0, float(v)] for v in zs]  # noqa: E731
    kwargs = {
        "missing": {"positions": [*z([0, 2, 4]), None, *z([8, 10])]},
        "duplicate": {"positions": z([0, 2, 4, 4, 6, 8])},
        "gap": {"positions": z([0, 2, 4, 8, 10, 12])},
        "uneven": {"positions": z([0, 2, 4.4, 6, 8, 10])},
        "tilt": {"tilt_deg": 15.0},
        "mixed_orientation": {"orientations": [AXIAL] * 5 + [(1.0, 0.0, 0.0, 0.0, 0.999, 0.0447)]},
        "pixel_spacing": {"pixel_spacings": [(0.8, 0.8)] * 5 + [(0.9, 0.9)]},
    }[case]
    paths = write_series(tmp_path / case, n=6, **kwargs)
    assert geometry_code(paths) == code


def test_uneven_spacing_within_tolerance_is_accepted(tmp_path):
    z = [[0.0, 0.0, v] for v in (0, 2, 4.1, 6, 8, 10)]
    paths = write_series(tmp_path / "s", n=6, positions=z)
    assert chosen_geometry(paths).n_slices == 6


def test_multiframe_with_and_without_geometry(tmp_path):
    good = write_multiframe(tmp_path / "enh", n_frames=5)
    geom = chosen_geometry([good])
    assert geom.shape == [5, 12, 12] and geom.spacing[0] == pytest.approx(2.5)
    arr, aff = dicom.read_series([str(good)])
    assert arr.shape == (5, 12, 12)
    assert np.allclose(arr[:, 0, 0], [100 + 10 * k - 1000 for k in range(5)])  # sorted, rescaled per FG
    assert np.allclose(aff[:3, 0], [0, 0, 2.5])
    bare = write_multiframe(tmp_path / "bare", n_frames=5, geometry=False)
    assert geometry_code([bare]) == "multiframe_no_geometry"


def test_undecodable_pixel_data(tmp_path):
    paths = write_series(tmp_path / "s", n=3, undecodable=True)
    geom = chosen_geometry(paths)  # headers are fine
    with pytest.raises(dicom.GeometryError) as exc:
        dicom.decode_check(geom.files)
    assert exc.value.code == "undecodable" and "JPEG" in exc.value.message


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_compressed_and_legacy_syntaxes_decode_like_the_reference(name):
    ref, _ = dicom.read_series([get_testdata_file("MR_small.dcm")])
    arr, _ = dicom.read_series([get_testdata_file(name)])
    assert arr.shape == (64, 64) and np.array_equal(arr, ref)


def test_rgb_to_gray_and_monochrome1_inverted(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    p = write_image2d(tmp_path / "rgb", rgb, modality="OT")
    arr, _ = dicom.read_series([str(p)])
    assert arr.shape == (8, 8) and np.allclose(arr, 0.299 * 100 + 0.587 * 200, atol=0.01)
    mono1 = np.array([[0, 50], [100, 200]], np.uint8)
    p = write_image2d(tmp_path / "m1", mono1, modality="CR", sop_class=CR_IMAGE, photometric="MONOCHROME1")
    arr, _ = dicom.read_series([str(p)])
    assert np.array_equal(arr, 200 - mono1.astype(np.float32))


def test_ultrasound_region_calibration_gives_spacing(tmp_path):
    p = write_image2d(tmp_path / "us", SequenceOfUltrasoundRegions=dicom.ultrasound_regions((16, 16), delta_cm=0.02))
    [c] = dicom.candidates(only_study([p]), 2)
    assert dicom.check_geometry(c, 2, 0.1).spacing == pytest.approx([0.2, 0.2])


def test_real_ge_mr_series(shared_data):
    files = sorted(str(p) for p in (shared_data / "dicom" / "ge_mr_t1_mprage").iterdir())
    hs = dicom.scan_headers(files, PSEUDO)
    [study] = dicom.group_by_study(hs).values()
    pick, lost = dicom.select_series(dicom.candidates(study, 3), SeriesRules(), 3)
    geom = dicom.check_geometry(pick, 3, 0.1)
    assert geom.shape == [130, 256, 256] and geom.spacing[0] == pytest.approx(1.2, abs=1e-3)
    arr, aff = dicom.read_series(geom.files)
    assert arr.shape == (130, 256, 256)
    assert np.linalg.norm(aff[:3, 0]) == pytest.approx(1.2, abs=1e-3)


def test_real_kits_ct_duplicate_positions(shared_data):
    files = sorted(str(p) for p in (shared_data / "dicom" / "kits_ct_dupe_positions").iterdir())
    [study] = dicom.group_by_study(dicom.scan_headers(files, PSEUDO)).values()
    pick, _ = dicom.select_series(dicom.candidates(study, 3), SeriesRules(), 3)
    with pytest.raises(dicom.GeometryError) as exc:
        dicom.check_geometry(pick, 3, 0.1)
    assert exc.value.code == "duplicate_position"


# -- fast header reads --------------------------------------------------------------------------


def _norm(v):
    """Header values compared as ingest uses them: numbers as floats, text stripped, one value unwrapped."""
    if v is None:
        return None
    vals = list(v) if isinstance(v, list | tuple | pydicom.multival.MultiValue) else [v]
    out = []
    for x in vals:
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            out.append(str(x).strip())
    return out


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "CT_small.dcm",
        "ExplVR_BigEnd.dcm",
        "rtdose.dcm",
        "liver_1frame.dcm",
        "SC_rgb_small_odd_big_endian.dcm",
        "image_dfl.dcm",
    ],
)
def test_raw_header_values_match_pydicom(name):
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    ref = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    for kw in dicom._RAW:
        assert _norm(dicom._raw(ds, kw)) == _norm(dicom._get(ref, kw)), kw


def test_header_scan_in_processes_matches_threads(tmp_path, monkeypatch):
    paths = [str(p) for p in write_series(tmp_path / "a", n=5) + write_series(tmp_path / "b", n=4, modality="MR")]
    paths.append(str(tmp_path / "junk"))
    (tmp_path / "junk").write_bytes(b"not dicom at all")
    threads = Pseudonymizer(b"k" * 32)
    want = dicom.scan_headers(paths, threads, workers=1)
    monkeypatch.setattr(dicom, "_PROCESS_MIN_FILES", 1)
    monkeypatch.setattr(dicom, "_cpus", lambda: 2)
    procs = Pseudonymizer(b"k" * 32)
    forked = []
    monkeypatch.setattr(dicom, "_scan_forked", lambda *a, _f=dicom._scan_forked: forked.append(1) or _f(*a))
    got = dicom.scan_headers(paths, procs, workers=2)  # explicit workers: forks whatever the machine's load
    assert forked
    assert [h.to_dict() for h in got] == [h.to_dict() for h in want]
    assert got[-1].error == "not_dicom"
    # The parent's pseudonym map learned every key the workers handed out.
    threads.write_map(tmp_path / "t.csv")
    procs.write_map(tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "t.csv").read_text()


def test_sample_pixels_first_middle_last(tmp_path):
    paths = write_series(tmp_path / "s", n=7)
    geom = chosen_geometry(paths)
    full, _ = dicom.read_series(geom.files)
    assert dicom.sample_indices(7) == [0, 3, 6] and dicom.sample_indices(1) == [0]
    assert np.array_equal(dicom.sample_pixels(geom.files), full[[0, 3, 6]])


def test_usable_cpus_counts_what_runs_now_not_the_lagging_load_average(monkeypatch):
    monkeypatch.setattr(dicom, "_cpus", lambda: 2)
    monkeypatch.setattr(dicom.os, "getloadavg", lambda: (1.8, 1.5, 1.2))  # just after a long job: idle now
    monkeypatch.setattr(dicom, "_runnable_now", lambda: 1)  # only this process runs
    assert dicom.usable_cpus() == 2
    monkeypatch.setattr(dicom, "_runnable_now", lambda: 8)  # saturated
    assert dicom.usable_cpus() == 1
    monkeypatch.setattr(dicom, "_runnable_now", lambda: None)  # no /proc: the 1-minute load decides
    assert dicom.usable_cpus() == 1
    assert dicom.usable_cpus(workers=2) == 2


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="Linux only")
def test_runnable_now_reads_the_kernels_count():
    assert dicom._runnable_now() >= 1  # this test is running

"""medxfer.io.dicom_header (the byte-level header reader) against pydicom's parse: same Header, same pixels.

Every file of pydicom's bundled test set, a demo tree, edge cases written here, and the shared GE MR and KiTS
series is read both ways (``read_header(..., fast=False)`` is pydicom only); wherever both succeed the Header
values must be identical, and files the fast reader does not understand must fall back, never differ. The
native pixel path (``sample_pixels``' per-slice check) is held to pydicom's ``pixel_array`` bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import write_image2d, write_multiframe, write_series
from medxfer.io import dicom, dicom_header
from medxfer.io.phi import Pseudonymizer
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

PSEUDO = Pseudonymizer(b"k" * 32, remember=False)
_PYDICOM_DATA = Path(pydicom.__file__).parent / "data"


def _record(h: dicom.Header) -> dict:
    d = h.to_dict()
    d.pop("fallback")
    d["description"] = h.description
    return d


def compare(paths: list[str]) -> dict[str, int]:
    """Both readers over ``paths``; asserts identical Headers and pixels. Returns the path counts."""
    counts = {"files": 0, "fast": 0, "fallback": 0, "fast_pixels": 0}
    diffs = []
    for p in paths:
        slow, fast = dicom.read_header(p, PSEUDO, fast=False), dicom.read_header(p, PSEUDO)
        counts["files"] += 1
        counts["fallback" if fast.fallback else "fast"] += 1
        a, b = _record(slow), _record(fast)
        if a != b:
            diffs.append((os.path.basename(p), {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}))
        native = dicom_header.read_native_pixels(p)
        if native is None:
            continue
        counts["fast_pixels"] += 1
        layout, raw = native
        want = dicom._pixels(dicom._read(p))
        got = dicom._finish_pixels(layout["values"], raw)
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), os.path.basename(p)
        stats = dicom._native_stats(layout["values"], raw)
        if stats is not None:
            assert _same_stats(stats, dicom._slice_stats(want)), os.path.basename(p)
        if fast.pixels is not None:  # the scan's layout reads the same values as a fresh parse
            again = dicom_header.read_layout_pixels(p, fast.pixels, fast.size, fast.mtime_ns)
            assert again is not None and np.array_equal(again, raw)
    assert not diffs, diffs[:5]
    return counts


def _same_stats(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a[2:], b[2:], strict=True)
    )


def _report(name: str, counts: dict[str, int]) -> None:
    # Shown with -s / in the CI log: how much of each set the byte-level reader took.
    print(f"\n{name}: {json.dumps(counts)}")


# -- the corpora ---------------------------------------------------------------------------------------------------


def test_pydicom_test_files():
    # Only what the wheel bundles (no download): files under pydicom/data, with its character-set files.
    found = get_testdata_files() + get_charset_files()
    paths = [p for p in found if os.path.isfile(p) and Path(p).is_relative_to(_PYDICOM_DATA)]
    assert len(paths) > 150
    counts = compare(paths)
    _report("pydicom test files", counts)
    # Explicit/implicit little endian with sane VRs go fast; big endian, deflated, no preamble, UN-encoded
    # tags and every file that is refused (most of this set is broken on purpose: 62 are cut short) go to
    # pydicom: 87 of 194 (176 test files, 18 character-set files) fast with pydicom 3.0.2.
    assert counts["fast"] >= 60 and counts["fast_pixels"] >= 20


def test_demo_tree(tmp_path):
    from medxfer.demo import write_breast

    write_breast(tmp_path, limit=40)
    paths = sorted(str(p) for p in (tmp_path / "dicom").rglob("*") if p.is_file())
    assert len(paths) >= 40
    counts = compare(paths)
    _report("demo tree (BreastMNIST, 40)", counts)
    assert counts["fallback"] == 0 and counts["fast_pixels"] == counts["files"]


@pytest.mark.parametrize("name", ["ge_mr_t1_mprage", "kits_ct_dupe_positions"])
def test_shared_series(shared_data, name):
    folder = shared_data / "dicom" / name
    paths = sorted(str(p) for p in folder.iterdir() if p.is_file())
    counts = compare(paths)
    _report(name, counts)
    assert counts["fallback"] == 0 and counts["fast_pixels"] == counts["files"]


# -- edge cases written here ---------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, implicit: bool | None = None, **attrs) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(dst, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(dst, enforce_file_format=True)
    return dst


def test_edge_cases_match_pydicom(tmp_path):
    series = write_series(tmp_path / "s", n=3, rows=8, cols=8)
    src = series[0]
    rng = np.random.default_rng(0)
    signed = rng.integers(-2048, 2047, size=(8, 8)).astype(np.int16)
    cases = [
        _rewrite(src, tmp_path / "implicit.dcm", implicit=True),
        _rewrite(src, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1"),
        _rewrite(src, tmp_path / "neg_slope.dcm", RescaleSlope=-2.5, RescaleIntercept=7),
        _rewrite(src, tmp_path / "nan_slope.dcm", RescaleSlope="NaN"),
        _rewrite(src, tmp_path / "huge_slope.dcm", RescaleSlope="1e38"),
        _rewrite(src, tmp_path / "zero_slope.dcm", RescaleSlope=0),
        _rewrite(src, tmp_path / "no_rescale.dcm", RescaleSlope=None, RescaleIntercept=None),
        _rewrite(src, tmp_path / "latin1.dcm", PatientID="PID-\u00e9", SpecificCharacterSet="ISO_IR 100"),
        _rewrite(src, tmp_path / "utf8.dcm", PatientID="PID-\u00fc\u4e2d", SpecificCharacterSet="ISO_IR 192"),
        _rewrite(src, tmp_path / "multi_pid.dcm", PatientID="A\\B"),
        _rewrite(src, tmp_path / "padded_desc.dcm", SeriesDescription=" T1 AX  "),
        _rewrite(src, tmp_path / "is_float.dcm", InstanceNumber="3.0", SeriesNumber=""),
        _rewrite(src, tmp_path / "no_rows.dcm", Rows=None),
    ]
    # 12 of 16 bits stored, with junk in the 4 unused bits: pydicom masks them (unsigned) or sign-extends
    # bit 11 (signed), and so must the byte path.
    junk = rng.integers(0, 16, size=(8, 8)).astype(np.uint16) << 12
    for name, rep_ in (("signed12.dcm", 1), ("unsigned12.dcm", 0)):
        ds = pydicom.dcmread(src)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, rep_
        ds.PixelData = ((signed.view(np.uint16) & 0x0FFF) | junk).tobytes()
        ds.save_as(tmp_path / name, enforce_file_format=True)
        cases.append(tmp_path / name)
    # 8-bit, odd pixel count (a padding byte follows the pixels), MONOCHROME2 US with ultrasound regions
    cases.append(write_image2d(tmp_path / "odd8.dcm", rng.integers(0, 255, size=(5, 7)).astype(np.uint8)))
    # enhanced multi-frame: geometry from the functional groups (decoded), pixels through pydicom
    cases.append(write_multiframe(tmp_path / "enhanced.dcm", n_frames=4))
    cases.append(write_multiframe(tmp_path / "enhanced_nogeo.dcm", n_frames=3, geometry=False))
    counts = compare([str(p) for p in cases])
    _report("edge cases", counts)
    fast = {Path(p).name for p in map(str, cases) if not dicom.read_header(p, PSEUDO).fallback}
    # What the byte path must take itself, not leave to pydicom:
    for name in ("implicit.dcm", "mono1.dcm", "latin1.dcm", "utf8.dcm", "signed12.dcm", "odd8.dcm", "enhanced.dcm"):
        assert name in fast, name
    # ...and what it must leave (a multi-valued PatientID is a MultiValue in pydicom; no Rows is refused).
    assert "multi_pid.dcm" not in fast and "no_rows.dcm" not in fast


def test_unsupported_encodings_fall_back(tmp_path):
    src = write_series(tmp_path / "s", n=2, rows=8, cols=8)[0]
    (tmp_path / "be.dcm").write_bytes(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes())
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    raw = src.read_bytes()
    (tmp_path / "nopreamble.dcm").write_bytes(raw[132:])
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 10])  # pixel data cut short
    (tmp_path / "odd.dcm").write_bytes(raw[:200] + b"\x09\x00\x10\x00LO\x03\x00abc" + raw[200:])
    paths = [str(tmp_path / n) for n in ("be.dcm", "deflated.dcm", "nopreamble.dcm", "cut.dcm", "odd.dcm")]
    for p in paths:
        assert dicom_header.read_header_fast(p) is None, os.path.basename(p)
    counts = compare(paths)
    assert counts["fallback"] == len(paths)
    assert dicom.read_header(str(tmp_path / "cut.dcm"), PSEUDO).error == "truncated"


def test_sample_pixels_same_with_and_without_scan_layouts(tmp_path):
    # The checks sample_pixels does from the scan's layouts and stats give the result pydicom's decode gives.
    paths = write_series(tmp_path / "s", n=7, rows=8, cols=8)
    hs = dicom.scan_headers([str(p) for p in paths], PSEUDO, workers=1)
    assert all(h.pixels is not None and h.pixel_stats is not None for h in hs)
    cand = dicom.candidates(hs, 3)[0]
    geom = dicom.check_geometry(cand, 3, tolerance=0.1)
    full = np.concatenate([dicom._pixels(dicom._read(f)) for f in geom.files])
    with_hints = dicom.sample_pixels(geom.files, cand.headers)
    assert np.array_equal(with_hints, dicom.sample_pixels(geom.files))
    assert np.array_equal(with_hints, full[dicom.sample_indices(len(geom.files))])
    # A NaN slope in one slice the scan held: refused with the same code either way.
    bad = _rewrite(paths[0], paths[0], RescaleSlope="NaN")
    hs = dicom.scan_headers([str(p) for p in paths], PSEUDO, workers=1)
    cand = dicom.candidates(hs, 3)[0]
    files = dicom.check_geometry(cand, 3, tolerance=0.1).files
    assert str(bad) in files
    for headers in (cand.headers, ()):
        with pytest.raises(dicom.GeometryError) as exc:
            dicom.sample_pixels(files, headers)
        assert exc.value.code == "nonfinite_pixels"


def test_ingest_report_counts_fallbacks(tiny_dicom2d):
    from medxfer.ingest.ingest import ingest

    first = next(p for p in sorted(tiny_dicom2d.root.rglob("*")) if p.is_file())
    ds = pydicom.dcmread(first)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(first, enforce_file_format=True)
    report = ingest(tiny_dicom2d.spec, tiny_dicom2d.workspace).report
    assert report["files"]["header_fallbacks"] == 1
    assert report["n_studies"] == 40  # the deflated file still made it, through pydicom


@pytest.mark.parametrize("dtype", ["<u1", "<i1", "<u2", "<i2", "<u4", "<i4"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_native_stats_equal_the_full_rescale(dtype, photometric):
    # The per-slice check from stored extremes is exact, not close: compare with the full float32 rescale.
    rng = np.random.default_rng(7)
    info = np.iinfo(np.dtype(dtype))
    for slope, icpt in [
        ("1", "0"),
        ("1", "-1024"),
        ("-1", "3"),
        ("2.5", "-0.25"),
        ("1e-3", "7"),
        ("3e37", "0"),
        ("0", "5"),
        ("-7e30", "-1e38"),
        ("4096", "1"),
        ("1", "1e30"),
    ]:
        arr = rng.integers(info.min, info.max, size=(1, 6, 5), endpoint=True).astype(dtype)
        values = {"PhotometricInterpretation": photometric, "RescaleSlope": slope, "RescaleIntercept": icpt}
        got = dicom._native_stats(values, arr)
        want = dicom._slice_stats(dicom._finish_pixels(values, arr))
        assert got is not None and _same_stats(got, want), (slope, icpt, got, want)
    assert dicom._native_stats({"RescaleSlope": "NaN"}, arr) is None

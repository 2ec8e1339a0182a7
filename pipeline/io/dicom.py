"""DICOM, and the only module that imports pydicom.

Ingest reads headers only, groups instances into studies and series, picks one
series per study with the spec's rules, and checks slice geometry; training and
predict read pixels through ``read_series``. Nothing here logs or raises text
that carries header values or file paths: reasons are codes plus messages built
from numbers and codes only.

Array convention: 2D (rows, cols); 3D (slices, rows, cols) with slices ordered
along the slice normal. Affines map (axis0, axis1, axis2) voxel indices to RAS+
millimetres (DICOM's LPS with x and y negated), the convention nibabel and MONAI use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pydicom
from medxfer.core import ui
from medxfer.io import checks, dicom_header
from pydicom.errors import InvalidDicomError

# pydicom reports odd values in warnings and log records that quote the value itself (a date, a
# name); those must not reach a terminal or a CI log, so they are switched off here, once.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
logging.getLogger("pydicom").propagate = False

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Orientation vectors closer than this (max abs difference of the six cosines, ~6 degrees) are one
# stack; a series that holds planes further apart is split into one candidate per plane.
_SAME_PLANE = 0.1
# Within one stack, cosines may jitter by float rounding (the GE MR in the tests differs by 6e-8);
# more than this and the slices are not parallel.
_ORIENT_TOL = 1e-3
_TILT_TOL_DEG = 0.5
_DUP_TOL_MM = 0.01
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DEFLATED = "1.2.840.10008.1.2.1.99"

_BIG_ENDIAN = "1.2.840.10008.1.2.2"

# Reason codes this module can give, with what they mean: its rows of the one table, medxfer.io.checks.REASONS
# (the pixel checks there - too_small, too_large, constant_image, nonfinite_pixels - apply here too).
REASONS = checks.reasons("dicom")


class GeometryError(checks.InputError):
    """A series that cannot be read as a consistent image; ``code`` is a key of REASONS. No PHI in the text."""


# ---------------------------------------------------------------------------------------------
# Header scan
# ---------------------------------------------------------------------------------------------


@dataclass
class Header:
    """What ingest needs from one file. Identifiers are already pseudonyms; no names, no dates."""

    path: str
    size: int
    mtime_ns: int
    error: str | None = None
    message: str | None = None
    study: str = ""  # pseudonym of StudyInstanceUID
    accession: str | None = None  # pseudonym of AccessionNumber (same key space as study keys)
    patient: str | None = None  # pseudonym of PatientID
    series: str = ""  # pseudonym of SeriesInstanceUID
    frame_of_ref: str | None = None
    modality: str = ""
    # Manufacturer (0008,0070) and ManufacturerModelName (0008,1090): device names, not PHI; evaluate's subgroups.
    manufacturer: str = ""
    manufacturer_model: str = ""
    # SeriesDescription: free text that often holds a name, so never in the scan cache (to_record leaves it out);
    # None on a header from the cache until a series rule asks for it (series_description).
    description: str | None = ""
    image_type: list[str] = field(default_factory=list)
    series_number: int | None = None
    instance_number: int | None = None
    rows: int = 0
    cols: int = 0
    n_frames: int = 1
    samples: int = 1
    orientation: list[float] | None = None
    position: list[float] | None = None
    frame_positions: list[list[float]] | None = None
    pixel_spacing: list[float] | None = None
    transfer_syntax: str = ""
    # True when the byte-level reader (medxfer.io.dicom_header) could not read the file and pydicom did;
    # ingest_report.json counts these.
    fallback: bool = False
    # Where the native pixel data lies (dicom_header.native_layout), so the pixel check reads it without a
    # second parse; not in the scan cache (to_record leaves it out).
    pixels: dict[str, Any] | None = field(default=None, compare=False)
    # (shape, finite, min, max) of the rescaled pixels when the scan already held them (a small file read
    # whole); sample_pixels checks such slices without reading them again. Not in the scan cache either.
    pixel_stats: tuple[tuple[int, ...], bool, float, float] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the free-text SeriesDescription and this run's pixel facts (``to_record`` with its keys
        and the path)."""
        # Shallow: dataclasses.asdict's deep copy cost more per file than reading the header.
        d = dict(self.__dict__)
        del d["description"]
        d.pop("pixels", None)
        d.pop("pixel_stats", None)
        return d

    def to_record(self) -> list[Any]:
        """The scan-cache record: ``to_dict`` without ``path``, as a list in ``RECORD_FIELDS`` order, so the
        cache's JSON holds no keys to write and parse (a record 17 -> 12 us to write, 11 -> 3 us to read)."""
        d = self.__dict__
        return [d[k] for k in RECORD_FIELDS]

    @classmethod
    def from_record(cls, path: str, rec: list[Any]) -> Header:
        """The header ``to_record`` gave (SeriesDescription unknown: None, read again when a rule asks)."""
        return cls(path=path, description=None, **dict(zip(RECORD_FIELDS, rec, strict=True)))

    def series_description(self) -> str:
        """SeriesDescription, read again from the file when this header came from the scan cache.

        Series rules match it by regex, so a keyed hash would not do; only the first header of each
        candidate is asked, and only by a spec with description rules: one file per series (1 of the GE MR
        series' 130), ~1 ms against ~25 ms for the whole cached re-ingest.
        """
        if self.description is None:
            self.description = read_description(self.path)
        return self.description


# The fields of a scan-cache record (Header.to_record): all but the path (the look-up key), the free-text
# SeriesDescription and the pixel facts of this run.
RECORD_FIELDS = tuple(f.name for f in fields(Header) if f.name not in ("path", "description", "pixels", "pixel_stats"))


class _Pseudo:
    """What scan needs from medxfer.io.phi.Pseudonymizer (kept structural to avoid a hard import cycle)."""

    study_key: Callable[[str], str]
    patient_key: Callable[[str], str]
    series_key: Callable[[str], str]


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    # Malformed values raise on access (e.g. an IS holding letters); treat them as absent.
    try:
        v = ds.get(keyword, default)
    except Exception:
        return default
    return default if v is None or v == "" else v


# Plain-ASCII elements ingest reads from every file, decoded straight from the raw bytes: pydicom's
# per-element conversion (hooks, value classes, keyword lookup) cost more than parsing the header.
# Text whose meaning depends on SpecificCharacterSet (PatientID, AccessionNumber, SeriesDescription)
# still goes through pydicom. Keyword -> (tag, VR, multi-valued).
_RAW = {
    "SOPClassUID": (0x00080016, "UI", False),
    "StudyInstanceUID": (0x0020000D, "UI", False),
    "SeriesInstanceUID": (0x0020000E, "UI", False),
    "FrameOfReferenceUID": (0x00200052, "UI", False),
    "Modality": (0x00080060, "CS", False),
    "ImageType": (0x00080008, "CS", True),
    "SeriesNumber": (0x00200011, "IS", False),
    "InstanceNumber": (0x00200013, "IS", False),
    "NumberOfFrames": (0x00280008, "IS", False),
    "Rows": (0x00280010, "US", False),
    "Columns": (0x00280011, "US", False),
    "SamplesPerPixel": (0x00280002, "US", False),
    "PixelSpacing": (0x00280030, "DS", True),
    "ImagerPixelSpacing": (0x00181164, "DS", True),
    "ImageOrientationPatient": (0x00200037, "DS", True),
    "ImagePositionPatient": (0x00200032, "DS", True),
}


def _raw(ds: Any, keyword: str) -> Any:
    """Value of a top-level _RAW element without pydicom's conversion; same results as ``_get`` for valid data.

    Multi-valued keywords give a list of strings (so a single "5" is never iterated as characters);
    anything unusual (already converted, an unexpected VR, odd length) falls back to ``_get``.
    """
    if isinstance(ds, dict):  # from medxfer.io.dicom_header: already in this shape
        return ds.get(keyword)
    tag, vr, multi = _RAW[keyword]
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    value, elem_vr = getattr(elem, "value", None), getattr(elem, "VR", None)
    if not isinstance(value, bytes) or elem_vr not in (None, vr) or not hasattr(elem, "is_little_endian"):
        return _get(ds, keyword)
    if vr == "US":
        if len(value) != 2:
            return _get(ds, keyword)
        return int.from_bytes(value, "little" if elem.is_little_endian else "big")
    text = value.decode("latin-1").strip(" \0")
    if not text:
        return None
    if multi:
        return [x.strip(" \0") for x in text.split("\\")]
    return text


def _floats(v: Any, n: int) -> list[float] | None:
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(map(math.isfinite, out)) else None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _fg(ds: Any, seq: str, frame: int | None = None) -> Any:
    """An item from the shared or per-frame functional groups of an enhanced object."""
    sources = []
    if frame is not None:
        per = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per is not None and frame < len(per):
            sources.append(per[frame])
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        sources.append(shared[0])
    for src in sources:
        s = _get(src, seq)
        if s:
            return s[0]
    return None


def _pixel_spacing(ds: Any) -> list[float] | None:
    ps = _floats(_raw(ds, "PixelSpacing"), 2) or _floats(_raw(ds, "ImagerPixelSpacing"), 2)
    if ps is None:
        pm = _fg(ds, "PixelMeasuresSequence", 0)
        ps = _floats(_get(pm, "PixelSpacing"), 2) if pm is not None else None
    if ps is None:
        # Ultrasound puts its calibration in the region sequence, in cm (units code 3).
        for reg in _get(ds, "SequenceOfUltrasoundRegions") or []:
            if _get(reg, "PhysicalUnitsXDirection") == 3 and _get(reg, "PhysicalUnitsYDirection") == 3:
                dx, dy = _get(reg, "PhysicalDeltaX"), _get(reg, "PhysicalDeltaY")
                if dx and dy:
                    ps = [round(abs(float(dy)) * 10.0, 6), round(abs(float(dx)) * 10.0, 6)]
                    break
    if ps is not None and min(ps) <= 0:
        return None
    return ps


def _frame_geometry(ds: Any, n_frames: int) -> tuple[list[float] | None, list[list[float]] | None]:
    orient = _floats(_get(ds, "ImageOrientationPatient"), 6)
    if orient is None:
        po = _fg(ds, "PlaneOrientationSequence", 0)
        orient = _floats(_get(po, "ImageOrientationPatient"), 6) if po is not None else None
    per = _get(ds, "PerFrameFunctionalGroupsSequence")
    if not per or len(per) < n_frames:
        return orient, None
    positions = []
    for i in range(n_frames):
        pp = _fg(ds, "PlanePositionSequence", i)
        pos = _floats(_get(pp, "ImagePositionPatient"), 3) if pp is not None else None
        if pos is None:
            return orient, None
        positions.append(pos)
    return orient, positions


def _pixel_data_truncated(fh: Any, pos: int, size: int, little: bool, implicit: bool) -> bool | None:
    """True if the pixel data element runs past the end of the file; None if there is none."""
    fh.seek(pos)
    head = fh.read(12)
    if len(head) < 8:
        return None
    group = int.from_bytes(head[0:2], "little" if little else "big")
    elem = int.from_bytes(head[2:4], "little" if little else "big")
    if (group, elem) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return None
    order = "little" if little else "big"
    if implicit:
        length, header_len = int.from_bytes(head[4:8], order), 8
    else:
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN"):
            if len(head) < 12:
                return True
            length, header_len = int.from_bytes(head[8:12], order), 12
        else:
            length, header_len = int.from_bytes(head[6:8], order), 8
    if length == 0xFFFFFFFF:
        # Encapsulated: walk the fragment items (seeking, not reading them) up to the sequence
        # delimiter; elements may follow pixel data, so "ends with the delimiter" is not a test.
        at = pos + header_len
        while True:
            fh.seek(at)
            item = fh.read(8)
            if len(item) < 8:
                return True
            if item == _SEQ_DELIM:
                return False
            if item[:4] != b"\xfe\xff\x00\xe0":
                return True
            at += 8 + int.from_bytes(item[4:8], "little")
            if at > size:
                return True
    return pos + header_len + length > size


# The only elements ingest looks at. pydicom skips every other value by seeking (nested sequences of
# defined length included) and never converts it, which is most of the cost of reading a header.
HEADER_TAGS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "AccessionNumber",
    "PatientID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "ImageType",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SequenceOfUltrasoundRegions",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)


def read_header(path: str, pseudo: _Pseudo, fast: bool = True) -> Header:
    """Header of one file, or a Header with ``error`` set to a reason code. Never raises.

    The byte-level reader (medxfer.io.dicom_header) reads every file it understands; pydicom reads the rest
    (``Header.fallback``) and every file that is refused, so reason codes come from one place. ``fast=False``:
    pydicom only (the equivalence test compares the two).
    """
    if fast:
        try:  # size and mtime from the fstat of the file it read: no stat by path (a lookup per folder level)
            raw = dicom_header.read_header_fast(path)
        except Exception:  # noqa: BLE001 - OSError or a hostile file: the pydicom path gives the reason code
            raw = None
        if raw is not None:
            h = _fill_values(
                Header(path=path, size=raw["size"], mtime_ns=raw["mtime_ns"]),
                raw["values"],
                raw["transfer_syntax"],
                pseudo,
            )
            if h.error is None:
                h.pixels = layout = dicom_header.native_layout(raw)
                arr = dicom_header.native_array(layout, raw["buffer"]) if layout is not None else None
                if arr is not None:
                    try:
                        h.pixel_stats = _native_stats(layout["values"], arr) or _slice_stats(
                            _finish_pixels(layout["values"], arr)
                        )
                    except Exception:  # noqa: BLE001 - the pixel check reads the file again and says why
                        h.pixel_stats = None
                return h
    try:
        st = os.stat(path)
    except OSError:
        return Header(path=path, size=-1, mtime_ns=-1, error="unreadable", message="file could not be opened")
    h = _read_header_pydicom(Header(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns), pseudo)
    h.fallback = fast
    return h


def _read_header_pydicom(h: Header, pseudo: _Pseudo) -> Header:
    path = h.path
    try:
        with open(path, "rb") as fh:
            preamble = fh.read(132)
            fh.seek(0)
            has_magic = len(preamble) == 132 and preamble[128:132] == b"DICM"
            if h.size == 0:
                return _fail(h, "not_dicom", "empty file")
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not has_magic, specific_tags=list(HEADER_TAGS))
            except InvalidDicomError:
                return _fail(h, "not_dicom", "not a DICOM file")
            except Exception:  # noqa: BLE001 - a hostile file: a reason code, never a traceback
                return _corrupt(h, has_magic)
            if not has_magic and not (_raw(ds, "SOPClassUID") and _raw(ds, "StudyInstanceUID")):
                return _fail(h, "not_dicom", "not a DICOM file")
            pos = fh.tell()
            at_eof = pos >= h.size
            tsyntax = str(_get(getattr(ds, "file_meta", {}), "TransferSyntaxUID", "") or "")
            implicit, little = ds.original_encoding
            # None: no pixel data element found; "unknown": deflated, where file offsets mean nothing.
            truncated: bool | None | str = "unknown"
            if tsyntax != _DEFLATED:
                truncated = _pixel_data_truncated(fh, pos, h.size, little is not False, bool(implicit))
    except OSError:
        return _fail(h, "unreadable", "file could not be read")
    except Exception:  # noqa: BLE001
        # pydicom converts elements lazily: a value whose length does not fit its VR raises on first access
        # (BytesLengthException, found by the fuzzer in tests/fuzz/regressions/dicom_header/), after dcmread.
        return _corrupt(h, has_magic)
    try:
        return _fill(h, ds, tsyntax, truncated, pseudo, at_eof)
    except Exception:  # noqa: BLE001 - the same lazy conversion, in a tag the fill reads
        return _corrupt(h, has_magic)


def _corrupt(h: Header, has_magic: bool) -> Header:
    """A file pydicom could not make sense of: cut short or corrupt when it says DICM, else not DICOM at all."""
    if has_magic:
        return _fail(h, "truncated", "DICOM header is cut short or corrupt")
    return _fail(h, "not_dicom", "not a DICOM file")


def read_description(path: str) -> str:
    """SeriesDescription of one file; "" when absent or when the file can no longer be read."""
    try:
        fast = dicom_header.read_header_fast(path)
    except OSError:
        return ""
    if fast is not None:
        return str(fast["values"].get("SeriesDescription") or "")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SeriesDescription"])
    except Exception:
        return ""
    return str(_get(ds, "SeriesDescription", "") or "")


def _fail(h: Header, code: str, message: str) -> Header:
    h.error, h.message = code, message
    return h


def _image_sop_class(ds: Any) -> bool:
    meta = getattr(ds, "file_meta", None)
    uid = _raw(ds, "SOPClassUID") or (_get(meta, "MediaStorageSOPClassUID") if meta is not None else None)
    return "Image Storage" in str(getattr(pydicom.uid.UID(str(uid)), "name", "")) if uid else False


# Shapes that passed checks.check_shape, with the size cap they passed under: a series repeats one shape in
# every file, and the check (np.prod, the environment) cost ~10% of reading a small file's header.
_SHAPES_OK: set[tuple[Any, ...]] = set()


def _check_shape(frames: int, rows: int, cols: int, samples: int) -> None:
    key = (frames, rows, cols, samples, os.environ.get(checks.MAX_DECODED_ENV))
    if key not in _SHAPES_OK:
        checks.check_shape([frames, rows, cols], samples)
        if len(_SHAPES_OK) < 4096:
            _SHAPES_OK.add(key)


def _fill(
    h: Header, ds: Any, tsyntax: str, truncated: bool | None | str, pseudo: _Pseudo, at_eof: bool = False
) -> Header:
    if truncated is True:
        return _fail(h, "truncated", "pixel data is cut short (file ends early)")
    rows, cols = _int(_raw(ds, "Rows")), _int(_raw(ds, "Columns"))
    if truncated is None:
        if tsyntax == _BIG_ENDIAN and not (rows and cols):
            # Real big-endian images parse and decode (pydicom's MR_small_bigendian); one whose elements make
            # no sense read that way is little-endian data under a big-endian claim.
            return _fail(
                h,
                "wrong_transfer_syntax",
                "the file claims Explicit VR Big Endian but its elements do not read that way (no image found); "
                "rewrite it with its real transfer syntax (e.g. dcmconv +te)",
            )
        # An image object whose file ends before Rows/Columns was cut short, not a DICOMDIR or a report (those
        # have no image SOP class); a whole header without the pixel element stays no_pixel_data.
        if at_eof and (len(ds) == 0 or (_image_sop_class(ds) and not (rows and cols))):
            return _fail(h, "truncated", "DICOM header is cut short (an image whose file ends inside its header)")
        return _fail(h, "no_pixel_data", "DICOM object without pixel data (e.g. DICOMDIR, report)")
    study_uid, series_uid = _raw(ds, "StudyInstanceUID"), _raw(ds, "SeriesInstanceUID")
    if not study_uid or not series_uid or not rows or not cols:
        missing = [
            k
            for k, v in (
                ("StudyInstanceUID", study_uid),
                ("SeriesInstanceUID", series_uid),
                ("Rows", rows),
                ("Columns", cols),
            )
            if not v
        ]
        return _fail(h, "missing_tags", "missing " + ", ".join(missing))
    try:  # before any pixel is decoded: a 1x1 or 1x4096 "image", or one that would not fit in memory
        samples = _int(_raw(ds, "SamplesPerPixel")) or 1
        _check_shape(max(_int(_raw(ds, "NumberOfFrames")) or 1, 1), rows, cols, samples)
    except checks.InputError as exc:
        return _fail(h, exc.code, exc.message)
    h.transfer_syntax = tsyntax
    h.study = pseudo.study_key(str(study_uid))
    acc = _get(ds, "AccessionNumber")
    h.accession = pseudo.study_key(str(acc)) if acc else None
    pid = _get(ds, "PatientID")
    h.patient = pseudo.patient_key(str(pid)) if pid else None
    h.series = pseudo.series_key(str(series_uid))
    frame_of_ref = _raw(ds, "FrameOfReferenceUID")
    h.frame_of_ref = pseudo.series_key("for:" + str(frame_of_ref)) if frame_of_ref else None
    h.modality = str(_raw(ds, "Modality") or "").upper()
    h.manufacturer = " ".join(str(_get(ds, "Manufacturer", "") or "").split())[:64]
    h.manufacturer_model = " ".join(str(_get(ds, "ManufacturerModelName", "") or "").split())[:64]
    h.description = str(_get(ds, "SeriesDescription", "") or "")
    it = _raw(ds, "ImageType") or []
    h.image_type = [
        str(x).upper() for x in (it if isinstance(it, (list, tuple, pydicom.multival.MultiValue)) else [it])
    ]
    h.series_number = _int(_raw(ds, "SeriesNumber"))
    h.instance_number = _int(_raw(ds, "InstanceNumber"))
    h.rows, h.cols = rows, cols
    h.n_frames = max(_int(_raw(ds, "NumberOfFrames")) or 1, 1)
    h.samples = _int(_raw(ds, "SamplesPerPixel")) or 1
    h.pixel_spacing = _pixel_spacing(ds)
    per_frame = "PerFrameFunctionalGroupsSequence" in ds if isinstance(ds, dict) else 0x52009230 in ds
    if h.n_frames > 1 or (per_frame and _get(ds, "PerFrameFunctionalGroupsSequence")):
        h.orientation, h.frame_positions = _frame_geometry(ds, h.n_frames)
        if h.frame_positions and h.n_frames == 1:
            h.position, h.frame_positions = h.frame_positions[0], None
    else:
        h.orientation = _floats(_raw(ds, "ImageOrientationPatient"), 6)
        h.position = _floats(_raw(ds, "ImagePositionPatient"), 3)
    return h


def _fill_values(h: Header, v: dict[str, Any], tsyntax: str, pseudo: _Pseudo) -> Header:
    """``_fill(h, v, tsyntax, False, pseudo)`` for the values of medxfer.io.dicom_header, whose types are known
    (US an int, UI/CS/IS/DS stripped text or None, multi-valued ones lists): the same Header without the
    per-value dispatch that a pydicom dataset needs (21 -> 13 us a file on the loaded VM, where the byte walk of a
    small file takes ~40 us). Anything unusual (a missing tag, a multi-frame or enhanced object) takes ``_fill``
    itself."""
    g = v.get
    rows, cols = g("Rows"), g("Columns")
    study_uid, series_uid = g("StudyInstanceUID"), g("SeriesInstanceUID")
    nf = g("NumberOfFrames")
    if (
        not study_uid
        or not series_uid
        or not rows
        or not cols
        or (nf is not None and nf != "1")
        or "PerFrameFunctionalGroupsSequence" in v
    ):
        return _fill(h, v, tsyntax, False, pseudo)
    samples = g("SamplesPerPixel") or 1
    try:
        _check_shape(1, rows, cols, samples)
    except checks.InputError as exc:
        return _fail(h, exc.code, exc.message)
    h.transfer_syntax = tsyntax
    h.study = pseudo.study_key(study_uid)
    acc = g("AccessionNumber")
    h.accession = pseudo.study_key(acc) if acc else None
    pid = g("PatientID")
    h.patient = pseudo.patient_key(pid) if pid else None
    h.series = pseudo.series_key(series_uid)
    frame_of_ref = g("FrameOfReferenceUID")
    h.frame_of_ref = pseudo.series_key("for:" + frame_of_ref) if frame_of_ref else None
    h.modality = (g("Modality") or "").upper()
    man, model = g("Manufacturer"), g("ManufacturerModelName")
    h.manufacturer = " ".join(man.split())[:64] if man else ""
    h.manufacturer_model = " ".join(model.split())[:64] if model else ""
    h.description = g("SeriesDescription") or ""
    h.image_type = [x.upper() for x in g("ImageType") or ()]
    h.series_number = _int(g("SeriesNumber"))
    h.instance_number = _int(g("InstanceNumber"))
    h.rows, h.cols = rows, cols
    h.samples = samples
    ps = _floats(g("PixelSpacing"), 2)  # _pixel_spacing's first answer; it alone knows the other places
    h.pixel_spacing = ps if ps is not None and min(ps) > 0 else _pixel_spacing(v)
    h.orientation = _floats(g("ImageOrientationPatient"), 6)
    h.position = _floats(g("ImagePositionPatient"), 3)
    return h


class _Recorder:
    """Pseudonymises like the real one and remembers what it was asked, so a worker process's map entries
    can be replayed into the parent's Pseudonymizer (the originals stay in memory and in the pipe).

    Each distinct original is keyed once: the slices of a series repeat the same study, series, patient and
    frame-of-reference UIDs, and the 5,000-file tree asked 25,000 HMACs for ~1,250 originals (1.2 s of the
    parent's replay, profiled).
    """

    def __init__(self, inner: _Pseudo):
        self.inner = inner
        self.memo: dict[tuple[str, str], str] = {}

    @property
    def calls(self) -> list[tuple[str, str]]:
        return list(self.memo)

    def _key(self, method: str, original: str) -> str:
        out = self.memo.get((method, original))
        if out is None:
            out = self.memo[(method, original)] = getattr(self.inner, method)(original)
        return out

    def study_key(self, original: str) -> str:
        return self._key("study_key", original)

    def patient_key(self, original: str) -> str:
        return self._key("patient_key", original)

    def series_key(self, original: str) -> str:
        return self._key("series_key", original)


def _scan_chunk(
    paths: list[str], pseudo: _Pseudo, record: Callable[[Header], Any] | None
) -> tuple[list[Header], list[tuple[str, str]], list[Any] | None]:
    rec = _Recorder(pseudo)
    headers = [read_header(p, rec) for p in paths]
    return headers, rec.calls, ([record(h) for h in headers] if record is not None else None)


# Below this many files a forked worker's start-up costs more than it saves.
_PROCESS_MIN_FILES = 400


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _runnable_now() -> int | None:
    """Tasks runnable on the machine now, this one included: the median of three reads of /proc/loadavg's
    running count 1 ms apart (Linux; None elsewhere). An idle machine reads 1, with the odd 2."""
    counts = []
    try:
        for i in range(3):
            if i:
                time.sleep(0.001)
            with open("/proc/loadavg", "rb") as f:
                counts.append(int(f.read().split()[3].split(b"/")[0]))
    except (OSError, ValueError, IndexError):
        return None
    return sorted(counts)[1]


def usable_cpus(workers: int | None = None) -> int:
    """Processes (or threads of CPU-bound work) worth running now: ``workers`` when given, else the CPUs this
    process may use less the other tasks runnable right now, at least 1.

    On a saturated machine a second process only adds its fork, copy-on-write faults and the pickling of its
    results: the 5,000-file cold ingest at load 8 on 2 cores took 2.38 s with a forked worker against 2.16 s
    without (median of 4 alternating pairs). The count is the kernel's of this moment, not the 1-minute load
    average, which lags: just after a 9-minute training run on an idle 2-core machine it still read 1.5-1.8, so
    the scan ran in one process and the 5,000-file cold ingest took 0.41-0.44 s instead of 0.34-0.38 s. Where
    there is no such count, the 1-minute load (+1: it counts this process when it has been busy).
    """
    if workers:
        return max(1, min(workers, _cpus()))
    cpus = _cpus()
    now = _runnable_now()
    if now is not None:
        return max(1, min(cpus, cpus + 1 - now))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    return max(1, min(cpus, round(cpus + 1 - load)))


def scan_headers(
    paths: list[str], pseudo: _Pseudo, workers: int | None = None, description: str = "reading DICOM headers"
) -> list[Header]:
    """Headers of many files, with a progress bar (``scan_headers_records`` without records)."""
    return scan_headers_records(paths, pseudo, workers, description)[0]


def scan_headers_records(
    paths: list[str],
    pseudo: _Pseudo,
    workers: int | None = None,
    description: str = "reading DICOM headers",
    record: Callable[[Header], Any] | None = None,
) -> tuple[list[Header], list[Any] | None]:
    """Headers of many files, and ``record(header)`` of each (None without ``record``), in the order of ``paths``.

    Parsing a header is CPU-bound Python, so threads only overlap file I/O; large trees are read by forked
    worker processes where fork is available and the machine has a spare core (``usable_cpus``). ``record`` runs
    where the header was read (ingest serialises its scan-cache entry there: 8.6 us a file that the parent no
    longer pays).
    """
    if not paths:
        return [], ([] if record is not None else None)
    # One file (a predict input) needs no pool, nor the 2 ms that usable_cpus spends reading what runs now.
    cpus = usable_cpus(workers) if len(paths) > 1 else 1
    if cpus > 1 and len(paths) >= _PROCESS_MIN_FILES and hasattr(os, "fork"):
        return _scan_forked(paths, pseudo, cpus, description, record)
    # Threads overlap only file I/O; with no spare core one thread does the same work without the pool.
    threads = max(1, workers or (min(32, (os.cpu_count() or 1) * 4) if cpus > 1 else 1))
    memo = _Recorder(pseudo)  # one HMAC per distinct original (the real one records it on first use)
    if threads == 1:
        headers = list(ui.progress((read_header(p, memo) for p in paths), total=len(paths), description=description))
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            it = ex.map(lambda p: read_header(p, memo), paths)
            headers = list(ui.progress(it, total=len(paths), description=description))
    return headers, ([record(h) for h in headers] if record is not None else None)


def _scan_forked(
    paths: list[str], pseudo: _Pseudo, cpus: int, description: str, record: Callable[[Header], Any] | None
) -> tuple[list[Header], list[Any] | None]:
    """``cpus - 1`` forked children and the parent itself take chunks from one queue until it is empty.

    The queue is a pipe holding chunk numbers (4-byte reads of a pipe are atomic), written whole and closed before
    the fork, so whoever is faster takes more chunks and nobody blocks. A child sends each chunk's results as soon
    as it has them, pickled and length-prefixed, down its own pipe, and the parent takes what has arrived between
    its own chunks: sent once at the end, the child's pickling and the parent's unpickling came after both had
    finished reading (5,000 files: 22 + 13 ms of a 164 ms scan, the parent idle meanwhile). Against a
    ProcessPoolExecutor of ``cpus`` workers with an idle parent: one process less on the cores, no pool threads or
    per-chunk calls, one fork less (a fork of a parent that has torch and pandas loaded costs ~50 ms). A child that
    dies leaves the chunks it had not sent whole to the parent, which reads them itself.
    """
    import pickle

    # ~16 chunks per process balance a loaded machine; at most 1,024 so the queue fits any pipe's buffer (4 KiB).
    size = max(16, -(-len(paths) // min(cpus * 16, 1024)))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    done: dict[int, tuple[list[Header], list[tuple[str, str]], list[Any] | None]] = {}
    q_read, q_write = os.pipe()
    queue = b"".join(i.to_bytes(4, "little") for i in range(len(chunks)))
    kids: list[tuple[int, int, bytearray]] = []
    try:
        os.set_blocking(q_write, False)
        queued = os.write(q_write, queue) == len(queue)
    except OSError:
        queued = False
    os.close(q_write)
    if not queued:  # a pipe that cannot take the queue: no children, this process reads every chunk
        os.close(q_read)
        q_read = -1
    for _ in range(cpus - 1 if queued else 0):
        r, w = os.pipe()
        with contextlib.suppress(ImportError, AttributeError, OSError):
            import fcntl

            # Linux: room for about a dozen chunks of results (157 headers pickle to ~76 KB), so a child does not
            # wait for the parent to finish its own chunk before it can send (the default 64 KiB holds less).
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            break
        if pid == 0:  # the child: never returns, never runs the parent's exit handlers
            code = 1
            try:
                os.close(r)
                while len(tok := os.read(q_read, 4)) == 4:
                    i = int.from_bytes(tok, "little")
                    msg = pickle.dumps((i, _scan_chunk(chunks[i], pseudo, record)), protocol=pickle.HIGHEST_PROTOCOL)
                    view = memoryview(len(msg).to_bytes(8, "little") + msg)
                    while view:
                        view = view[os.write(w, view) :]
                code = 0
            finally:
                os._exit(code)
        os.close(w)  # before the next fork: only the child holds the write end, so its exit ends the stream
        os.set_blocking(r, False)
        kids.append((pid, r, bytearray()))
    own: set[int] = set()  # chunks read here: their pseudonyms went into `pseudo` directly

    def arrived(kid: tuple[int, int, bytearray], wait: bool) -> Iterable[Header]:
        """The whole messages a child has sent so far (with ``wait``: until it closes its pipe)."""
        _, r, buf = kid
        if wait:
            os.set_blocking(r, True)
        while True:
            try:
                b = os.read(r, 1 << 20)
            except BlockingIOError:
                b = None
            if b:
                buf += b
            while len(buf) >= 8 and len(buf) >= 8 + (n := int.from_bytes(buf[:8], "little")):
                i, got = pickle.loads(buf[8 : 8 + n])
                del buf[: 8 + n]
                done[i] = got
                yield from got[0]
            if not b:  # nothing more now (b is None), or the stream has ended (b"")
                return

    def work() -> Iterable[Header]:
        # Yields headers as they come (for the progress bar); the order is restored below.
        nonlocal kids
        try:
            if q_read >= 0:
                while len(tok := os.read(q_read, 4)) == 4:
                    i = int.from_bytes(tok, "little")
                    done[i] = _scan_chunk(chunks[i], pseudo, record)
                    own.add(i)
                    yield from done[i][0]
                    for kid in kids:
                        yield from arrived(kid, wait=False)
            while kids:
                kid = kids[0]
                try:
                    yield from arrived(kid, wait=True)  # a torn last message (a child killed mid-write) is left
                finally:
                    os.close(kid[1])
                    kids = kids[1:]
                    os.waitpid(kid[0], 0)
            for i, chunk in enumerate(chunks):
                if i not in done:  # a chunk a dead child took
                    done[i] = _scan_chunk(chunk, pseudo, record)
                    own.add(i)
                    yield from done[i][0]
        finally:
            if q_read >= 0:
                os.close(q_read)
            for pid, r, _ in kids:  # an exception above: no zombies left behind
                os.close(r)
                os.waitpid(pid, 0)

    for _ in ui.progress(work(), total=len(paths), description=description):
        pass
    headers: list[Header] = []
    records: list[Any] | None = [] if record is not None else None
    for i in range(len(chunks)):
        got = done[i]
        if i not in own:
            for method, original in got[1]:  # the parent's map must know every pseudonym a child handed out
                getattr(pseudo, method)(original)
        headers += got[0]
        if records is not None:
            records += got[2] or ()
    return headers, records


# ---------------------------------------------------------------------------------------------
# Grouping and series selection
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One stack (or one single image) that could become the study's image."""

    key: str  # series pseudonym; "#n" appended when a series was split into several stacks
    headers: list[Header]
    single: bool = False  # a single 2D image (one instance is the study's image)

    @property
    def first(self) -> Header:
        return self.headers[0]

    @property
    def modality(self) -> str:
        return self.first.modality

    @property
    def description(self) -> str:
        return self.first.series_description()

    @property
    def image_type(self) -> set[str]:
        return {v for h in self.headers for v in h.image_type}

    @property
    def multiframe(self) -> bool:
        return len(self.headers) == 1 and self.first.n_frames > 1

    @property
    def n_slices(self) -> int:
        return self.first.n_frames if self.multiframe else len(self.headers)

    def label(self) -> str:
        """A PHI-free description for messages: series number, modality, size."""
        sn = self.first.series_number
        what = f"series {sn}" if sn is not None else "a series without SeriesNumber"
        if self.single:
            inst = self.first.instance_number
            what += f", instance {inst}" if inst is not None else ""
        return (
            f"{what} ({self.modality or 'no modality'}, {self.n_slices} image(s) of {self.first.rows}x"
            f"{self.first.cols})"
        )


def group_by_study(headers: Iterable[Header]) -> dict[str, list[Header]]:
    out: dict[str, list[Header]] = defaultdict(list)
    for h in headers:
        if h.error is None:
            out[h.study].append(h)
    return dict(out)


def _same_plane(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if len(a) != len(b):  # numpy broadcasting's answer for the lengths a header can hold (6 or None)
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) < _SAME_PLANE
    # Plain floats (finite: _floats) give numpy's answer bit for bit, without 4 array round trips a header
    # (the 5,000-file tree: 160 -> 20 us a 20-slice study).
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < _SAME_PLANE


def _has_geometry(hs: list[Header]) -> bool:
    return all(h.position is not None and h.orientation is not None for h in hs)


def candidates(study_headers: list[Header], dims: int) -> list[Candidate]:
    """Series of a study, split where one SeriesInstanceUID holds several stacks.

    A series is split by FrameOfReferenceUID, plane orientation and image size: those mark
    instances that cannot be one volume (a 3-plane localizer, a reformat stored in the same series).
    For 2D specs a single image is the unit: each instance of a 2D modality is its own candidate.
    """
    by_series: dict[str, list[Header]] = defaultdict(list)
    for h in study_headers:
        by_series[h.series].append(h)
    out: list[Candidate] = []
    for series in sorted(by_series):
        hs = sorted(by_series[series], key=lambda h: (h.instance_number or 0, h.path))
        stacks: list[tuple[tuple[Any, ...], list[float] | None, list[Header]]] = []
        multiframes = []
        for h in hs:
            if h.n_frames > 1:
                multiframes.append(h)
                continue
            sig = (h.frame_of_ref, h.rows, h.cols)
            for s_sig, s_orient, members in stacks:
                if s_sig == sig and _same_plane(s_orient, h.orientation):
                    members.append(h)
                    break
            else:
                stacks.append((sig, h.orientation, [h]))
        parts: list[tuple[list[Header], bool]] = []
        for _, _, members in stacks:
            volume_like = members[0].modality in VOLUME_MODALITIES and _has_geometry(members)
            if dims == 2 and not (volume_like and len(members) > 1):
                parts.extend(([m], True) for m in members)
            else:
                parts.append((members, False))
        parts.extend(([m], dims == 2) for m in multiframes)
        for i, (members, single) in enumerate(parts):
            key = series if len(parts) == 1 else f"{series}#{i + 1}"
            out.append(Candidate(key=key, headers=members, single=single))
    return out


@dataclass
class NotChosen:
    candidate: Candidate
    code: str  # modality | image_type | description_exclude | description_include | min_slices | dims | preference
    message: str


def select_series(cands: list[Candidate], rules: Any, dims: int) -> tuple[Candidate | None, list[NotChosen]]:
    """Apply the spec's series rules; return the chosen candidate and why every other one lost."""
    rejected: list[NotChosen] = []
    passing: list[Candidate] = []
    min_slices = max(rules.min_slices, 2 if dims == 3 else 1)
    for c in cands:
        why = _rule_failure(c, rules, dims, min_slices)
        if why:
            rejected.append(NotChosen(c, *why))
        else:
            passing.append(c)
    if not passing:
        return None, rejected

    def rank(c: Candidate) -> tuple[Any, ...]:
        pref = next((i for i, p in enumerate(rules.prefer) if re.search(p, c.description)), len(rules.prefer))
        return (
            pref,
            -c.n_slices,
            c.first.series_number if c.first.series_number is not None else 1 << 30,
            c.first.instance_number if c.first.instance_number is not None else 1 << 30,
            c.key,
        )

    passing.sort(key=rank)
    chosen = passing[0]
    best = rank(chosen)
    for c in passing[1:]:
        r = rank(c)
        if r[0] != best[0]:
            msg = f"prefer rule #{best[0]} matched the chosen series; this one matched " + (
                f"rule #{r[0]}" if r[0] < len(rules.prefer) else "no prefer rule"
            )
        elif r[1] != best[1]:
            msg = f"fewer slices than the chosen series ({c.n_slices} < {chosen.n_slices})"
        else:
            msg = "same preference and size as the chosen one; the lower series/instance number won"
        rejected.append(NotChosen(c, "preference", msg))
    return chosen, rejected


def _rule_failure(c: Candidate, rules: Any, dims: int, min_slices: int) -> tuple[str, str] | None:
    if rules.modality is not None and c.modality not in rules.modality:
        return "modality", f"modality {c.modality or 'none'} is not in series.modality {rules.modality}"
    excluded = sorted(c.image_type & set(rules.imagetype_exclusions(c.modality)))
    if excluded:
        return "image_type", f"ImageType contains {', '.join(excluded)} (series.imagetype_exclude)"
    for i, pat in enumerate(rules.description_exclude):
        if re.search(pat, c.description):
            return "description_exclude", f"SeriesDescription matches description_exclude rule #{i}"
    if rules.description_include and not any(re.search(p, c.description) for p in rules.description_include):
        return "description_include", "SeriesDescription matches no description_include rule"
    if dims == 2 and not c.single:
        return "dims", f"a stack of {c.n_slices} slices; a 2D spec takes single images"
    if dims == 2 and c.first.n_frames > 1:
        return "dims", f"a multi-frame image ({c.first.n_frames} frames); a 2D spec takes single images"
    if dims == 3 and c.n_slices < min_slices:
        return "min_slices", f"{c.n_slices} slice(s), fewer than series.min_slices ({min_slices})"
    if dims == 2 and c.n_slices < rules.min_slices:
        return "min_slices", f"{c.n_slices} image(s), fewer than series.min_slices ({rules.min_slices})"
    return None


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


@dataclass
class Geometry:
    files: list[str]  # ordered along the slice normal
    shape: list[int]
    spacing: list[float]
    affine: np.ndarray
    orientation: str
    n_slices: int


def axcodes(affine: np.ndarray, n_axes: int) -> str:
    """Anatomical direction (RAS+ letters) of each array axis, like nibabel's aff2axcodes."""
    out = []
    for j in range(n_axes):
        col = affine[:3, j]
        i = int(np.argmax(np.abs(col)))
        out.append("RAS"[i] if col[i] > 0 else "LPI"[i])
    return "".join(out)


def _cross(row: list[float], col: list[float]) -> np.ndarray:
    """``np.cross(row, col)`` of two 3-vectors, bit for bit (the same products and differences in float64)
    without its axis handling: 24 -> 2 us, once per study."""
    a0, a1, a2 = (float(x) for x in row)
    b0, b1, b2 = (float(x) for x in col)
    return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _affine_2d(orient: list[float] | None, pos: list[float] | None, spacing: list[float]) -> np.ndarray:
    if orient is None or pos is None:
        return np.diag([spacing[0], spacing[1], 1.0, 1.0])
    row, col = np.asarray(orient[:3]), np.asarray(orient[3:])
    a = np.eye(4)
    a[:3, 0] = col * spacing[0]
    a[:3, 1] = row * spacing[1]
    a[:3, 2] = _unit(np.cross(row, col))
    a[:3, 3] = pos
    return LPS_TO_RAS @ a


def _affine_3d(orient: list[float], first: np.ndarray, step: np.ndarray, spacing: list[float]) -> np.ndarray:
    row, col = np.asarray(orient[:3]), np.asarray(orient[3:])
    a = np.eye(4)
    a[:3, 0] = step
    a[:3, 1] = col * spacing[0]
    a[:3, 2] = row * spacing[1]
    a[:3, 3] = first
    return LPS_TO_RAS @ a


def stack_order(orient: list[float], positions: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Order of slices along the normal, and the mean step vector; GeometryError if not a clean stack."""
    normal = _unit(_cross(orient[:3], orient[3:]))
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    p, pos = proj[order], positions[order]
    steps = np.diff(p)
    n = len(p)
    problems: list[tuple[str, str]] = []
    dup = int(np.sum(steps < _DUP_TOL_MM))
    if dup:
        problems.append(("duplicate_position", f"{dup} of {n} slices share a position with another slice"))
    real = steps[steps >= _DUP_TOL_MM]
    med = float(np.median(real)) if len(real) else 0.0
    if med > 0:
        if n >= 2:
            # Tilt: the line through the slice origins is not parallel to the normal.
            centred = pos - pos.mean(axis=0)
            direction = np.linalg.svd(centred, full_matrices=False)[2][0]
            angle = float(np.degrees(np.arccos(min(1.0, abs(float(direction @ normal))))))
            if angle > _TILT_TOL_DEG:
                problems.append(("gantry_tilt", f"slices advance {angle:.1f} degrees off the slice normal"))
        gaps = real[real >= 1.5 * med]
        if len(gaps):
            problems.append(
                (
                    "missing_slices",
                    f"{len(gaps)} gap(s) of up to {float(gaps.max()) / med:.1f}x the typical {med:.3g} mm step",
                )
            )
        dev = np.abs(real[real < 1.5 * med] - med)
        if len(dev) and float(dev.max()) > tolerance * med:
            problems.append(
                (
                    "uneven_spacing",
                    f"slice steps vary by up to {float(dev.max()):.3g} mm around "
                    f"{med:.3g} mm (series.spacing_tolerance {tolerance:g})",
                )
            )
    if problems:
        raise GeometryError(problems[0][0], "; ".join(m for _, m in problems))
    step = (pos[-1] - pos[0]) / max(n - 1, 1)
    return order, step


def check_geometry(cand: Candidate, dims: int, tolerance: float) -> Geometry:
    """Slice order, shape, spacing and affine of a chosen candidate; GeometryError with a code if unusable."""
    h = cand.first
    if dims == 2:
        spacing = h.pixel_spacing or [1.0, 1.0]
        aff = _affine_2d(h.orientation, h.position, spacing)
        orient = axcodes(aff, 2) if h.orientation is not None and h.position is not None else "unknown"
        return Geometry([h.path], [h.rows, h.cols], [float(s) for s in spacing], aff, orient, 1)
    if cand.multiframe:
        if h.frame_positions is None or h.orientation is None:
            raise GeometryError(
                "multiframe_no_geometry",
                f"multi-frame file with {h.n_frames} frames but no per-frame position/orientation",
            )
        positions = np.asarray(h.frame_positions, float)
        orient, spacing, files = h.orientation, h.pixel_spacing, [h.path]
    else:
        hs = cand.headers
        if not _has_geometry(hs):
            missing = sum(1 for x in hs if x.position is None or x.orientation is None)
            raise GeometryError(
                "missing_position", f"{missing} of {len(hs)} slices lack ImagePositionPatient/ImageOrientationPatient"
            )
        o = np.asarray([x.orientation for x in hs], float)
        spread = float(np.max(np.abs(o - o[0])))
        if spread > _ORIENT_TOL:
            raise GeometryError("mixed_orientation", f"slice orientation cosines differ by up to {spread:.3g}")
        sp = [x.pixel_spacing for x in hs]
        known = [s for s in sp if s is not None]
        if known and (len(known) < len(sp) or np.max(np.abs(np.asarray(known) - np.asarray(known[0]))) > 1e-4):
            raise GeometryError("inconsistent_pixel_spacing", "slices of the stack have different PixelSpacing")
        positions = np.asarray([x.position for x in hs], float)
        orient, spacing = hs[0].orientation, hs[0].pixel_spacing
        files = [x.path for x in hs]
    spacing = spacing or [1.0, 1.0]
    order, step = stack_order(orient, positions, tolerance)
    first = positions[order[0]]
    aff = _affine_3d(orient, first, step, spacing)
    n = len(positions)
    ordered = files if cand.multiframe else [files[i] for i in order]
    slice_sp = float(np.linalg.norm(step))
    return Geometry(
        ordered,
        [n, h.rows, h.cols],
        [round(slice_sp, 6), float(spacing[0]), float(spacing[1])],
        aff,
        axcodes(aff, 3),
        n,
    )


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def _rescale(ds: Any, frame: int | None) -> tuple[float, float]:
    slope, icpt = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
    if slope is None and icpt is None:
        pv = _fg(ds, "PixelValueTransformationSequence", frame)
        if pv is not None:
            slope, icpt = _get(pv, "RescaleSlope"), _get(pv, "RescaleIntercept")
    try:
        return float(slope if slope is not None else 1.0), float(icpt if icpt is not None else 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0


_GRAY = np.asarray([0.299, 0.587, 0.114], np.float32)


def _pixels(ds: Any) -> np.ndarray:
    """Decoded pixels as float32 (frames, rows, cols): colour to gray, rescale applied, MONOCHROME1 inverted."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder plugin missing, corrupt stream, wrong length
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", None) or str(ts or "unknown")
        raise GeometryError(
            "undecodable",
            f"pixel data could not be decoded ({name}; {type(exc).__name__}); "
            "install the matching pylibjpeg plugin or convert the series",
        ) from None
    return _finish_pixels(ds, arr)


def _finish_pixels(ds: Any, arr: Any) -> np.ndarray:
    """Decoded stored values -> float32 (frames, rows, cols); ``ds`` a pydicom dataset or a dicom_header dict."""
    frames = max(_int(_get(ds, "NumberOfFrames")) or 1, 1)
    samples = _int(_get(ds, "SamplesPerPixel")) or 1
    photometric = str(_get(ds, "PhotometricInterpretation", "") or "")
    if photometric == "PALETTE COLOR":
        arr = pydicom.pixels.apply_color_lut(arr, ds)
        samples = 3
    arr = np.asarray(arr)
    if samples > 1:
        arr = arr[..., :3].astype(np.float32) @ _GRAY
    arr = arr.astype(np.float32, copy=False)
    if frames == 1 or arr.ndim == 2:
        arr = arr.reshape((1, *arr.shape[-2:]))
    out = np.empty(arr.shape, np.float32)
    # A slope of 1e38 or NaN makes Inf/NaN here; the shared checks (medxfer.io.checks) refuse it with a reason.
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(arr.shape[0]):
            slope, icpt = _rescale(ds, i)
            out[i] = arr[i] * slope + icpt
        if photometric == "MONOCHROME1":
            out = out.max() + out.min() - out
    return out


def _file_pixels(path: str, header: Header | None = None) -> np.ndarray:
    """``_pixels`` of one file: native grayscale pixels straight from the bytes (dicom_header), else pydicom.

    Same array either way (tests/io/test_dicom_header.py compares them on every test file); the byte path
    costs one read and a header walk instead of pydicom's parse and decoder set-up (~1/3 per GE MR slice).
    """
    try:
        if header is not None and header.pixels is not None:
            arr = dicom_header.read_layout_pixels(path, header.pixels, header.size, header.mtime_ns)
            if arr is not None:
                return _finish_pixels(header.pixels["values"], arr)
        fast = dicom_header.read_native_pixels(path)
    except OSError:
        fast = None  # pydicom's read gives the reason code
    if fast is not None:
        return _finish_pixels(fast[0]["values"], fast[1])
    return _pixels(_read(path))


def _read(path: str) -> Any:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom and OSError messages quote the path: keep it out
        raise GeometryError("unreadable", f"a file of the series could not be read ({type(exc).__name__})") from None


def read_series(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and affine of one study image: (rows, cols) for one single-frame file, else (slices, rows, cols).

    Slices are ordered along the slice normal here too, so callers may pass files in any order.
    Raises GeometryError (code ``undecodable`` and others) for series ingest would have quarantined.
    """
    if not files:
        raise GeometryError("missing_tags", "no files")
    dss = [_read(f) for f in files]
    ds0 = dss[0]
    if len(dss) == 1:
        px = _pixels(ds0)
        spacing = _pixel_spacing(ds0) or [1.0, 1.0]
        if px.shape[0] == 1:
            orient = _floats(_get(ds0, "ImageOrientationPatient"), 6)
            pos = _floats(_get(ds0, "ImagePositionPatient"), 3)
            if (orient is None or pos is None) and _get(ds0, "PerFrameFunctionalGroupsSequence"):
                orient, fp = _frame_geometry(ds0, 1)
                pos = fp[0] if fp else None
            return px[0], _affine_2d(orient, pos, spacing)
        orient, positions = _frame_geometry(ds0, px.shape[0])
        if orient is None or positions is None:
            raise GeometryError("multiframe_no_geometry", "multi-frame file without per-frame geometry")
        pos = np.asarray(positions, float)
        order, step = stack_order(orient, pos, tolerance=0.49)
        return px[order], _affine_3d(orient, pos[order[0]], step, spacing)
    orient = _floats(_get(ds0, "ImageOrientationPatient"), 6)
    positions = [_floats(_get(d, "ImagePositionPatient"), 3) for d in dss]
    if orient is None or any(p is None for p in positions):
        raise GeometryError("missing_position", "slices lack ImagePositionPatient/ImageOrientationPatient")
    pos = np.asarray(positions, float)
    order, step = stack_order(orient, pos, tolerance=0.49)
    first = _pixels(dss[order[0]])
    vol = np.empty((len(dss), *first.shape[1:]), np.float32)
    vol[0] = first[0]
    for k, i in enumerate(order[1:], start=1):
        sl = _pixels(dss[i])
        if sl.shape[1:] != vol.shape[1:]:
            raise GeometryError("missing_tags", "slices of the series differ in size")
        vol[k] = sl[0]
    return vol, _affine_3d(orient, pos[order[0]], step, _pixel_spacing(ds0) or [1.0, 1.0])


def _slice_stats(a: np.ndarray) -> tuple[tuple[int, ...], bool, float, float]:
    """What sample_pixels needs of a slice it does not keep: (rows, cols), all finite, min, max."""
    shape = tuple(int(x) for x in a.shape[1:])
    if not np.isfinite(a).all():
        return shape, False, math.nan, math.nan
    return shape, True, float(a.min()), float(a.max())


_MIN, _MAX = np.minimum.reduce, np.maximum.reduce


def _native_stats(values: dict[str, Any], arr: np.ndarray) -> tuple[tuple[int, ...], bool, float, float] | None:
    """``_slice_stats(_finish_pixels(values, arr))`` of a native grayscale slice from its stored extremes alone.

    Exact, not approximate: the rescale is float32 ``x * slope + icpt`` and the MONOCHROME1 flip ``m - x``,
    each monotonic with IEEE rounding, so the extremes of the stored values map to the extremes of the result
    bit for bit, and an overflow to Inf shows at an extreme. A NaN/Inf slope or intercept (NaN anywhere) takes
    the full path (None). Two reductions instead of ~10 array passes: the check of a small slice costs ~1/3.
    """
    # A layout's values hold no functional groups (native_layout leaves enhanced objects to pydicom), so without
    # RescaleSlope/Intercept _rescale would answer (1, 0) after two more look-ups.
    if values.get("RescaleSlope") is None and values.get("RescaleIntercept") is None:
        slope, icpt = 1.0, 0.0
    else:
        slope, icpt = _rescale(values, 0)
    if slope.is_integer() and icpt.is_integer() and arr.dtype.itemsize <= 2:
        # Integers below 2**24 are exact in float32, so there each float32 step equals integer arithmetic (the
        # usual case: slope 1, intercept 0 or -1024) and no numpy scalar is needed; the MONOCHROME1 flip
        # m - x then keeps the extremes (m = lo + hi).
        # The ufuncs' reduce directly: arr.min() goes through two Python frames (~1 us each, once a file).
        k, c = int(slope), int(icpt)
        pa, pb = int(_MIN(arr, None)) * k, int(_MAX(arr, None)) * k
        lo_i, hi_i = min(pa, pb) + c, max(pa, pb) + c
        if max(abs(pa), abs(pb), abs(lo_i), abs(hi_i), abs(lo_i + hi_i)) < 2**24:
            return (int(arr.shape[1]), int(arr.shape[2])), True, float(lo_i), float(hi_i)
    mono1 = str(_get(values, "PhotometricInterpretation", "") or "") == "MONOCHROME1"
    s32, i32 = np.float32(slope), np.float32(icpt)
    if not (math.isfinite(s32) and math.isfinite(i32)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.float32(arr.min()) * s32 + i32
        b = np.float32(arr.max()) * s32 + i32
        lo, hi = (a, b) if s32 >= 0 else (b, a)
        if mono1:
            m = hi + lo
            lo, hi = m - hi, m - lo
    shape = tuple(int(x) for x in arr.shape[1:])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return shape, False, math.nan, math.nan
    return shape, True, float(lo), float(hi)


def _file_stats(path: str, header: Header | None) -> tuple[tuple[int, ...], bool, float, float]:
    """``_slice_stats`` of one file's pixels, from the stored values where the scan found where they lie."""
    if header is not None and header.pixels is not None:
        try:
            arr = dicom_header.read_layout_pixels(path, header.pixels, header.size, header.mtime_ns)
        except OSError:
            arr = None  # _file_pixels below gives the reason code
        if arr is not None:
            values = header.pixels["values"]
            return _native_stats(values, arr) or _slice_stats(_finish_pixels(values, arr))
    return _slice_stats(_file_pixels(path, header))


def sample_indices(n: int) -> list[int]:
    """Which slices of an n-slice series make ingest's hash and intensity range: first, middle and last."""
    return sorted({0, n // 2, max(n - 1, 0)})


def sample_pixels(files: list[str], headers: Iterable[Header] = ()) -> np.ndarray:
    """Decode every file of an ordered series; return the first, middle and last (float32, (k, rows, cols)).

    Every slice is decoded and checked (decodable, same size, finite after rescaling) because one bad slice
    otherwise passes ingest and fails mid-epoch (issue 14); a constant series (RescaleSlope 0) is refused.
    Only the sampled slices are kept: they make the content hash and the intensity range, as before, so a
    manifest does not change. A single file (2D image or multi-frame object) is decoded whole. Raises GeometryError.

    ``headers`` (the scan's, optional) say where each uncompressed slice's pixels lie and, for small files, hold
    the slice's check already (``Header.pixel_stats``): the other slices are then checked from their stored
    extremes without pydicom (``_native_stats``, exact). Checking the GE MR's 130 slices so costs ~1/29 of
    decoding each through pydicom (231 us against 6.7 ms a slice, same run, loaded machine).
    """
    if not files:
        raise GeometryError("missing_tags", "no files")
    keep = set(sample_indices(len(files)))
    by_path = {h.path: h for h in headers}
    arrs: list[np.ndarray] = []
    lo, hi, shape, bad = math.inf, -math.inf, None, 0
    for i, f in enumerate(files):
        h = by_path.get(f)
        if i in keep:
            a = _file_pixels(f, h)
            stats = _slice_stats(a)
            arrs.append(a)
        else:
            stats = (h.pixel_stats if h is not None else None) or _file_stats(f, h)
        if shape is None:
            shape = stats[0]
        elif stats[0] != shape:
            raise GeometryError("missing_tags", "slices of the series differ in size")
        if not stats[1]:
            bad += 1
            continue
        lo, hi = min(lo, stats[2]), max(hi, stats[3])
    if bad:
        raise GeometryError(
            "nonfinite_pixels", f"{bad} of {len(files)} file(s) decode to NaN/Inf pixels (e.g. a NaN RescaleSlope)"
        )
    if lo == hi:
        raise GeometryError("constant_image", f"every pixel of the series is {lo:g} (e.g. RescaleSlope 0)")
    return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)


def decode_check(files: list[str], headers: Iterable[Header] = ()) -> None:
    """Decode the middle file of a series: decoder gaps show up at ingest/predict, not in a worker."""
    mid = files[len(files) // 2]
    _file_pixels(mid, next((h for h in headers if h.path == mid), None))


# ---------------------------------------------------------------------------------------------
# Writing (the demo builds DICOM through here only; tests also use pydicom directly)
# ---------------------------------------------------------------------------------------------

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def generate_uid(*entropy: object) -> str:
    """A valid UID; deterministic when entropy is given (reproducible demo data)."""
    if entropy:
        return pydicom.uid.generate_uid(entropy_srcs=[str(e) for e in entropy])
    return pydicom.uid.generate_uid()


def ultrasound_regions(shape: tuple[int, ...], delta_cm: float) -> Any:
    """A SequenceOfUltrasoundRegions with one region over the whole (rows, cols) image, `delta_cm` per pixel."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    reg = Dataset()
    reg.RegionSpatialFormat = 1
    reg.RegionDataType = 1
    reg.RegionFlags = 0
    reg.RegionLocationMinX0, reg.RegionLocationMinY0 = 0, 0
    reg.RegionLocationMaxX1, reg.RegionLocationMaxY1 = shape[1] - 1, shape[0] - 1
    reg.PhysicalUnitsXDirection = 3  # cm
    reg.PhysicalUnitsYDirection = 3
    reg.PhysicalDeltaX = delta_cm
    reg.PhysicalDeltaY = delta_cm
    return Sequence([reg])


def write_2d_image(
    path: str | os.PathLike[str], pixels: np.ndarray, attrs: dict[str, Any], sop_class: str = US_IMAGE_STORAGE
) -> None:
    """Write one single-frame MONOCHROME2 image (uint8/uint16) with the given top-level attributes."""
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    sop_uid = attrs.get("SOPInstanceUID") or generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for k, v in attrs.items():
        if k != "SOPInstanceUID":
            setattr(ds, k, v)
    arr = np.ascontiguousarray(pixels)
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)

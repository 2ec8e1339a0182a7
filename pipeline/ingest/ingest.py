"""The ingest stage: DICOM or NIfTI tree + labels CSV -> manifest, rejects and a report.

Every input ends up in exactly one place: a manifest row (a usable, labelled
study) or a rejects.csv row with a reason code. Identifiers are pseudonymised
while headers are read, so nothing downstream of the scan sees a PatientID or a
UID. Paths written to the workspace are shareable: relative to ``source.root``, with every
folder/file name that is not generic (``medxfer.io.phi.is_generic_name``: "DICOM", "IM0001",
"case_00012.nii.gz") replaced by an HMAC pseudonym (``p-<16 hex>``, known extension kept), in manifest
``files`` and rejects ``input`` (a labels-CSV row: "labels.csv:LINE"). The real paths live only in the local
``file_map.csv`` (next to ``pseudonym_map.csv``, mode 0600); ``read_manifest`` resolves through it. The scan
cache is keyed by HMACs of paths and stores none. Messages, the report and the summary never carry paths.

manifest.parquet columns: study_key, patient_key, label, label_index, modality,
source_kind, files, n_slices, shape, spacing, orientation, intensity_min,
intensity_max, content_hash, series_key. ``shape``/``spacing`` follow the axis
order of the array that ``read_series``/``read_volume`` return; ``orientation``
gives the RAS+ direction letter of each of those axes ("unknown" for 2D images
without patient geometry).

Reason codes: every ``reason_code`` in rejects.csv is a key of the one table, ``medxfer.io.checks.REASONS``.

DICOM pixels at ingest: headers of every file are read (only the tags ingest uses), then every slice
of each chosen series is decoded and checked (decodable, finite, not constant): one bad slice would
otherwise pass here and fail mid-epoch; on the GE MR series (130 slices) that costs ~180 ms against
~6 ms for three slices. Only the first, middle and last slice are kept (a single file - 2D image or
multi-frame object - is kept whole), so for DICOM stacks
``intensity_min``/``intensity_max`` are the range of those sampled slices (representative, not
exact), and ``content_hash`` is sha256 over the full shape, the slice count and the decoded
float32 pixels of the sampled slices: byte-identical studies still share a hash, which is what
split's duplicate grouping needs. NIfTI rows hash and range the whole volume.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from medxfer.config.spec import DataSpec, SpecError, check_spec_files
from medxfer.core import ui
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace, atomic_path, write_text_atomic
from medxfer.ingest.manifest import MANIFEST_COLUMNS, json_default, manifest_content_hash, write_file_map
from medxfer.io.checks import InputError, check_shape
from medxfer.io.phi import PathSharer, Pseudonymizer

REJECT_COLUMNS = ["input", "reason_code", "message", "study_key"]
# Every reason_code of rejects.csv is a key of the one table, medxfer.io.checks.REASONS; these are its label rows.
_NIFTI_NAMES = (".nii", ".nii.gz")
# 2: DICOM content hash over sampled slices; 3: every slice decoded and checked, the io/checks reason codes
# (an entry cached as usable by version 2 may hold a slice that version 3 rejects); 4: header records without
# SeriesDescription (free text, often a name; read again from the file when a series rule needs it), so a
# version-3 file, which holds it in clear, is dropped and rewritten on the next ingest. 5: keys are HMACs of the
# paths and header records carry no path (version 4 named every folder and file in clear). 6: header records carry
# Manufacturer and ManufacturerModelName (a version-5 record would give every cached study an empty scanner).
# 7: header records are JSON lists in medxfer.io.dicom.RECORD_FIELDS order, not objects (Header.to_record).
_CACHE_VERSION = 7


# ---------------------------------------------------------------------------------------------
# Small shared pieces (split and predict use them too)
# ---------------------------------------------------------------------------------------------


def normalise_key(value: Any, source_kind: str) -> str:
    """Label-key text as it is pseudonymised: trimmed; NIfTI paths with '/' and no leading './'."""
    s = str(value).strip()
    if source_kind == "nifti":
        s = s.replace("\\", "/")
        while s.startswith("./"):
            s = s[2:]
    return s


def _walk(
    root: Path, exclude: set[Path], info: dict[str, tuple[int, int, bool]] | None = None
) -> tuple[list[str], int, list[str]]:
    """All regular files under root, sorted; dot-files/folders skipped and counted; dangling symlinks listed.

    ``info``, when given, gets (size, mtime_ns, is_symlink) of every file returned: the scan cache and the file map
    need no second stat or lstat of it. Symlinked folders are not entered (as os.walk does), so every folder on
    the way to a file is a real one below ``root``.
    """
    # Excluded files (labels CSV, spec) are matched by inode: resolving every path costs an lstat per
    # path component, more than reading a small DICOM header.
    skip = set()
    for e in exclude:
        try:
            st = os.stat(e)
        except OSError:
            continue
        skip.add((st.st_dev, st.st_ino))
    out: list[str] = []
    dangling: list[str] = []
    hidden = 0
    # os.scandir instead of os.walk + os.stat per path: the entries' types come with the listing, and each
    # file is stat'ed once through its entry (the 5,000-file tree: 41 -> 19 ms).
    stack = [os.fspath(root)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(e)
        hidden += sum(1 for d in dirs if d.name.startswith("."))
        for e in sorted(files, key=lambda e: e.name):
            if e.name.startswith("."):
                hidden += 1
                continue
            try:
                st = e.stat()
            except OSError:
                if e.is_symlink():
                    dangling.append(e.path)
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in skip:
                continue
            out.append(e.path)
            if info is not None:
                info[e.path] = (st.st_size, st.st_mtime_ns, e.is_symlink())
        # Depth first in name order, as os.walk (top-down) visits them; symlinked folders are counted, not entered.
        stack += [
            d.path
            for d in sorted(dirs, key=lambda e: e.name, reverse=True)
            if not d.name.startswith(".") and not d.is_symlink()
        ]
    return out, hidden, dangling


def _dangling_rejects(paths: list[str]) -> list[Reject]:
    msg = "a symbolic link whose target does not exist (moved or deleted); fix or remove the link"
    return [Reject(p, "dangling_link", msg) for p in paths]


def _resolve_all(files: list[str]) -> list[str]:
    """``str(Path(f).resolve())`` for many files, resolving each folder once (only symlinked files again)."""
    dirs: dict[str, str] = {}
    out = []
    for f in files:
        d, name = os.path.split(f)
        if d not in dirs:
            dirs[d] = str(Path(d).resolve())
        p = os.path.join(dirs[d], name)
        out.append(str(Path(p).resolve()) if os.path.islink(p) else p)
    return out


class _Sharer:
    """Local paths -> their shareable form (relative to source.root, identifying names pseudonymised), and the
    file map back to the real (resolved) paths, which only the workspace's local side holds.

    ``walked``: ``_walk``'s info for the files under ``root``. A walked file that is no symlink resolves to the
    resolved root joined with its path below it (the walk enters no symlinked folder), so only the root is
    resolved, not each folder, and no file needs an lstat (5,000 files: 35 -> 3 ms).
    """

    def __init__(self, root: Path, pseudo: Pseudonymizer, walked: dict[str, tuple[int, int, bool]] | None = None):
        self.share = PathSharer(root, pseudo)
        self.mapping: dict[str, str] = {}
        self._walked = walked or {}
        self._prefix = os.path.join(os.fspath(root), "")
        self._real_root = os.path.join(os.path.realpath(root), "") if walked else ""

    def _real(self, files: list[str]) -> list[str]:
        walked, prefix, n = self._walked, self._prefix, len(self._prefix)
        if not walked or not all(f in walked and not walked[f][2] and f.startswith(prefix) for f in files):
            return _resolve_all(files)
        real_root = self._real_root
        return [real_root + f[n:] for f in files]

    def _add(self, walked: str, real: str) -> str:
        shared = self.share(walked)
        prev = self.mapping.setdefault(shared, real)
        if prev != real:  # a 64-bit HMAC collision, or two names for one place: never guess which file is meant
            raise StageError(
                f"two different inputs have the same shareable path {shared}; fix: rename one of the folders "
                "or files, or use another pseudonym key (MEDXFER_PSEUDONYM_KEY)"
            )
        return shared

    def files(self, walked: list[str]) -> list[str]:
        return [self._add(w, r) for w, r in zip(walked, self._real(walked), strict=True)]

    def reject_input(self, r: Reject) -> str:
        real = os.path.realpath(r.input) if os.path.exists(r.input) else os.path.abspath(r.input)
        shared = self._add(r.input, real)
        return shared if r.line is None else f"{shared}:{r.line}"


def _common_input(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    first = os.path.dirname(paths[0])
    if all(os.path.dirname(p) == first for p in paths):
        # Distinct files of one folder: commonpath gives that folder, normalised as commonpath([folder]) does
        # it alone (a 20-slice series: 36 -> 12 us).
        return os.path.commonpath([first])
    try:
        return os.path.commonpath(paths)
    except ValueError:
        return paths[0]


class ScanCache:
    """Per-file (and per-study) results keyed by path + size + mtime; invalid under another key or version.

    Stored keys are keyed hashes (HMAC under the workspace key) of the paths, and header records leave their
    ``path`` out (it is the lookup key; ``Header.from_record`` puts it back): the cache file names no folder or file.
    """

    def __init__(self, path: Path, pseudo: Pseudonymizer, load: bool = True):
        self.path = path
        self.fingerprint = pseudo.fingerprint
        self._pseudo = pseudo
        self._old: dict[tuple[str, str], tuple[int, int, str]] = {}
        self._new: dict[tuple[str, str], tuple[int, int, str]] = {}
        if load and path.is_file():
            try:
                import pyarrow.parquet as pq

                # Columns as Python lists straight from Arrow: a DataFrame's itertuples cost ~3x more (5,250 rows).
                t = pq.read_table(path, columns=["kind", "key", "size", "mtime_ns", "record"])
                kinds, keys, sizes, mtimes, records = (t.column(c).to_pylist() for c in t.column_names)
                metas = [r for k, r in zip(kinds, records, strict=True) if k == "meta"]
                if len(metas) == 1 and json.loads(metas[0]) == self._meta():
                    old = self._old
                    for k, key, s, m, r in zip(kinds, keys, sizes, mtimes, records, strict=True):
                        if k != "meta":
                            old[(k, key)] = (int(s), int(m), r)
            except Exception:  # an unreadable cache is only a slower run
                self._old = {}

    def _meta(self) -> dict[str, Any]:
        return {"version": _CACHE_VERSION, "key": self.fingerprint}

    def _key(self, key: str) -> str:
        return self._pseudo.digest("ca", key, 32)

    def get(self, kind: str, key: str, size: int, mtime_ns: int) -> Any:
        if not self._old:  # a cold ingest: no keyed hash of every path for nothing
            return None
        hk = self._key(key)
        hit = self._old.get((kind, hk))
        if hit is None or hit[0] != size or hit[1] != mtime_ns:
            return None
        self._new[(kind, hk)] = hit
        return json.loads(hit[2])  # "h": Header.to_record's list (its path is ``key``)

    def put(self, kind: str, key: str, size: int, mtime_ns: int, record: dict[str, Any]) -> None:
        self._new[(kind, self._key(key))] = (size, mtime_ns, json.dumps(record))

    def header_record(self, h: Any) -> tuple[str, int, int, str]:
        """The cache entry of a header (``Header.to_record``); the scan's workers make it (``put_header_records``)."""
        return self._key(h.path), h.size, h.mtime_ns, json.dumps(h.to_record())

    def put_header_records(self, records: Iterable[tuple[str, int, int, str]]) -> None:
        new = self._new
        for hk, size, mtime_ns, rec in records:
            new[("h", hk)] = (size, mtime_ns, rec)

    def save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Only what this run used is kept, so deleted files drop out of the cache.
        rows = [("meta", "", 0, 0, json.dumps(self._meta()))]
        rows += [(k, key, s, m, r) for (k, key), (s, m, r) in sorted(self._new.items())]
        kinds, keys, sizes, mtimes, records = zip(*rows, strict=True)
        table = pa.table(
            {
                "kind": pa.array(kinds, pa.string()),
                "key": pa.array(keys, pa.string()),
                "size": pa.array(sizes, pa.int64()),
                "mtime_ns": pa.array(mtimes, pa.int64()),
                "record": pa.array(records, pa.string()),
            }
        )
        # Straight to Arrow (no DataFrame: its string conversion cost more than the write), and without fsyncs:
        # a cache torn by a power loss reads as no cache (see __init__), which only makes the next ingest
        # slower. 5,250 rows: ~90 -> ~40 ms.
        with atomic_path(self.path, durable=False) as tmp:
            pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------------------
# Studies found under the root
# ---------------------------------------------------------------------------------------------


@dataclass
class Study:
    """A study as found on disk: usable (geometry + pixel facts) or rejected with a reason code."""

    study_key: str
    patient_key: str | None
    input: str
    source_kind: str
    files: list[str] = field(default_factory=list)
    modality: str = "unknown"
    manufacturer: str = ""  # DICOM Manufacturer / ManufacturerModelName of the chosen series; NIfTI: empty
    manufacturer_model: str = ""
    series_key: str = ""
    n_slices: int = 0
    shape: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    orientation: str = "unknown"
    intensity_min: float = 0.0
    intensity_max: float = 0.0
    content_hash: str = ""
    reason_code: str | None = None
    message: str | None = None
    signature: str = ""  # files + sizes + mtimes, for the pixel cache


@dataclass
class Reject:
    input: str  # a local path; written to rejects.csv in its shareable form (see _Sharer)
    reason_code: str
    message: str
    study_key: str = ""
    line: int | None = None  # a labels-CSV row: ``input`` is the CSV, written as "<shareable csv>:<line>"


@dataclass
class Discovery:
    studies: list[Study]
    rejects: list[Reject]
    series_log: list[dict[str, Any]]
    files_seen: int = 0
    files_read: int = 0
    files_cached: int = 0
    header_fallbacks: int = 0  # files the byte-level header reader left to pydicom (medxfer.io.dicom_header)
    hidden_skipped: int = 0
    ignored_files: int = 0
    no_patient_id: int = 0


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _discover_dicom(
    files: list[str],
    spec: DataSpec,
    pseudo: Pseudonymizer,
    cache: ScanCache | None,
    workers: int | None,
    decode: str,
    walked: dict[str, tuple[int, int, bool]] | None = None,
) -> Discovery:
    """Headers -> studies -> chosen series -> geometry -> pixels.

    ``decode``: "full" (ingest: sampled slices decoded, hashed and ranged) or "check" (predict: one slice).
    ``walked``: ``_walk``'s (size, mtime_ns, is_symlink) of the files, so the cache look-up needs no stat.
    """
    from medxfer.io import dicom

    headers: list[dicom.Header] = []
    to_read: list[str] = []
    cached = 0
    for p in files:
        got = walked.get(p) if walked else None
        size, mtime = got[:2] if got else _stat(p)
        rec = cache.get("h", p, size, mtime) if cache else None
        try:
            h = dicom.Header.from_record(p, rec) if rec is not None else None
        except (TypeError, ValueError):  # a record this version did not write: read the file again
            h = None
        if h is not None:
            headers.append(h)
            cached += 1
        else:
            to_read.append(p)
    # The cache records are made where each header is read (in the scan's worker processes for a large tree).
    fresh, records = dicom.scan_headers_records(to_read, pseudo, workers, record=cache.header_record if cache else None)
    if cache and records:
        cache.put_header_records(records)
    headers += fresh
    disc = Discovery([], [], [], files_seen=len(files), files_read=len(to_read), files_cached=cached)
    disc.header_fallbacks = sum(1 for h in fresh if h.fallback)
    for h in headers:
        if h.error:
            msg = h.message or dicom.REASONS.get(h.error, h.error)
            if h.error == "not_dicom" and h.path.lower().endswith(_NIFTI_NAMES):
                msg = "a NIfTI file, but this spec/model expects DICOM (series folders or DICOM files)"
            disc.rejects.append(Reject(h.path, h.error, msg))

    by_study = dicom.group_by_study(headers)
    use_accession = spec.labels.key == "AccessionNumber"
    chosen: list[tuple[Study, dicom.Candidate, dicom.Geometry]] = []
    for study_uid_key in sorted(by_study):
        hs = by_study[study_uid_key]
        paths = [h.path for h in hs]
        study_key = study_uid_key
        if use_accession:
            accs = {h.accession for h in hs if h.accession}
            if len(accs) == 1:
                study_key = accs.pop()
        patients = {h.patient for h in hs if h.patient}
        if not patients:
            disc.no_patient_id += 1
        patient_key = next(iter(patients)) if len(patients) == 1 else pseudo.patient_key("study:" + study_uid_key)
        st = Study(study_key, patient_key, _common_input(paths), "dicom")
        if len(patients) > 1:
            st.reason_code, st.message = "mixed_patients", f"the study's files carry {len(patients)} PatientIDs"
            disc.studies.append(st)
            continue
        if use_accession and study_key == study_uid_key:
            st.reason_code, st.message = "no_label", "the study has no single AccessionNumber to join labels on"
            disc.studies.append(st)
            continue
        cands = dicom.candidates(hs, spec.dims)
        pick, losers = dicom.select_series(cands, spec.series, spec.dims)
        for nc in losers:
            disc.series_log.append(
                {
                    "study_key": study_key,
                    "series_key": nc.candidate.key,
                    "chosen": False,
                    "reason_code": nc.code,
                    "message": f"{nc.candidate.label()}: {nc.message}",
                }
            )
        if pick is None:
            detail = "; ".join(f"{nc.candidate.label()}: {nc.message}" for nc in losers[:5])
            more = f"; and {len(losers) - 5} more" if len(losers) > 5 else ""
            st.reason_code = "no_series_selected"
            st.message = f"{len(cands)} candidate(s), none passed the series rules: {detail}{more}"
            disc.studies.append(st)
            continue
        disc.series_log.append(
            {"study_key": study_key, "series_key": pick.key, "chosen": True, "reason_code": "", "message": pick.label()}
        )
        st.input = _common_input([h.path for h in pick.headers])
        st.modality = pick.modality or "unknown"
        st.manufacturer, st.manufacturer_model = pick.first.manufacturer, pick.first.manufacturer_model
        st.series_key = pick.key
        try:
            geom = dicom.check_geometry(pick, spec.dims, spec.series.spacing_tolerance)
        except dicom.GeometryError as exc:
            st.reason_code, st.message = exc.code, f"{pick.label()}: {exc.message}"
            disc.studies.append(st)
            continue
        try:  # each file passed the size cap alone; the stacked series must too (4,000 slices of 512^2: 4 GB)
            check_shape([geom.n_slices, *list(geom.shape)[-2:]])
        except InputError as exc:
            st.reason_code, st.message = exc.code, f"{pick.label()}: {exc.message}"
            disc.studies.append(st)
            continue
        st.files, st.n_slices, st.shape = geom.files, geom.n_slices, geom.shape
        st.spacing, st.orientation = geom.spacing, geom.orientation
        sizes = {h.path: (h.size, h.mtime_ns) for h in pick.headers}
        st.signature = hashlib.sha256(
            "\n".join(f"{f}|{sizes[f][0]}|{sizes[f][1]}" for f in geom.files).encode()
        ).hexdigest()
        chosen.append((st, pick, geom))
        disc.studies.append(st)

    def pixels(item: tuple[Study, Any, Any]) -> None:
        st = item[0]
        rec = cache.get("s", st.signature, 0, 0) if cache and decode == "full" else None
        if rec is None:
            rec = _decode_study(st, decode, item[1].headers)
            if cache and decode == "full":
                cache.put("s", st.signature, 0, 0, rec)
        if rec.get("reason_code"):
            st.reason_code, st.message = rec["reason_code"], rec["message"]
        elif decode == "full":
            st.content_hash, st.intensity_min, st.intensity_max = rec["content_hash"], rec["min"], rec["max"]
            st.shape = rec["shape"]

    # The checks hold the GIL but for file reads and numpy: threads help only where a core is spare, and only
    # where the slices are big enough for numpy and reads to release it for long (see _THREAD_MIN_PIXELS).
    n_threads = workers or (dicom.usable_cpus() if _decode_in_threads(chosen) else 1)
    if n_threads == 1:  # no pool: a hand-off per study to one thread only adds its wake-ups
        list(ui.progress(map(pixels, chosen), total=len(chosen), description="decoding chosen series"))
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as ex:
            list(ui.progress(ex.map(pixels, chosen), total=len(chosen), description="decoding chosen series"))
    return disc


# Below this many pixels a slice (median over the chosen series), the decode threads only contend for the GIL:
# per sampled slice the work is a few dozen Python calls around small numpy reductions. Cold ingest of generated
# trees of 20-slice series on 2 idle cores, median of 5 alternating runs, 2 threads vs none: 250 series of 32^2
# 0.407 vs 0.364 s, 200 of 128^2 0.361 vs 0.328 s, 100 of 256^2 0.240 vs 0.253 s, 40 of 512^2 0.233 vs 0.273 s
# (the reads and reductions of big slices release the GIL).
_THREAD_MIN_PIXELS = 180 * 180


def _decode_in_threads(chosen: list[tuple[Study, Any, Any]]) -> bool:
    if len(chosen) < 2:
        return False  # one study: one task, nothing to overlap
    pixels = sorted(c[1].first.rows * c[1].first.cols for c in chosen)
    return pixels[len(pixels) // 2] >= _THREAD_MIN_PIXELS


def _decode_study(st: Study, decode: str, headers: list[Any] | None = None) -> dict[str, Any]:
    from medxfer.io import dicom

    try:  # the headers tell where each file's pixels lie, so uncompressed slices are checked without pydicom
        if decode == "check":
            dicom.decode_check(st.files, headers or ())
            return {}
        arr = dicom.sample_pixels(st.files, headers or ())
    except InputError as exc:
        return {"reason_code": exc.code, "message": exc.message}
    except Exception as exc:  # a file changed or vanished between the scan and now
        return {"reason_code": "undecodable", "message": f"pixel data could not be read ({type(exc).__name__})"}
    shape = [int(s) for s in st.shape]
    if list(arr.shape[-2:]) != shape[-2:]:
        return {
            "reason_code": "undecodable",
            "message": f"decoded slices are {arr.shape[-2]}x{arr.shape[-1]}, the header says {shape[-2]}x{shape[-1]}",
        }
    h = hashlib.sha256(f"{shape}|{st.n_slices}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return {"content_hash": h.hexdigest(), "min": float(arr.min()), "max": float(arr.max()), "shape": shape}


def _discover_nifti(
    files: list[str], root: Path, spec: DataSpec, pseudo: Pseudonymizer, cache: ScanCache | None, workers: int | None
) -> Discovery:
    from medxfer.io import nifti

    vols = [f for f in files if nifti.is_nifti(f)]
    disc = Discovery([], [], [], files_seen=len(vols), ignored_files=len(files) - len(vols))

    def one(path: str) -> tuple[Study, bool]:
        # `files` were walked under `root` as given: a resolved root would not be their prefix when the
        # root is reached through a symlink.
        rel = normalise_key(Path(os.path.relpath(path, root)).as_posix(), "nifti")
        size, mtime = _stat(path)
        st = Study(
            pseudo.study_key(rel),
            None,
            path,
            "nifti",
            files=[path],
            modality=spec.source.modality.upper() if spec.source.modality else "unknown",
        )
        rec = cache.get("n", path, size, mtime) if cache else None
        was_cached = rec is not None
        if rec is None:
            try:
                info = nifti.inspect(path, spec.dims)
                rec = {
                    "shape": info.shape,
                    "spacing": info.spacing,
                    "orientation": info.orientation,
                    "min": info.intensity_min,
                    "max": info.intensity_max,
                    "content_hash": info.content_hash,
                }
            except InputError as exc:
                rec = {"reason_code": exc.code, "message": exc.message}
            except Exception as exc:  # noqa: BLE001 - a reason, never a traceback (messages may quote the path)
                rec = {"reason_code": "unreadable", "message": f"could not be read ({type(exc).__name__})"}
            if cache:
                cache.put("n", path, size, mtime, rec)
        if rec.get("reason_code"):
            st.reason_code, st.message = rec["reason_code"], rec["message"]
        else:
            st.shape, st.spacing, st.orientation = rec["shape"], rec["spacing"], rec["orientation"]
            st.n_slices = rec["shape"][-1] if spec.dims == 3 else 1
            st.intensity_min, st.intensity_max, st.content_hash = rec["min"], rec["max"], rec["content_hash"]
        return st, was_cached

    n_threads = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_threads) as ex:
        done = list(ui.progress(ex.map(one, vols), total=len(vols), description="reading NIfTI volumes"))
    disc.studies = [st for st, _ in done]
    disc.files_cached = sum(1 for _, c in done if c)
    disc.files_read = len(done) - disc.files_cached
    return disc


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelRow:
    line: int
    key: str  # pseudonym
    label: str
    patient: str | None  # pseudonym


def read_labels(
    spec: DataSpec,
    pseudo: Pseudonymizer,
    csv_path: Path | None = None,
    need_label: bool = True,
    blank_lines: list[int] | None = None,
) -> list[LabelRow]:
    """Rows of the labels CSV (or a pinned-test CSV) with keys pseudonymised. Column problems raise SpecError.

    Rows with an empty key are skipped; their line numbers are appended to ``blank_lines`` when given.
    """
    path = csv_path or spec.labels_csv
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SpecError(f"{path}: cannot be read as CSV ({type(exc).__name__}); fix the file") from None
    wanted = [spec.labels.key] + ([spec.labels.column] if need_label else [])
    if need_label and spec.labels.patient:
        wanted.append(spec.labels.patient)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise SpecError(
            f"{path}: no column(s) {missing}; it has {list(df.columns)[:20]}. "
            "fix: rename the column or set labels.key/labels.column/labels.patient in the spec"
        )
    rows = []
    for i, rec in enumerate(df.to_dict(orient="records"), start=2):  # line 1 is the header
        raw_key = normalise_key(rec[spec.labels.key], spec.source.kind)
        if not raw_key:
            if blank_lines is not None:
                blank_lines.append(i)
            continue
        patient = None
        if need_label and spec.labels.patient and str(rec[spec.labels.patient]).strip():
            patient = pseudo.patient_key(str(rec[spec.labels.patient]))
        rows.append(LabelRow(i, pseudo.study_key(raw_key), str(rec.get(spec.labels.column, "")).strip(), patient))
    return rows


def _join(
    disc: Discovery, labels: list[LabelRow], spec: DataSpec, labels_csv: Path, pseudo: Pseudonymizer
) -> tuple[list[dict[str, Any]], list[Reject]]:
    rejects = list(disc.rejects)
    where = str(labels_csv)
    by_key: dict[str, list[LabelRow]] = defaultdict(list)
    for row in labels:
        by_key[row.key].append(row)
    studies_by_key: dict[str, list[Study]] = defaultdict(list)
    for st in disc.studies:
        studies_by_key[st.study_key].append(st)

    # Resolve each key's label, or the reason it has none.
    resolved: dict[str, LabelRow] = {}
    bad: dict[str, tuple[str, str, int]] = {}
    for key, rows in by_key.items():
        first = rows[0]
        if len({r.label for r in rows}) > 1 or len({r.patient for r in rows}) > 1:
            lines = ", ".join(str(r.line) for r in rows)
            bad[key] = ("duplicate_label", f"labels rows at lines {lines} give different labels/patients", first.line)
            continue
        for extra in rows[1:]:
            rejects.append(
                Reject(
                    where,
                    "duplicate_label",
                    f"same key and label as line {first.line}; kept line {first.line}",
                    key,
                    extra.line,
                )
            )
        if first.label not in spec.classes:
            msg = (
                # The value is not quoted: rejects.csv is shared, and a free-text label column may hold anything.
                f"the label at line {first.line} is not one of classes {spec.classes}"
                if first.label
                else f"empty label (line {first.line})"
            )
            bad[key] = ("unknown_class", msg, first.line)
            continue
        resolved[key] = first

    manifest: list[dict[str, Any]] = []
    for key in sorted(studies_by_key):
        group = studies_by_key[key]
        if len(group) > 1:
            for st in group:
                rejects.append(
                    Reject(st.input, "duplicate_study_key", f"{len(group)} different studies share this label key", key)
                )
            continue
        st = group[0]
        if st.reason_code:
            rejects.append(Reject(st.input, st.reason_code, st.message or "", key))
            continue
        if key in bad:
            code, msg, _ = bad[key]
            rejects.append(Reject(st.input, code, msg, key))
            continue
        row = resolved.get(key)
        if row is None:
            rejects.append(Reject(st.input, "no_label", "no row in the labels CSV for this study", key))
            continue
        # DICOM patients come from PatientID (in the header), NIfTI patients from labels.patient.
        patient = st.patient_key or row.patient or pseudo.patient_key("study:" + key)
        manifest.append(
            {
                "study_key": key,
                "patient_key": patient,
                "label": row.label,
                "label_index": spec.classes.index(row.label),
                "modality": st.modality,
                "manufacturer": st.manufacturer,
                "manufacturer_model": st.manufacturer_model,
                "source_kind": st.source_kind,
                "files": list(st.files),  # as walked; _Sharer makes them shareable (and resolves them)
                "n_slices": int(st.n_slices),
                "shape": [int(s) for s in st.shape],
                "spacing": [float(s) for s in st.spacing],
                "orientation": st.orientation,
                "intensity_min": float(st.intensity_min),
                "intensity_max": float(st.intensity_max),
                "content_hash": st.content_hash,
                "series_key": st.series_key,
            }
        )
    for key, rows in sorted(by_key.items(), key=lambda kv: kv[1][0].line):
        if key in studies_by_key:
            continue
        if key in bad:
            code, msg, line = bad[key]
            rejects.append(Reject(where, code, msg + "; and no study has this key", key, line))
        else:
            rejects.append(
                Reject(
                    where,
                    "label_without_study",
                    "no study under source.root has this key (its files may be rejected above)",
                    key,
                    rows[0].line,
                )
            )
    return manifest, rejects


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _stats(values: list[list[float]]) -> dict[str, Any]:
    if not values:
        return {}
    by_len: dict[int, list[list[float]]] = defaultdict(list)
    for v in values:
        by_len[len(v)].append(v)
    n, vs = max(by_len.items(), key=lambda kv: len(kv[1]))
    a = np.asarray(vs, float)
    return {
        "min": a.min(axis=0).round(4).tolist(),
        "median": np.median(a, axis=0).round(4).tolist(),
        "max": a.max(axis=0).round(4).tolist(),
    }


def _common(values: list[list[Any]], fmt: str = "{}") -> dict[str, int]:
    c = Counter("x".join(fmt.format(x) for x in v) for v in values)
    return dict(c.most_common(10))


@dataclass
class IngestResult:
    spec_name: str
    workspace: Path
    manifest_path: Path
    rejects_path: Path
    report_path: Path
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        r = self.report
        keys = (
            "n_studies",
            "n_patients",
            "class_counts",
            "imbalance_ratio",
            "n_rejects",
            "rejects_by_reason",
            "files",
            "spec_hash",
            "manifest_hash",
            "elapsed_s",
            "source_kind",
        )
        return {
            "stage": "ingest",
            "spec": self.spec_name,
            **{k: r[k] for k in keys},
            "outputs": {
                "manifest": str(self.manifest_path),
                "rejects": str(self.rejects_path),
                "report": str(self.report_path),
            },
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        r = self.report
        rows = [
            ("studies", f"{r['n_studies']} usable ({r['n_patients']} patients)"),
            ("classes", ", ".join(f"{k} {v}" for k, v in r["class_counts"].items())),
            ("imbalance", f"{r['imbalance_ratio']:.2f}" if r["imbalance_ratio"] else "n/a"),
            (
                "rejected",
                f"{r['n_rejects']}"
                + (
                    " (" + ", ".join(f"{k} {v}" for k, v in r["rejects_by_reason"].items()) + ")"
                    if r["n_rejects"]
                    else ""
                ),
            ),
            ("files", f"{r['files']['seen']} seen, {r['files']['read']} read, {r['files']['cached']} cached"),
            ("time", f"{r['elapsed_s']:.1f} s"),
            ("manifest", str(self.manifest_path)),
        ]
        return f"ingest {self.spec_name}", rows


def ingest(spec: DataSpec, workspace: Path, strict: bool = False, workers: int | None = None) -> IngestResult:
    """Run the ingest stage for one spec; see the module docstring for what it writes."""
    t0 = time.perf_counter()
    problems = [p for p in check_spec_files(spec) if not p.startswith("split.")]
    if problems:
        raise SpecError(f"{spec.spec_path}:\n  - " + "\n  - ".join(problems))
    # One writer per spec's workspace: two ingests at once interleaved their manifest, map and cache writes.
    with Workspace.for_spec(workspace, spec.name).locked("ingest") as ws, _gc_paused():
        return _ingest(spec, ws, t0, strict, workers)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during the stage: it builds ~10 objects a file that all stay alive until the
    manifest is written, so every collection walks a growing heap for nothing (the 5,000-file header scan:
    0.62 -> 0.43 s). Reference counting still frees everything; the collector runs again afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _ingest(spec: DataSpec, ws: Workspace, t0: float, strict: bool, workers: int | None) -> IngestResult:
    pseudo = Pseudonymizer.for_workspace_root(ws.root)
    # Cached headers hold pseudonyms only; without the map their originals could not be recorded again.
    cache = ScanCache(ws.scan_cache, pseudo, load=ws.pseudonym_map.is_file())
    root = spec.root
    exclude = {spec.labels_csv.resolve()}
    if spec.spec_path:
        exclude.add(spec.spec_path.resolve())
    if spec.split.pinned_test:
        exclude.add(spec.resolve(spec.split.pinned_test).resolve())
    walked: dict[str, tuple[int, int, bool]] = {}
    files, hidden, dangling = _walk(root, exclude, walked)
    ui.info(f"ingest {spec.name}: {len(files)} files under source.root")
    if spec.source.kind == "dicom":
        disc = _discover_dicom(files, spec, pseudo, cache, workers, decode="full", walked=walked)
    else:
        disc = _discover_nifti(files, root, spec, pseudo, cache, workers)
    disc.hidden_skipped = hidden
    disc.rejects[:0] = _dangling_rejects(dangling)
    blank: list[int] = []
    labels = read_labels(spec, pseudo, blank_lines=blank)
    rows, rejects = _join(disc, labels, spec, spec.labels_csv, pseudo)
    rejects += [
        Reject(str(spec.labels_csv), "blank_key", f"the {spec.labels.key!r} column is empty; row skipped", line=line)
        for line in blank
    ]

    sharer = _Sharer(root, pseudo, walked)
    for row in rows:
        row["files"] = sharer.files(row["files"])
    rej_inputs = [sharer.reject_input(r) for r in rejects]
    # The maps first: a reader never meets a manifest whose paths or keys it cannot resolve (a disk that fills up
    # after the manifest once left new keys the pseudonym map did not hold; the map merges, so old keys stay).
    write_file_map(ws.file_map, sharer.mapping)
    pseudo.write_map(ws.pseudonym_map)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("study_key").reset_index(drop=True)
    # Each file is replaced whole, so a reader (train, or a user's notebook) never sees half a manifest.
    with atomic_path(ws.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    rej_df = pd.DataFrame(
        [(i, r.reason_code, r.message, r.study_key) for i, r in zip(rej_inputs, rejects, strict=True)],
        columns=REJECT_COLUMNS,
    )
    with atomic_path(ws.rejects) as tmp:
        rej_df.to_csv(tmp, index=False)
    if spec.source.kind == "dicom":
        sel = pd.DataFrame(disc.series_log, columns=["study_key", "series_key", "chosen", "reason_code", "message"])
        with atomic_path(ws.series_selection) as tmp:
            sel.to_csv(tmp, index=False)
    cache.save()

    counts = {c: int((manifest["label"] == c).sum()) for c in spec.classes}
    nonzero = [v for v in counts.values() if v]
    warnings = []
    if disc.no_patient_id:
        warnings.append(f"{disc.no_patient_id} studies have no PatientID; each is treated as its own patient")
    if spec.source.kind == "nifti" and not spec.labels.patient:
        warnings.append(
            "labels.patient is not set: every volume is treated as a different patient, so one "
            "patient's volumes may end up in different splits"
        )
    if disc.hidden_skipped:
        warnings.append(f"{disc.hidden_skipped} hidden files/folders (names starting with '.') were skipped")
    if disc.ignored_files:
        warnings.append(f"{disc.ignored_files} files under source.root are not NIfTI and were ignored")
    not_chosen = Counter(r["reason_code"] for r in disc.series_log if not r["chosen"])
    report = {
        "spec": spec.name,
        "spec_hash": spec.content_hash(),
        "source_kind": spec.source.kind,
        "manifest_hash": manifest_content_hash(manifest),
        "n_studies": len(manifest),
        "n_patients": int(manifest["patient_key"].nunique()),
        "class_counts": counts,
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 4) if len(nonzero) == len(counts) else None,
        "n_rejects": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason_code for r in rejects).items())),
        "series_not_chosen_by_reason": dict(sorted(not_chosen.items())),
        "modalities": dict(Counter(manifest["modality"])),
        "studies_per_patient": dict(sorted(Counter(Counter(manifest["patient_key"]).values()).items())),
        "shape": {"common": _common(manifest["shape"].tolist()), **_stats(manifest["shape"].tolist())},
        "spacing": {"common": _common(manifest["spacing"].tolist(), "{:g}"), **_stats(manifest["spacing"].tolist())},
        "orientation": dict(Counter(manifest["orientation"])),
        "duplicate_content_groups": int((manifest["content_hash"].value_counts() > 1).sum()),
        "files": {
            "seen": disc.files_seen,
            "read": disc.files_read,
            "cached": disc.files_cached,
            "header_fallbacks": disc.header_fallbacks,
            "hidden_skipped": disc.hidden_skipped,
            "ignored": disc.ignored_files,
        },
        "warnings": warnings,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    write_text_atomic(ws.ingest_report, json.dumps(report, indent=2, default=json_default) + "\n")
    for w in warnings:
        ui.warn(w)
    result = IngestResult(spec.name, ws.dir, ws.manifest, ws.rejects, ws.ingest_report, report)

    top = ", ".join(f"{k} {v}" for k, v in Counter(r.reason_code for r in rejects).most_common(4))
    if manifest.empty:
        raise StageError(
            f"ingest {spec.name}: nothing usable; {len(rejects)} input(s) rejected ({top}). "
            f"See {ws.rejects} for each input and its reason."
        )
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise StageError(
            f"ingest {spec.name}: class(es) {empty} have no usable studies ({counts}). Check "
            f"labels.column and the class names in the spec, and {ws.rejects} for rejected studies."
        )
    if strict and rejects:
        raise StageError(f"ingest {spec.name} --strict: {len(rejects)} input(s) rejected ({top}); see {ws.rejects}")
    return result


# ---------------------------------------------------------------------------------------------
# Predict-time discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class InputItem:
    input: str
    source_kind: str
    files: list[str] | None
    reason_code: str | None = None
    message: str | None = None


def _expand(paths: Iterable[Path]) -> list[tuple[Path, bool | str]]:
    """(path, exists) for every input; CSVs with a 'path' column expand to their rows (relative to the CSV).

    A CSV that cannot be expanded gives (csv, reason code) instead: one bad input never fails the batch.
    """
    out: list[tuple[Path, bool | str]] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.suffix.lower() == ".csv":
            try:
                df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                out.append((p, "unreadable"))
                continue
            if "path" not in df.columns:
                out.append((p, "no_path_column"))
                continue
            for v in df["path"]:
                if str(v).strip():
                    q = Path(str(v).strip())
                    q = q if q.is_absolute() else p.parent / q
                    out.append((q, q.exists()))
        else:
            out.append((p, p.exists()))
    return out


def resolve_inputs(paths: list[Path], spec: DataSpec, workers: int | None = None) -> list[InputItem]:
    """Find studies in folders/files/CSVs the way ingest does (same series rules and checks), for predict.

    One InputItem per study found, or per input that is unusable (with a reason code). ``input`` is the
    path given when it holds exactly one study, else the study's folder (or file): a local path.
    """
    from medxfer.io import nifti

    items: list[InputItem] = []
    pseudo = Pseudonymizer.ephemeral()
    for p, exists in _expand(paths):
        if exists is not True:
            code = "not_found" if exists is False else str(exists)
            msg = {"not_found": "input does not exist", "unreadable": "input CSV could not be parsed"}.get(
                code, "an input CSV needs a 'path' column (one study folder or file per row)"
            )
            items.append(InputItem(str(p), spec.source.kind, None, code, msg))
            continue
        if p.is_file():
            files, dangling = [str(p)], []
        else:
            files, _, dangling = _walk(p, set())
        items += [
            InputItem(r.input, spec.source.kind, None, r.reason_code, r.message) for r in _dangling_rejects(dangling)
        ]
        if spec.source.kind == "nifti":
            vols = [f for f in files if nifti.is_nifti(f)]
            if not vols:
                items.append(InputItem(str(p), "nifti", None, "not_nifti", "no .nii/.nii.gz file found"))
            for f in vols:
                try:
                    nifti.inspect(f, spec.dims)
                    items.append(InputItem(f, "nifti", [f]))
                except InputError as exc:
                    items.append(InputItem(f, "nifti", None, exc.code, exc.message))
                except Exception as exc:  # noqa: BLE001 - a reason, never a traceback
                    items.append(InputItem(f, "nifti", None, "unreadable", f"could not be read ({type(exc).__name__})"))
            continue
        disc = _discover_dicom(files, spec, pseudo, None, workers, decode="check")
        for r in disc.rejects:
            items.append(InputItem(r.input, "dicom", None, r.reason_code, r.message))
        single = len(disc.studies) == 1
        for st in disc.studies:
            label = str(p) if single else st.input
            if st.reason_code:
                items.append(InputItem(label, "dicom", None, st.reason_code, st.message))
            else:
                items.append(InputItem(label, "dicom", list(st.files)))
        if not disc.studies and not disc.rejects:
            items.append(InputItem(str(p), "dicom", None, "not_dicom", "no files found"))
    return items

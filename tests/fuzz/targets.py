"""Fuzz targets: bytes in, and either a clean result or a documented refusal out. Anything else is a crash.

Shared by the atheris harness (tests/fuzz/harness.py), the fallback byte mutator (tests/fuzz/mutate.py) and the
regression replay (tests/fuzz/test_fuzz.py). Each target writes the bytes to a scratch file, because every reader
under test takes a path, as ingest and predict give it one.

  dicom_header  medxfer.io.dicom.read_header (the per-file entry of ingest's scan_headers): documented never to
                raise; the Header's error, when set, must be a code of medxfer.io.checks.REASONS.
  dicom_fast    medxfer.io.dicom_header.read_header_fast + native_layout/native_array, the byte-level reader
                read_header uses first: a dict or None (pydicom's turn), never an exception.
  nifti         medxfer.io.nifti.inspect + read_volume: only checks.InputError (NiftiError) with a REASONS code.
                The first byte picks .nii (even) or .nii.gz of the rest (odd), so gzip's CRC does not eat the
                mutations.
  spec          medxfer.config.spec.load_spec + check_spec_files + content_hash: only SpecError.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from medxfer.config import spec as spec_mod
from medxfer.io import checks, dicom, nifti
from medxfer.io.phi import Pseudonymizer

_SCRATCH = Path(tempfile.mkdtemp(prefix="medxfer-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_PSEUDO = Pseudonymizer.ephemeral()


class Crash(AssertionError):
    """A target broke its contract without raising (e.g. an unknown reason code)."""


def _write(name: str, data: bytes) -> Path:
    p = _SCRATCH / name
    p.write_bytes(data)
    return p


def _check_header(h: object) -> None:
    err = getattr(h, "error", None)
    if err is not None and err not in checks.REASONS:
        raise Crash(f"reason code {err!r} is not in checks.REASONS")


def dicom_header(data: bytes) -> None:
    _check_header(dicom.read_header(str(_write("f.dcm", data)), _PSEUDO))


def _fast_reader():
    if importlib.util.find_spec("medxfer.io.dicom_header") is None:
        return None
    import medxfer.io.dicom_header as fast

    return fast if hasattr(fast, "read_header_fast") else None


def dicom_fast(data: bytes) -> None:
    """The byte-level reader on its own: a header dict or None (pydicom's turn), never an exception; and the
    native pixel view it offers must fit the bytes it came from."""
    fast = _fast_reader()
    if fast is None:
        return
    path = str(_write("g.dcm", data))
    fast.read_native_pixels(path)
    hdr = fast.read_header_fast(path)
    if hdr is None:
        return
    layout = fast.native_layout(hdr)
    if layout is not None:
        fast.native_array(layout, hdr["buffer"])


def nifti_file(data: bytes) -> None:
    if data[:1] and data[0] & 1:
        p = _write("v.nii.gz", gzip.compress(data[1:], compresslevel=1))
    else:
        p = _write("v.nii", data[1:])
    for dims in (2, 3):
        try:
            nifti.inspect(p, dims)
        except checks.InputError as exc:
            if exc.code not in checks.REASONS:
                raise Crash(f"reason code {exc.code!r} is not in checks.REASONS") from exc
    with contextlib.suppress(checks.InputError):
        nifti.read_volume(p)


def spec_file(data: bytes) -> None:
    p = _write("spec.yaml", data)
    try:
        s = spec_mod.load_spec(p)
    except spec_mod.SpecError:
        return
    spec_mod.check_spec_files(s)
    s.content_hash()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dicom_header": dicom_header,
    "dicom_fast": dicom_fast,
    "nifti": nifti_file,
    "spec": spec_file,
}


def available() -> list[str]:
    return [t for t in TARGETS if t != "dicom_fast" or _fast_reader() is not None]

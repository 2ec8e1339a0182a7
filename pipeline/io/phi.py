"""Pseudonyms for patients and studies, and a scanner that proves PHI did not leak.

Identifiers are replaced by HMAC-SHA256 pseudonyms under a secret key, so the
same patient gets the same key on every run (splits stay stable) while nobody
without the key can recompute or reverse them. The key comes from
``MEDXFER_PSEUDONYM_KEY`` or from a key file created once, mode 0600, in the
workspace root. The only way back from a pseudonym to the original is the
local ``pseudonym_map.csv`` in the workspace.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import os
import secrets
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medxfer.core.errors import MedxferError

KEY_ENV = "MEDXFER_PSEUDONYM_KEY"
_HEX = 20
# Distinct prefixes inside the HMAC keep a PatientID and a StudyInstanceUID that happen to be
# equal strings from mapping to the same digest.
_KINDS = {"st": b"study\x00", "pt": b"patient\x00", "se": b"series\x00", "fr": b"frame-of-reference\x00"}


def load_key(key_file: Path) -> bytes:
    """The secret: the environment wins, else the key file (created on first use, owner-only)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    if key_file.is_file():
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            raise MedxferError(
                f"pseudonym key file {key_file} is readable by others (mode {mode:o}); fix: chmod 600 {key_file}"
            )
        key = key_file.read_bytes().strip()
        if len(key) < 32:
            raise MedxferError(
                f"pseudonym key file {key_file} is too short; delete it only if no pseudonyms "
                "made with it are still needed, or set MEDXFER_PSEUDONYM_KEY"
            )
        return key
    return _create_key(key_file)


def _create_key(key_file: Path) -> bytes:
    """Write a new key so that exactly one of several racing stages wins and every reader sees a whole key.

    The key is written, fsynced and closed under a unique temporary name, then hard-linked into place: link fails
    when the name exists (O_EXCL's semantics), so a loser reads the winner's complete file. Creating the key file
    itself with O_EXCL let a reader open it between create and write: "pseudonym key file is too short" in 1 of
    22 concurrent ingest pairs.
    """
    import tempfile

    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd, tmp = tempfile.mkstemp(prefix=f"{key_file.name}.", suffix=".tmp", dir=key_file.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            return load_key(key_file)
        except OSError:
            # A file system without hard links: rename only if the name is still free (a small window remains).
            if key_file.exists():
                return load_key(key_file)
            os.replace(tmp, key_file)
        return key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms; remembers originals it has seen so the map can be written once."""

    def __init__(self, key: bytes, remember: bool = True):
        self._key = key
        self._remember = remember
        self._seen: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_workspace_root(cls, root: Path) -> Pseudonymizer:
        from medxfer.core.workspace import Workspace

        return cls(load_key(Workspace(Path(root), "_").key_file))

    @classmethod
    def ephemeral(cls) -> Pseudonymizer:
        """A throwaway key for grouping only (predict): nothing is remembered or written."""
        return cls(secrets.token_bytes(32), remember=False)

    @property
    def fingerprint(self) -> str:
        """Identifies the key without revealing it: caches made under another key are invalid."""
        return hmac.new(self._key, b"fingerprint", hashlib.sha256).hexdigest()[:16]

    def pseudonym(self, kind: str, original: str) -> str:
        digest = hmac.new(self._key, _KINDS[kind] + original.encode(), hashlib.sha256).hexdigest()[:_HEX]
        out = f"{kind}-{digest}"
        if self._remember and out not in self._seen:
            with self._lock:
                self._seen[out] = (kind, original)
        return out

    def study_key(self, original: str) -> str:
        return self.pseudonym("st", str(original).strip())

    def patient_key(self, original: str) -> str:
        return self.pseudonym("pt", str(original).strip())

    def series_key(self, original: str) -> str:
        return self.pseudonym("se", str(original).strip())

    def write_map(self, path: Path) -> int:
        """Merge what was seen into the local map file (owner-only). Returns the number of entries."""
        rows: dict[str, tuple[str, str]] = {}
        if path.is_file():
            with path.open(newline="") as fh:
                for r in csv.DictReader(fh):
                    rows[r["pseudonym"]] = (r["kind"], r["original"])
        rows.update(self._seen)
        from medxfer.core.workspace import atomic_path

        with atomic_path(path, mode=0o600) as tmp, tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pseudonym", "kind", "original"])
            for k in sorted(rows):
                w.writerow([k, *rows[k]])
        return len(rows)


@dataclass(frozen=True)
class PhiHit:
    where: str  # file path (or "<text>") and, for files, the line number
    needle: str


def scan_for_phi(
    paths_or_text: str | Path | Iterable[str | Path], needles: Iterable[str], exclude: Iterable[str | Path] = ()
) -> list[PhiHit]:
    """Find planted strings in text, files or whole folders (binary files too: sqlite, parquet).

    Matching is case-insensitive and also tries the DICOM person-name form with '^' replaced
    by a space, so "DOE^JANE" is found when rendered as "DOE JANE".
    """
    variants = set()
    for n in needles:
        n = str(n)
        if not n:
            continue
        variants |= {n.lower(), n.replace("^", " ").lower(), n.replace("^", ", ").lower()}
    needles_b = [v.encode() for v in sorted(variants)]
    excluded = {Path(p).resolve() for p in exclude}
    hits: list[PhiHit] = []

    def scan_bytes(blob: bytes, where: str) -> None:
        low = blob.lower()
        for nb in needles_b:
            i = low.find(nb)
            if i >= 0:
                line = low.count(b"\n", 0, i) + 1
                hits.append(PhiHit(f"{where}:{line}", nb.decode()))

    items = [paths_or_text] if isinstance(paths_or_text, str | Path) else paths_or_text
    for item in items:
        if isinstance(item, str) and ("\n" in item or not Path(item).exists()):
            scan_bytes(item.encode(), "<text>")
            continue
        p = Path(item)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            if f.resolve() in excluded:
                continue
            scan_bytes(_readable_bytes(f), str(f))
    return hits


def _readable_bytes(f: Path) -> bytes:
    """File content as a person would see it: compressed formats are opened, not matched as raw bytes."""
    raw = f.read_bytes()
    if f.suffix == ".gz":
        import gzip

        try:
            return raw + gzip.decompress(raw)
        except (OSError, EOFError):
            return raw
    if f.suffix == ".parquet":
        import io

        import pandas as pd

        try:
            return raw + pd.read_parquet(io.BytesIO(raw)).to_csv(index=False).encode()
        except Exception:  # a corrupt parquet is still scanned byte-wise
            return raw
    return raw

"""Pseudonyms for patients and studies, and a scanner that proves PHI did not leak.

Identifiers are replaced by HMAC-SHA256 pseudonyms under a secret key, so the
same patient gets the same key on every run (splits stay stable) while nobody
without the key can recompute or reverse them. The key comes from
``MEDXFER_PSEUDONYM_KEY`` or from a key file created once, mode 0600, in the
workspace root. The only way back from a pseudonym to the original is the
local ``pseudonym_map.csv`` in the workspace. Paths get the same treatment (``shareable_path``):
relative to ``source.root``, every non-generic folder/file name an HMAC pseudonym; the real paths stay in
the local ``file_map.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import os
import re
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
_KINDS = {
    "st": b"study\x00",
    "pt": b"patient\x00",
    "se": b"series\x00",
    "fr": b"frame-of-reference\x00",
    "pa": b"path-component\x00",
    "in": b"predict-input\x00",
    "ca": b"scan-cache-key\x00",
}
# 16 hex digits (64 bits) for a path component: 100,000 distinct folder/file names collide with probability
# ~3e-10; ingest refuses a collision anyway (two real files behind one shareable path).
_PATH_HEX = 16


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


def existing_key(key_file: Path) -> bytes | None:
    """The workspace secret when there is one (environment or an existing key file); never creates a key."""
    if os.environ.get(KEY_ENV) or key_file.is_file():
        return load_key(key_file)
    return None


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

    def digest(self, kind: str, original: str, n: int = _HEX) -> str:
        """A keyed digest that is not remembered for the map (path components, cache keys, predict inputs)."""
        return hmac.new(self._key, _KINDS[kind] + original.encode(), hashlib.sha256).hexdigest()[:n]

    def input_key(self, original: str) -> str:
        """Pseudonym of a predict input string (``in-...``): the same input gives the same key under one key."""
        return "in-" + self.digest("in", str(original))

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


# ---------------------------------------------------------------------------------------------
# Shareable paths
# ---------------------------------------------------------------------------------------------

# A folder or file name is kept in clear only when it is generic: one of these words (any case), optionally
# followed by a separator and at most 5 digits, or at most 5 digits alone: "DICOM", "IM0001", "series1",
# "SE2", "img_003.dcm", "case_00012.nii.gz", "001". Everything else is replaced by a pseudonym: sites name
# folders after patients ("Doe^John"), MRNs ("MRN-0012345"), birth dates ("19650312", 8 digits: more than 5),
# institutions, and DICOM UIDs (the very identifiers the study/series keys pseudonymise). Words that name a
# person-level index ("patient", "subject", "sub", "pat", "p") are left out on purpose: "patient_0042" is a
# pseudonym then.
_GENERIC_TEXT = (
    "dicom dicomdir dcm im img image images series ser se study studies st scan scans slice slices vol "
    "volume volumes case cases data file files frame frames i s mr ct us cr dx nm mg xa rf ot seg mask "
    "masks label labels labelstr imagestr imagests labelsts train training test testing val valid "
    "validation raw nifti nii export exports input inputs readme license citation notice"
)
_GENERIC_WORDS = frozenset(_GENERIC_TEXT.split())
_GENERIC_RE = re.compile(r"^(?:(?:" + "|".join(sorted(_GENERIC_WORDS)) + r")[-_ .]?)?\d{0,5}$", re.IGNORECASE)
# Extensions kept on a pseudonymised name (a reader can still tell a NIfTI from a DICOM file); any other
# suffix is part of the name and is pseudonymised with it.
_KEPT_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".img", ".hdr", ".csv", ".txt", ".json", ".png")


def _split_suffix(name: str) -> tuple[str, str]:
    low = name.lower()
    for suf in _KEPT_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf) :]
    return name, ""


def is_generic_name(name: str) -> bool:
    """True for a folder/file name that identifies nobody (see ``_GENERIC_WORDS``); "" and "." are not names."""
    stem, _ = _split_suffix(name)
    return bool(stem) and stem not in (".", "..") and _GENERIC_RE.match(stem) is not None


def shareable_name(name: str, pseudo: Pseudonymizer) -> str:
    """``name`` if generic, else ``p-<16 hex>`` (HMAC of the whole name) with its known extension kept."""
    if is_generic_name(name):
        return name
    _, suffix = _split_suffix(name)
    return f"p-{pseudo.digest('pa', name, _PATH_HEX)}{suffix}"


def shareable_path(path: str | os.PathLike[str], root: str | os.PathLike[str], pseudo: Pseudonymizer) -> str:
    """``path`` relative to ``root`` (POSIX separators), each non-generic component a pseudonym.

    A path outside ``root`` keeps only its (pseudonymised) name: where it lies says nothing a teammate needs,
    and the file map (local) has the real path.
    """
    p = os.fspath(path)
    rel = os.path.relpath(p, os.fspath(root)) if os.path.isabs(p) == os.path.isabs(os.fspath(root)) else p
    if rel == ".":
        return "."
    parts = Path(rel).parts
    if not parts or parts[0] == ".." or Path(rel).is_absolute():
        parts = (Path(p).name,)
    return "/".join(shareable_name(c, pseudo) for c in parts)


class PathSharer:
    """``shareable_path`` for many paths under one root, memoised per folder and per name.

    A tree repeats its folder names in every path: memoising made 100,000 paths of a 4-level tree ~10x faster
    than calling ``shareable_path`` for each (128 us per path before).
    """

    def __init__(self, root: str | os.PathLike[str], pseudo: Pseudonymizer):
        self.root = os.path.abspath(os.fspath(root))
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self.pseudo = pseudo
        self._names: dict[str, str] = {}
        self._dirs: dict[str, str] = {}

    def name(self, name: str) -> str:
        got = self._names.get(name)
        if got is None:
            got = self._names[name] = shareable_name(name, self.pseudo)
        return got

    def __call__(self, path: str | os.PathLike[str]) -> str:
        p = os.fspath(path)
        if not p.startswith(self._prefix) or os.sep + ".." + os.sep in p:  # not plainly under the root
            return shareable_path(p, self.root, self.pseudo)
        d, base = os.path.split(p[len(self._prefix) :])
        if not d:
            return self.name(base)
        shared_dir = self._dirs.get(d)
        if shared_dir is None:
            shared_dir = self._dirs[d] = "/".join(self.name(c) for c in d.split(os.sep) if c)
        return f"{shared_dir}/{self.name(base)}"


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

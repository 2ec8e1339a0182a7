"""Where each stage reads and writes: ``<workspace>/<spec name>/...``.

One place owns the layout so stages never build paths by hand. Folders are
created lazily, when a stage first writes.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from medxfer.core.errors import MedxferError

DEFAULT_WORKSPACE = Path("medxfer-work")
LOCK_TIMEOUT_ENV = "MEDXFER_LOCK_TIMEOUT_S"
# Ingest of the 200-study demo spec takes ~3 s, so 10 s lets a second stage wait out a short one and still
# refuses quickly when a long one holds the workspace.
DEFAULT_LOCK_TIMEOUT_S = 10.0
# Locks this thread holds, by path: a stage that calls another stage on the same workspace must not wait on
# itself (flock locks belong to the open file, so a second open in one process would block). Other threads
# open their own file and so wait like another process.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


class WorkspaceBusy(MedxferError):
    """Another stage holds the workspace lock of this spec."""


@contextmanager
def atomic_path(path: Path, mode: int | None = None, durable: bool = True) -> Iterator[Path]:
    """A unique temporary file next to ``path``, fsync'd and moved onto it when the block succeeds (removed if it
    fails). ``durable=False``: no fsyncs, for a file that a power loss may tear (a cache that then reads as none).

    A fixed temp name (``path.with_suffix('.tmp')``) let two ingests of one spec rename each other's temp file
    away: ``FileNotFoundError .scan_cache.tmp -> .scan_cache.parquet`` in 2 of 22 concurrent pairs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if mode is None:
        # mkstemp makes 0600; an ordinary workspace file gets the mode a plain write would give it.
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    try:
        yield Path(tmp)
        # fsync before the rename: a crash or power loss after it must find the whole new file or the old one,
        # never a renamed empty one (ext4's delayed allocation allows that without it).
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            with suppress(OSError):  # the rename itself, where the filesystem lets a directory be fsync'd
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)


def lock_timeout_s() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        msg = f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; fix: e.g. {LOCK_TIMEOUT_ENV}=30"
        raise MedxferError(msg) from None


@dataclass(frozen=True)
class Workspace:
    root: Path
    name: str

    @classmethod
    def for_spec(cls, workspace: str | Path, spec_name: str) -> Workspace:
        return cls(Path(workspace).resolve(), spec_name)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def ensure(self) -> Workspace:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def lock_file(self) -> Path:
        return self.dir / ".lock"

    @contextmanager
    def locked(self, stage: str, timeout_s: float | None = None) -> Iterator[Workspace]:
        """Hold ``<workspace>/<spec>/.lock`` while a stage writes this spec's files.

        A second stage waits up to ``timeout_s`` (default ``MEDXFER_LOCK_TIMEOUT_S``, else 10 s) and then refuses
        with the holder's stage and pid. The lock is the kernel's (flock), so a crashed holder frees it at once.
        """
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked, as before
            yield self
            return
        self.ensure()
        key = f"{self.lock_file}:{threading.get_ident()}"
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key] += 1
                reentered = True
            else:
                reentered = False
        if reentered:
            try:
                yield self
            finally:
                with _HELD_GUARD:
                    _HELD[key] -= 1
            return
        wait = lock_timeout_s() if timeout_s is None else timeout_s
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another stage"
                        raise WorkspaceBusy(
                            f"workspace {self.dir} is busy: {holder} is writing it (waited {wait:g} s); fix: wait "
                            f"for it to finish, or raise {LOCK_TIMEOUT_ENV}; if no such process runs, simply retry"
                        ) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{stage} (pid {os.getpid()})\n".encode(), 0)
            with _HELD_GUARD:
                _HELD[key] = 1
            try:
                yield self
            finally:
                with _HELD_GUARD:
                    del _HELD[key]
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the file releases the flock

    # ingest
    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.parquet"

    @property
    def rejects(self) -> Path:
        return self.dir / "rejects.csv"

    @property
    def ingest_report(self) -> Path:
        return self.dir / "ingest_report.json"

    @property
    def scan_cache(self) -> Path:
        """Header-scan cache for incremental re-ingest, keyed by keyed hashes of paths; holds no path or free text."""
        return self.dir / ".scan_cache.parquet"

    @property
    def series_selection(self) -> Path:
        """Every DICOM series ingest saw, chosen or not, and why (pseudonymous keys only)."""
        return self.dir / "series_selection.csv"

    @property
    def pseudonym_map(self) -> Path:
        """Pseudonym -> original identifier. PHI: local only, never logged or tracked."""
        return self.dir / "pseudonym_map.csv"

    @property
    def file_map(self) -> Path:
        """Shareable path (manifest ``files``, rejects ``input``) -> real path. Local only, like the pseudonym map."""
        return self.dir / "file_map.csv"

    # split
    @property
    def splits(self) -> Path:
        return self.dir / "splits.csv"

    @property
    def split_report(self) -> Path:
        return self.dir / "split_report.json"

    # train
    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    # shared across specs in one workspace
    @property
    def key_file(self) -> Path:
        return self.root / ".pseudonym_key"

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins; otherwise an embedded sqlite store inside the workspace."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

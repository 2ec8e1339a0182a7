"""Where each stage reads and writes: ``<workspace>/<spec name>/...``.

One place owns the layout so stages never build paths by hand. Folders are
created lazily, when a stage first writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = Path("medxfer-work")


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
        """Header-scan cache keyed by (path, size, mtime), for incremental re-ingest. Holds paths: local only."""
        return self.dir / ".scan_cache.parquet"

    @property
    def series_selection(self) -> Path:
        """Every DICOM series ingest saw, chosen or not, and why (pseudonymous keys only)."""
        return self.dir / "series_selection.csv"

    @property
    def pseudonym_map(self) -> Path:
        """Pseudonym -> original identifier. PHI: local only, never logged or tracked."""
        return self.dir / "pseudonym_map.csv"

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

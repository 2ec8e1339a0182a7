"""The manifest and its split, read and joined in one place, and the hashes that name what they cover.

Two different hashes cover the manifest, and their names say which part:

- ``manifest_content_hash``: every column but ``files`` (the paths), so moving the data folder does not change it.
  Ingest and split write it into their reports under the key ``manifest_hash``.
- ``labelled_content_hash``: only (study_key, content_hash, label_index), i.e. which pixels carry which label. A
  checkpoint records it as ``hashes["labelled_content"]`` (MLflow param ``hash.labelled_content``, registered tag
  ``labelled_content_hash``); a resume refuses to continue when it changed.

``files`` on disk are shareable paths (relative to ``source.root``, identifying names pseudonymised by
``medxfer.io.phi.shareable_path``); ``read_manifest`` turns them back into real paths through the local
``file_map.csv`` that ingest writes next to the pseudonym map. Neither hash covers ``files``.

``join`` reads manifest.parquet and splits.csv, picks the k-fold validation fold, refuses a split that names
studies the manifest lacks, and gives each manifest row its split: training, evaluation and export all read
the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from medxfer.config.spec import DataSpec
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import Workspace

MANIFEST_COLUMNS = [
    "study_key",
    "patient_key",
    "label",
    "label_index",
    "modality",
    "manufacturer",
    "manufacturer_model",
    "source_kind",
    "files",
    "n_slices",
    "shape",
    "spacing",
    "orientation",
    "intensity_min",
    "intensity_max",
    "content_hash",
    "series_key",
]
# What each of a checkpoint's hashes covers, in words for the message that refuses a resume.
HASH_NAMES = {"spec": "spec", "labelled_content": "labelled image content (manifest)", "split": "split"}
# Checkpoints written before the names were split called the labelled-content hash "manifest".
_OLD_HASH_KEYS = {"manifest": "labelled_content"}


def read_manifest(path: Path, columns: list[str] | None = None, resolve: bool = True) -> pd.DataFrame:
    """The manifest with list columns as Python lists (parquet gives numpy arrays).

    On disk ``files`` holds shareable paths (relative to ``source.root``, identifying names pseudonymised);
    with ``resolve`` (the default: every stage that opens files) they come back as the real paths, through
    the workspace's local file map. ``resolve=False`` gives the shareable form.
    """
    df = pd.read_parquet(path, columns=columns)
    for c in ("files", "shape", "spacing"):
        if c in df.columns:
            df[c] = df[c].map(lambda v: [x.item() if isinstance(x, np.generic) else x for x in v])
    if resolve and "files" in df.columns:
        df["files"] = resolve_files(df["files"].tolist(), file_map_of(Path(path)))
    return df


# --------------------------------------------------------------------------- the file map (local side)

FILE_MAP_COLUMNS = ["shared", "path"]


def file_map_of(manifest_path: Path) -> Path:
    """The file map that belongs to a manifest: next to it, in the same spec's workspace folder."""
    d = Path(manifest_path).parent
    return Workspace(d.parent, d.name).file_map


def write_file_map(path: Path, mapping: dict[str, str]) -> None:
    """Shareable path -> real path, owner-only (0600) like the pseudonym map, merged into what is there.

    Merged, not replaced: the map is written before the manifest, so an ingest that fails after it (disk full)
    leaves the previous manifest, whose paths must still resolve. A new real path for a known shareable one
    (the data folder moved) replaces the old.
    """
    from medxfer.core.workspace import atomic_path

    rows = {**read_file_map(path), **mapping}
    with atomic_path(path, mode=0o600) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FILE_MAP_COLUMNS)
        for k in sorted(rows):
            w.writerow([k, rows[k]])


def read_file_map(path: Path) -> dict[str, str]:
    if not Path(path).is_file():
        return {}
    with Path(path).open(newline="") as fh:
        return {r["shared"]: r["path"] for r in csv.DictReader(fh)}


def resolve_files(files: list[list[str]], file_map: Path) -> list[list[str]]:
    """Each study's shareable paths -> real paths. Absolute entries (a manifest written before paths were
    made shareable, or one built by hand) pass through unchanged."""
    if all(Path(f).is_absolute() for fs in files for f in fs):
        return [list(fs) for fs in files]
    mapping = read_file_map(file_map)
    out, missing = [], 0
    for fs in files:
        real = []
        for f in fs:
            r = f if Path(f).is_absolute() else mapping.get(f)
            if r is None:
                missing += 1
                r = f
            real.append(r)
        out.append(real)
    if missing:
        where = "is missing" if not mapping else f"lacks {missing} of them"
        raise MedxferError(
            f"the manifest names files by shareable path and the local file map {file_map.name} {where} (the "
            "workspace was copied without its local side?); fix: rerun `medxfer ingest SPEC` where the data is"
        )
    return out


def json_default(v: Any) -> Any:
    """``json.dumps(default=...)`` for manifest values: numpy arrays and scalars as plain JSON."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def manifest_content_hash(df: pd.DataFrame) -> str:
    """Hash of the manifest's content, without file paths: moving the data folder does not change it."""
    cols = [c for c in MANIFEST_COLUMNS if c != "files" and c in df.columns]
    rows = df[cols].sort_values("study_key").to_dict(orient="records")
    blob = json.dumps(rows, sort_keys=True, default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def labelled_content_hash(df: pd.DataFrame) -> str:
    """Hash of which decoded pixels carry which label: (study_key, content_hash, label_index) of every row."""
    lines = sorted(f"{r.study_key},{r.content_hash},{r.label_index}" for r in df.itertuples())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def changed_hashes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """The names (in words) of the hashes in `current` that differ from those a checkpoint recorded."""
    recorded = {_OLD_HASH_KEYS.get(k, k): v for k, v in recorded.items()}
    return [HASH_NAMES.get(k, k) for k, v in current.items() if recorded.get(k) != v]


@dataclass
class Joined:
    """The manifest and its split, joined: every manifest row the split names, with its ``split``."""

    manifest: pd.DataFrame
    splits: pd.DataFrame  # k-fold: relabelled so the chosen fold is "val"
    rows: pd.DataFrame
    fold: int | None
    split_hash: str

    def part(self, split: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == split].reset_index(drop=True)

    def class_counts(self, classes: list[str]) -> dict[str, dict[str, int]]:
        """Studies per class in each split, e.g. {"train": {"neg": 20, "pos": 8}, ...}."""
        k = len(classes)
        return {
            s: {classes[i]: int(n) for i, n in enumerate(np.bincount(g["label_index"], minlength=k))}
            for s, g in self.rows.groupby("split")
        }

    @cached_property
    def labelled_content(self) -> str:
        return labelled_content_hash(self.manifest)

    def hashes(self, spec: DataSpec) -> dict[str, str]:
        """What a checkpoint records, a resume compares and a registered version carries as tags."""
        return {"spec": spec.content_hash(), "labelled_content": self.labelled_content, "split": self.split_hash}


def join(ws: Workspace, fold: int | None = None, *, select_fold: bool = True) -> Joined:
    """Read and join the workspace's manifest and split.

    With k folds, `select_fold` relabels fold `fold` (default 0) of the training studies as "val"; without it
    the split is taken as written (evaluate uses the fixed val and test splits).
    """
    if not ws.manifest.is_file():
        raise MedxferError(
            f"no manifest for spec '{ws.name}' in {ws.root}; run `medxfer ingest SPEC --workspace {ws.root}` first"
        )
    if not ws.splits.is_file():
        raise MedxferError(
            f"no split for spec '{ws.name}' in {ws.root}; run `medxfer split SPEC --workspace {ws.root}` first"
        )
    manifest = read_manifest(ws.manifest)
    splits = pd.read_csv(ws.splits)
    report = json.loads(ws.split_report.read_text()) if ws.split_report.is_file() else {}
    split_hash = (
        report.get("split_hash")
        or (hashlib.sha256(splits.sort_values("study_key").to_csv(index=False).encode()).hexdigest()[:16])
    )
    if select_fold:
        splits, fold = _select_fold(splits, fold)
    rows = manifest.merge(splits[["study_key", "split"]], on="study_key", how="inner")
    if len(rows) < len(splits):
        raise MedxferError(
            f"splits.csv names {len(splits) - len(rows)} studies that are not in the manifest; "
            "the manifest changed after splitting: rerun `medxfer split`"
        )
    return Joined(manifest, splits, rows, fold, str(split_hash))


def _select_fold(splits: pd.DataFrame, fold: int | None) -> tuple[pd.DataFrame, int | None]:
    folds = sorted(int(f) for f in splits.loc[splits["split"] == "train", "fold"].unique() if int(f) >= 0)
    if folds:
        fold = 0 if fold is None else fold
        if fold not in folds:
            raise MedxferError(f"fold {fold} does not exist; the split has folds {folds[0]}..{folds[-1]}")
        splits = splits.copy()
        splits.loc[(splits["split"] == "train") & (splits["fold"] == fold), "split"] = "val"
        return splits, fold
    if fold not in (None, 0):
        raise MedxferError(f"fold {fold}: this split has no folds (set split.folds in the spec and rerun split)")
    return splits, None

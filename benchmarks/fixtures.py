"""Real datasets on disk for the benchmarks, built with the product's own stages and cached in benchmarks/work.

- ``breast``: BreastMNIST as the DICOM ultrasound tree ``medxfer.demo`` writes;
- ``adrenal``: AdrenalMNIST3D (28^3) as the NIfTI tree ``medxfer.demo`` writes;
- ``adrenal64``: AdrenalMNIST3D-64 (../shared/data only) as NIfTI, written the same way through
  ``medxfer.io.nifti.write_volume``.

Each keeps MedMNIST's test membership as the spec's pinned test, so accuracy compares with the
published numbers. ``prepare`` runs ingest and split once per (dataset, limit) and reuses them.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common

_SPEC_FILES = {"breast": "breastmnist_demo.yaml", "adrenal": "adrenal3d_demo.yaml", "adrenal64": "adrenal3d_demo.yaml"}
_VERSION = "v2"  # v2: split order no longer depends on the pseudonym key


def _write_adrenal64(out: Path, limit: int | None) -> None:
    import numpy as np
    from medxfer.io import nifti

    path, _ = common.medmnist("adrenalmnist3d_64")
    rows, pinned = [], []
    with np.load(path) as z:
        for split in ("train", "val", "test"):
            imgs, labs = z[f"{split}_images"], z[f"{split}_labels"][:, 0]
            n = len(imgs) if limit is None else min(limit, len(imgs))
            for i in range(n):
                rel = f"{split}/case{i:04d}_ct.nii.gz"
                # 64^3 covers the same field of view as the 28^3 set at 1.5 mm.
                nifti.write_volume(out / "nifti" / rel, np.ascontiguousarray(imgs[i]), spacing=(0.65625,) * 3)
                rows.append([rel, ("normal", "hyperplasia")[int(labs[i])], f"{split}{i:04d}", split])
                if split == "test":
                    pinned.append([rel])
    for name, header, body in (
        ("labels.csv", ["path", "label", "patient", "medmnist_split"], rows),
        ("pinned_test.csv", ["path"], pinned),
    ):
        with (out / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(body)


def dataset(kind: str, limit: int | None = None) -> Path:
    """Write (once) the dataset and a spec pointing at it; returns the spec path."""
    if kind not in _SPEC_FILES:
        raise ValueError(f"unknown dataset {kind!r}")
    common.require("medxfer.demo", "the demo writer (medxfer.demo)")
    if kind == "adrenal64" and common.shared_data() is None:
        raise common.Skip("AdrenalMNIST3D-64 is only in ../shared/data (absent here)")
    tag = f"{kind}-{limit if limit is not None else 'all'}"
    out = common.work_dir("datasets", tag)
    stamp = out / ".done"
    spec_path = out / "spec.yaml"
    if not (stamp.is_file() and stamp.read_text() == _VERSION and spec_path.is_file()):
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        if kind == "breast":
            from medxfer.demo import write_breast

            write_breast(out, limit)
        elif kind == "adrenal":
            from medxfer.demo import write_adrenal

            write_adrenal(out, limit)
        else:
            _write_adrenal64(out, limit)
        tree = yaml.safe_load((common.REPO / "data_specs" / _SPEC_FILES[kind]).read_text())
        tree["name"] = f"bench-{tag}"
        root = "dicom" if kind == "breast" else "nifti"
        tree["source"]["root"] = str(out / root)
        tree["labels"]["csv"] = str(out / "labels.csv")
        tree["split"]["pinned_test"] = str(out / "pinned_test.csv")
        if kind == "adrenal64":
            tree["preprocess"]["size"] = [64, 64, 64]
        spec_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        stamp.write_text(_VERSION)
    return spec_path


def prepare(kind: str, limit: int | None = None) -> tuple[Any, Path]:
    """(spec, workspace) with ingest and split done (cached)."""
    common.require("medxfer.ingest.ingest", "the ingest stage (medxfer.ingest.ingest)")
    common.require("medxfer.ingest.split", "the split stage (medxfer.ingest.split)")
    from medxfer.config.spec import load_spec
    from medxfer.core.workspace import Workspace
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    spec = load_spec(dataset(kind, limit))
    ws_root = common.work_dir("workspaces", spec.name)
    ws = Workspace.for_spec(ws_root, spec.name)
    if not (ws.manifest.is_file() and ws.splits.is_file()):
        ingest(spec, ws_root)
        split(spec, ws_root)
    return spec, ws_root


def tables(spec: Any, ws_root: Path) -> dict[str, Any]:
    """Manifest rows joined with their split (the documented data contract), per split."""
    import pandas as pd
    from medxfer.core.workspace import Workspace

    ws = Workspace.for_spec(ws_root, spec.name)
    from medxfer.ingest.manifest import read_manifest  # real paths, through the workspace's file map

    rows = read_manifest(ws.manifest).merge(pd.read_csv(ws.splits)[["study_key", "split"]], on="study_key")
    return {s: g.reset_index(drop=True) for s, g in rows.groupby("split")}


def fresh_workspace(spec: Any, ws_root: Path, name: str) -> Path:
    """A new workspace holding a copy of the prepared manifest and split (no cache, no runs, no MLflow store)."""
    from medxfer.core.workspace import Workspace

    src = Workspace.for_spec(ws_root, spec.name)
    dst_root = common.work_dir("runs", name)
    shutil.rmtree(dst_root, ignore_errors=True)
    dst = Workspace.for_spec(dst_root, spec.name).ensure()
    for p in (src.manifest, src.splits, src.split_report, src.ingest_report, src.pseudonym_map, src.file_map):
        if p.is_file():
            shutil.copy2(p, dst.dir / p.name)
    if src.key_file.is_file():
        shutil.copy2(src.key_file, dst.key_file)
    return dst_root

"""The split stage: manifest -> splits.csv, stratified by class and leak-free.

Studies are first joined into groups that must not be separated: all studies of
one patient (``split.group_by_patient``) and all studies with identical decoded
pixels (the same image exported twice is one sample, whoever it belongs to).
Groups are then dealt to the splits greedily, largest first, each to the split
whose class quota is furthest from full, so every split gets about its share of
every class. A pinned test set (a CSV of label keys) takes its studies, and
their whole groups, first. The result is deterministic for a seed and the data,
whatever the workspace's pseudonym key.

With ``split.folds: k`` the non-test studies get fold numbers 0..k-1 (split
"train"); fold f is the validation set of the f-th run. ``fractions.test`` (or
the pinned set) is still held out as "test".
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from medxfer.config.spec import DataSpec, SpecError
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace, atomic_path, write_text_atomic

SPLIT_COLUMNS = ["study_key", "patient_key", "label", "split", "fold"]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _groups(df: pd.DataFrame, by_patient: bool) -> tuple[list[list[int]], int]:
    """Indices of studies that must stay together; also how many groups identical content merged."""
    uf = _UnionFind(len(df))
    keys = ["content_hash"] + (["patient_key"] if by_patient else [])
    merged_by_content = 0
    for col in keys:
        first: dict[str, int] = {}
        for i, v in enumerate(df[col].tolist()):
            if not v:
                continue
            if v in first:
                if col == "content_hash" and uf.find(first[v]) != uf.find(i):
                    merged_by_content += 1
                uf.union(first[v], i)
            else:
                first[v] = i
    out: dict[int, list[int]] = {}
    for i in range(len(df)):
        out.setdefault(uf.find(i), []).append(i)
    return [out[k] for k in sorted(out)], merged_by_content


def _deal(
    groups: list[list[int]], y: np.ndarray, n_classes: int, targets: dict[str, float], rng: np.random.Generator
) -> dict[int, str]:
    """Assign groups (by index into ``groups``) to target names, keeping class proportions."""
    vecs = [np.bincount(y[g], minlength=n_classes).astype(float) for g in groups]
    total = np.sum(vecs, axis=0) if vecs else np.zeros(n_classes)
    names = list(targets)
    want = {s: targets[s] * total for s in names}
    have = {s: np.zeros(n_classes) for s in names}
    order = rng.permutation(len(groups))
    order = sorted(order, key=lambda i: -len(groups[i]))  # stable: ties keep the seeded order
    weight = 1.0 / np.maximum(total, 1.0)  # rare classes count as much as common ones
    out: dict[int, str] = {}
    for gi in order:
        v = vecs[gi]
        best = max(
            names,
            key=lambda s: (
                float(np.sum(v * (want[s] - have[s]) * weight)),
                float(np.sum(want[s] - have[s])),
                -names.index(s),
            ),
        )
        out[gi] = best
        have[best] += v
    return out


@dataclass
class SplitResult:
    spec_name: str
    splits_path: Path
    report_path: Path
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        r = self.report
        return {
            "stage": "split",
            "spec": self.spec_name,
            "split_hash": r["split_hash"],
            "counts": r["counts"],
            "patients": r["patients"],
            "folds": r["folds"],
            "seed": r["seed"],
            "outputs": {"splits": str(self.splits_path), "report": str(self.report_path)},
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        r = self.report
        rows = [
            (name, ", ".join(f"{c} {n}" for c, n in counts.items()) + f"  ({r['patients'][name]} patients)")
            for name, counts in r["counts"].items()
        ]
        if r["folds"]:
            rows += [
                (f"fold {f}", ", ".join(f"{c} {n}" for c, n in counts.items()))
                for f, counts in r["fold_counts"].items()
            ]
        rows += [
            ("groups", f"{r['n_groups']} ({r['content_duplicate_merges']} merged for identical pixels)"),
            ("split hash", r["split_hash"]),
            ("splits", str(self.splits_path)),
        ]
        return f"split {self.spec_name}", rows


def _pinned_keys(spec: DataSpec, ws: Workspace) -> set[str]:
    from medxfer.ingest.ingest import read_labels
    from medxfer.io.phi import Pseudonymizer

    path = spec.resolve(spec.split.pinned_test)
    if not path.is_file():
        raise SpecError(
            f"{spec.spec_path}: split.pinned_test file {path} does not exist; fix the path (relative to the spec)"
        )
    pseudo = Pseudonymizer.for_workspace_root(ws.root)
    return {r.key for r in read_labels(spec, pseudo, csv_path=path, need_label=False)}


def split(spec: DataSpec, workspace: Path) -> SplitResult:
    """Write splits.csv and split_report.json for a spec whose ingest has run."""
    ws = Workspace.for_spec(workspace, spec.name)
    # Held from reading the manifest to writing the splits: a concurrent ingest must not replace the manifest
    # between the two, or the splits would describe another manifest.
    with ws.locked("split"):
        return _split(spec, ws)


def _split(spec: DataSpec, ws: Workspace) -> SplitResult:
    from medxfer.ingest.manifest import manifest_content_hash, read_manifest

    if not ws.manifest.is_file():
        raise StageError(f"no manifest for '{spec.name}' in {ws.root}; run `medxfer ingest` first")
    # Order by decoded-pixel hash, not by pseudonym: pseudonyms depend on the workspace's secret key, and the
    # same data with the same split seed must give the same split in every workspace (a new key used to
    # reshuffle train/val and moved test AUROC by 0.04 between two otherwise identical demo runs).
    df = read_manifest(ws.manifest).sort_values(["content_hash", "study_key"], na_position="last")
    df = df.reset_index(drop=True)
    if df.empty:
        raise StageError(f"the manifest of '{spec.name}' is empty; fix the rejects listed in {ws.rejects}")
    unknown = sorted(set(df["label"]) - set(spec.classes))
    if unknown:
        raise StageError(f"the manifest has labels {unknown} that the spec's classes lack; re-run `medxfer ingest`")
    policy = spec.split
    classes = spec.classes
    y = df["label"].map(classes.index).to_numpy()
    rng = np.random.default_rng(policy.seed)
    groups, merged = _groups(df, policy.group_by_patient)
    split_of = np.array([""] * len(df), dtype=object)
    fold_of = np.full(len(df), -1)

    pinned_info: dict[str, Any] | None = None
    free = list(range(len(groups)))
    if policy.pinned_test is not None:
        keys = _pinned_keys(spec, ws)
        in_manifest = set(df["study_key"])
        pinned_rows = {i for i, k in enumerate(df["study_key"]) if k in keys}
        free = []
        pulled = 0
        for gi, g in enumerate(groups):
            if pinned_rows & set(g):
                split_of[g] = "test"
                pulled += len(set(g) - pinned_rows)
            else:
                free.append(gi)
        pinned_info = {
            "listed": len(keys),
            "in_manifest": len(keys & in_manifest),
            "not_in_manifest": len(keys - in_manifest),
            "pulled_in_with_their_group": pulled,
        }
        fractions = {k: v for k, v in (policy.fractions or {"train": 1.0}).items() if k != "test"}
    else:
        fractions = dict(policy.fractions or {})
    free_groups = [groups[i] for i in free]

    if policy.folds:
        held_out = fractions.get("test", 0.0)
        if held_out > 0:
            # Fractions of a whole split (summing to 1, as without folds) are dealt with the same targets and
            # seeded draw as the split without folds, so adding folds to a spec leaves its test studies unchanged
            # (`run --auto` compares against the single-split test); others (`{test: 0.3}`): test against the rest.
            norm = sum(fractions.values())
            if abs(norm - 1.0) <= 1e-6:
                targets = {k: v / norm for k, v in fractions.items() if v > 0}
            else:
                targets = {"test": held_out, "rest": max(0.0, 1.0 - held_out)}
            part = _deal(free_groups, y, len(classes), targets, rng)
            for gi, name in part.items():
                if name == "test":
                    split_of[free_groups[gi]] = "test"
            free_groups = [g for gi, g in enumerate(free_groups) if part[gi] != "test"]
        folds = _deal(free_groups, y, len(classes), {str(f): 1.0 / policy.folds for f in range(policy.folds)}, rng)
        for gi, f in folds.items():
            split_of[free_groups[gi]] = "train"
            fold_of[free_groups[gi]] = int(f)
    else:
        norm = sum(fractions.values())
        targets = {k: v / norm for k, v in fractions.items() if v > 0} if norm > 0 else {"train": 1.0}
        for gi, name in _deal(free_groups, y, len(classes), targets, rng).items():
            split_of[free_groups[gi]] = name

    out = pd.DataFrame(
        {
            "study_key": df["study_key"],
            "patient_key": df["patient_key"],
            "label": df["label"],
            "split": split_of,
            "fold": fold_of,
        }
    )
    _refuse_if_missing_classes(out, spec)
    leaks = int((out.groupby("patient_key")["split"].nunique() > 1).sum())
    if policy.group_by_patient and leaks:  # cannot happen by construction; guard against regressions
        raise StageError(f"internal error: {leaks} patient(s) span splits")

    names = [s for s in ("train", "val", "test") if (out["split"] == s).any()]
    counts = {s: {c: int(((out["split"] == s) & (out["label"] == c)).sum()) for c in classes} for s in names}
    fold_counts = (
        {
            str(f): {c: int(((out["fold"] == f) & (out["label"] == c)).sum()) for c in classes}
            for f in range(policy.folds)
        }
        if policy.folds
        else {}
    )
    lines = "\n".join(f"{r.study_key},{r.split},{r.fold}" for r in out.itertuples(index=False))
    split_hash = hashlib.sha256(lines.encode()).hexdigest()[:16]
    report = {
        "spec": spec.name,
        "spec_hash": spec.content_hash(),
        "manifest_hash": manifest_content_hash(df),
        "split_hash": split_hash,
        "seed": policy.seed,
        "folds": policy.folds,
        "group_by_patient": policy.group_by_patient,
        "fractions_requested": policy.fractions,
        "fractions_actual": {s: round(float((out["split"] == s).mean()), 4) for s in names},
        "counts": counts,
        "fold_counts": fold_counts,
        "patients": {s: int(out.loc[out["split"] == s, "patient_key"].nunique()) for s in names},
        "n_studies": len(out),
        "n_groups": len(groups),
        "content_duplicate_merges": merged,
        "largest_group": max(len(g) for g in groups),
        "patients_spanning_splits": leaks,
        "pinned_test": pinned_info,
    }
    with atomic_path(ws.splits) as tmp:
        out.to_csv(tmp, index=False)
    write_text_atomic(ws.split_report, json.dumps(report, indent=2) + "\n")
    return SplitResult(spec.name, ws.splits, ws.split_report, report)


def _refuse_if_missing_classes(out: pd.DataFrame, spec: DataSpec) -> None:
    totals = Counter(out["label"])
    problems = []
    checks: list[tuple[str, pd.Series]] = []
    if spec.split.folds:
        checks += [(f"fold {f}", out["fold"] == f) for f in range(spec.split.folds)]
    else:
        checks.append(("val", out["split"] == "val"))
    if (out["split"] == "test").any() or spec.split.pinned_test is not None:
        checks.append(("test", out["split"] == "test"))
    for name, mask in checks:
        present = set(out.loc[mask, "label"])
        for c in spec.classes:
            if c not in present:
                problems.append(f"{name} has no '{c}' studies ({totals.get(c, 0)} in the whole manifest)")
    if not problems:
        return
    fixes = []
    if spec.split.pinned_test is not None and any(p.startswith("test") for p in problems):
        fixes.append("add studies of every class to the pinned test CSV (split.pinned_test)")
    if spec.split.folds:
        fixes.append(f"use fewer folds (split.folds is {spec.split.folds})")
    else:
        fixes.append(f"raise split.fractions.val / test (now {spec.split.fractions})")
    fixes.append("or label more studies of the rare class; a different split.seed rarely helps")
    raise StageError(f"split {spec.name} refused: " + "; ".join(problems) + ". Fix: " + "; ".join(fixes))

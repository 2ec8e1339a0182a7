"""Manifest x splits: one join for every stage, k-fold relabelling, refusals, and the two named hashes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import Workspace
from medxfer.ingest import manifest as M


def _manifest(n: int = 12) -> pd.DataFrame:
    rows = [
        {
            "study_key": f"S{i:03d}",
            "patient_key": f"P{i // 2:03d}",
            "label": "pos" if i % 2 else "neg",
            "label_index": i % 2,
            "modality": "US",
            "source_kind": "dicom",
            "files": [f"/data/PAT{i // 2}/ST{i}/1.dcm"],
            "n_slices": 1,
            "shape": [32, 32],
            "spacing": [0.5, 0.5],
            "orientation": "unknown",
            "intensity_min": 0.0,
            "intensity_max": 255.0,
            "content_hash": f"h{i:03d}",
            "series_key": f"SE{i:03d}",
        }
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=M.MANIFEST_COLUMNS)


def _splits(man: pd.DataFrame, folds: int = 0) -> pd.DataFrame:
    """The last 4 studies test, the rest train (k folds of them) or 2 of them val."""
    out = man[["study_key", "patient_key", "label"]].copy()
    n = len(out)
    out["split"] = ["test" if i >= n - 4 else ("train" if folds or i >= 2 else "val") for i in range(n)]
    out["fold"] = [(i % folds if folds and s == "train" else -1) for i, s in enumerate(out["split"])]
    return out


def _workspace(tmp_path, man: pd.DataFrame, splits: pd.DataFrame | None = None) -> Workspace:
    ws = Workspace.for_spec(tmp_path, "tiny").ensure()
    man.to_parquet(ws.manifest)
    if splits is not None:
        splits.to_csv(ws.splits, index=False)
    return ws


def test_join_gives_every_manifest_row_its_split(tmp_path) -> None:
    man = _manifest()
    ws = _workspace(tmp_path, man, _splits(man))
    j = M.join(ws)
    assert j.fold is None and len(j.rows) == len(man)
    assert list(j.part("val")["study_key"]) == ["S000", "S001"] and len(j.part("test")) == 4
    assert j.class_counts(["neg", "pos"]) == {
        "test": {"neg": 2, "pos": 2},
        "train": {"neg": 3, "pos": 3},
        "val": {"neg": 1, "pos": 1},
    }
    assert j.part("train")["files"][0] == ["/data/PAT1/ST2/1.dcm"]  # lists, not numpy arrays
    # no split report: the split hash is computed from splits.csv, and is stable
    assert len(j.split_hash) == 16 and M.join(ws).split_hash == j.split_hash
    ws.split_report.write_text(json.dumps({"split_hash": "abcd" * 4}))
    assert M.join(ws).split_hash == "abcd" * 4  # the one split wrote, which evaluate compares


def test_k_fold_relabels_the_chosen_fold_as_val(tmp_path) -> None:
    man = _manifest()
    splits = _splits(man, folds=3)
    ws = _workspace(tmp_path, man, splits)
    fold1 = set(splits.loc[(splits["split"] == "train") & (splits["fold"] == 1), "study_key"])
    j = M.join(ws, fold=1)
    assert j.fold == 1 and set(j.part("val")["study_key"]) == fold1
    assert not fold1 & set(j.part("train")["study_key"]) and len(j.part("test")) == 4
    assert set(j.splits.loc[j.splits["split"] == "val", "study_key"]) == fold1  # what the datasets read
    assert M.join(ws).fold == 0  # the default fold
    raw = M.join(ws, select_fold=False)  # evaluate: the split as written
    assert raw.fold is None and raw.part("val").empty
    with pytest.raises(MedxferError, match="fold 7 does not exist; the split has folds 0..2"):
        M.join(ws, fold=7)


def test_a_fold_of_a_split_without_folds_is_refused(tmp_path) -> None:
    man = _manifest()
    ws = _workspace(tmp_path, man, _splits(man))
    assert M.join(ws, fold=0).fold is None
    with pytest.raises(MedxferError, match="fold 2: this split has no folds"):
        M.join(ws, fold=2)


def test_a_split_naming_studies_the_manifest_lacks_is_refused(tmp_path) -> None:
    man = _manifest()
    splits = _splits(man)
    ws = _workspace(tmp_path, man.iloc[2:], splits)  # re-ingested without two studies after splitting
    with pytest.raises(MedxferError, match="splits.csv names 2 studies that are not in the manifest"):
        M.join(ws)


def test_ingest_and_split_must_run_first(tmp_path) -> None:
    ws = Workspace.for_spec(tmp_path, "tiny")
    with pytest.raises(MedxferError, match="run `medxfer ingest SPEC"):
        M.join(ws)
    ws = _workspace(tmp_path, _manifest())
    with pytest.raises(MedxferError, match="run `medxfer split SPEC"):
        M.join(ws)


def test_the_two_hashes_cover_different_things() -> None:
    man = _manifest()
    content, labelled = M.manifest_content_hash(man), M.labelled_content_hash(man)
    assert content != labelled and len(content) == len(labelled) == 16

    moved = man.assign(files=[[f.replace("/data", "/mnt/new") for f in fs] for fs in man["files"]])
    assert (M.manifest_content_hash(moved), M.labelled_content_hash(moved)) == (content, labelled)
    shuffled = man.sample(frac=1.0, random_state=0)  # row order is not content
    assert (M.manifest_content_hash(shuffled), M.labelled_content_hash(shuffled)) == (content, labelled)

    relabelled = man.copy()
    relabelled.loc[0, ["label", "label_index"]] = ["pos", 1]
    assert M.labelled_content_hash(relabelled) != labelled
    assert M.manifest_content_hash(relabelled) != content  # the label is content too

    # what only ingest's hash covers: facts about a study that do not change which pixels carry which label
    regrouped = man.assign(patient_key="P000", intensity_max=254.0)
    assert M.manifest_content_hash(regrouped) != content and M.labelled_content_hash(regrouped) == labelled
    repixelled = man.assign(content_hash=[f"x{i}" for i in range(len(man))])
    assert M.labelled_content_hash(repixelled) != labelled


def test_hashes_of_a_join_and_what_changed(tmp_path) -> None:
    from types import SimpleNamespace

    man = _manifest()
    j = M.join(_workspace(tmp_path, man, _splits(man)))
    spec = SimpleNamespace(content_hash=lambda: "s" * 16)
    h = j.hashes(spec)
    assert h == {"spec": "s" * 16, "labelled_content": M.labelled_content_hash(man), "split": j.split_hash}
    assert M.changed_hashes(h, h) == []
    assert M.changed_hashes({**h, "split": "0" * 16}, h) == ["split"]
    # a checkpoint from before the names were split called the labelled-content hash "manifest"
    old = {"spec": h["spec"], "manifest": h["labelled_content"], "split": h["split"]}
    assert M.changed_hashes(old, h) == []
    assert M.changed_hashes({**old, "manifest": "0" * 16}, h) == ["labelled image content (manifest)"]

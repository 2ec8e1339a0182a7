"""The split stage: no patient or duplicate leaks, stratification, determinism, pinned test, folds, refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from helpers import make_dicom2d_dataset, write_labels
from medxfer.config.spec import load_spec
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace
from medxfer.ingest.ingest import ingest
from medxfer.ingest.split import split


def with_split(ds, **split_policy):
    d = yaml.safe_load(ds.spec_path.read_text())
    d["split"] = {**d["split"], **split_policy}
    ds.spec_path.write_text(yaml.safe_dump(d))
    return load_spec(ds.spec_path)


@pytest.fixture
def ingested(tiny_dicom2d):
    ingest(tiny_dicom2d.spec, tiny_dicom2d.workspace)
    return tiny_dicom2d


def splits_of(ds) -> pd.DataFrame:
    return pd.read_csv(Workspace.for_spec(ds.workspace, ds.spec.name).splits)


def test_patients_never_span_splits_and_classes_are_stratified(ingested):
    res = split(ingested.spec, ingested.workspace)
    df = splits_of(ingested)
    assert list(df.columns) == ["study_key", "patient_key", "label", "split", "fold"]
    assert len(df) == 40 and set(df["fold"]) == {-1}
    assert (df.groupby("patient_key")["split"].nunique() == 1).all()
    for s in ("train", "val", "test"):
        assert set(df.loc[df.split == s, "label"]) == {"neg", "pos"}
    assert res.report["counts"]["train"]["neg"] + res.report["counts"]["train"]["pos"] >= 20
    assert res.report["patients_spanning_splits"] == 0
    rep = json.loads(Workspace.for_spec(ingested.workspace, ingested.spec.name).split_report.read_text())
    assert rep["split_hash"] == res.summary()["split_hash"] and rep["counts"] == res.report["counts"]


def test_deterministic_for_a_seed(ingested):
    a = split(ingested.spec, ingested.workspace).report["split_hash"]
    df_a = splits_of(ingested)
    assert split(ingested.spec, ingested.workspace).report["split_hash"] == a
    assert splits_of(ingested).equals(df_a)
    spec = with_split(ingested, seed=7)
    assert split(spec, ingested.workspace).report["split_hash"] != a


def test_same_split_whatever_the_pseudonym_key(tiny_dicom2d, tmp_path, monkeypatch):
    # Pseudonyms change with the workspace's secret key; which study lands in which split must not.
    def assignment(workspace, key):
        monkeypatch.setenv("MEDXFER_PSEUDONYM_KEY", key)
        ingest(tiny_dicom2d.spec, workspace)
        split(tiny_dicom2d.spec, workspace)
        ws = Workspace.for_spec(workspace, tiny_dicom2d.spec.name)
        manifest = pd.read_parquet(ws.manifest)[["study_key", "content_hash"]]
        return pd.read_csv(ws.splits).merge(manifest, on="study_key"), set(manifest["study_key"])

    a, keys_a = assignment(tmp_path / "ws_a", "a" * 64)
    b, keys_b = assignment(tmp_path / "ws_b", "b" * 64)
    assert not keys_a & keys_b  # the keys really differ...
    assert dict(zip(a.content_hash, a.split, strict=True)) == dict(zip(b.content_hash, b.split, strict=True))


def test_identical_pixels_stay_together_across_patients(tmp_path):
    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=40)
    # Study 39 (patient 23) becomes a byte-identical copy of study 0's image, under another patient and UID.
    src = next((ds.root).glob("PLANTED*/ST000/IM0001"))
    dst = next((ds.root).glob("*/ST039/IM0001"))
    import pydicom

    a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
    b.PixelData = a.PixelData
    b.save_as(dst)
    labels = pd.read_csv(ds.labels_csv)
    labels.loc[39, "label"] = labels.loc[0, "label"]
    labels.to_csv(ds.labels_csv, index=False)
    ingest(ds.spec, ds.workspace)
    res = split(ds.spec, ds.workspace)
    assert res.report["content_duplicate_merges"] == 1
    df = splits_of(ds).set_index("study_key")
    man = pd.read_parquet(Workspace.for_spec(ds.workspace, ds.spec.name).manifest).set_index("study_key")
    dup = man[man.duplicated("content_hash", keep=False)]
    assert len(dup) == 2 and df.loc[dup.index, "split"].nunique() == 1


def test_pinned_test_from_original_keys(ingested):
    uids = ingested.study_uids[:6] + ["1.2.999.not.ingested"]
    write_labels(ingested.spec_path.parent / "pinned.csv", ["StudyInstanceUID"], [[u] for u in uids])
    spec = with_split(ingested, pinned_test="pinned.csv")
    res = split(spec, ingested.workspace)
    info = res.report["pinned_test"]
    assert info["listed"] == 7 and info["in_manifest"] == 6 and info["not_in_manifest"] == 1
    df = splits_of(ingested)
    test = df[df.split == "test"]
    # Studies 0-5 belong to patients 0, 1 and 2 (helpers._owners); the rest of their studies come along.
    assert len(test) == 6 + info["pulled_in_with_their_group"]
    assert (df.groupby("patient_key")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    # train:val follows fractions 0.6:0.2 of what is left.
    rest = df[df.split != "test"]
    assert 0.15 < (rest.split == "val").mean() < 0.35


def test_k_fold(ingested):
    spec = with_split(ingested, folds=4)
    res = split(spec, ingested.workspace)
    df = splits_of(ingested)
    assert set(df.loc[df.split == "train", "fold"]) == {0, 1, 2, 3}
    assert set(df.loc[df.split == "test", "fold"]) == {-1}
    assert set(df["split"]) == {"train", "test"}  # fractions.test is still held out
    for f in range(4):
        assert set(df.loc[df.fold == f, "label"]) == {"neg", "pos"}
    assert (df.groupby("patient_key")["fold"].nunique() == 1).all()
    assert set(res.report["fold_counts"]) == {"0", "1", "2", "3"}
    spec = with_split(ingested, folds=3, fractions=None)
    split(spec, ingested.workspace)
    assert set(splits_of(ingested)["split"]) == {"train"}


def test_refuses_when_val_or_test_lacks_a_class(tmp_path):
    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=12)
    labels = pd.read_csv(ds.labels_csv)
    labels["label"] = ["pos" if i in (1, 3) else "neg" for i in range(12)]  # 2 positives, same patient group
    labels.to_csv(ds.labels_csv, index=False)
    ingest(ds.spec, ds.workspace)
    with pytest.raises(StageError) as exc:
        split(ds.spec, ds.workspace)
    msg = str(exc.value)
    assert "has no 'pos' studies" in msg and "Fix:" in msg and "split.fractions" in msg
    assert not Workspace.for_spec(ds.workspace, ds.spec.name).splits.exists()


def test_pinned_test_missing_a_class_is_refused(ingested):
    neg_uids = [ingested.study_uids[i] for i in (2, 6)]  # negatives whose patients have no other study
    write_labels(ingested.spec_path.parent / "pinned.csv", ["StudyInstanceUID"], [[u] for u in neg_uids])
    spec = with_split(ingested, pinned_test="pinned.csv")
    with pytest.raises(StageError, match="test has no 'pos' studies.*pinned test CSV"):
        split(spec, ingested.workspace)


def test_needs_a_manifest(tiny_dicom2d, tmp_path):
    with pytest.raises(StageError, match="run `medxfer ingest` first"):
        split(tiny_dicom2d.spec, tmp_path / "empty-ws")


def test_group_by_patient_off_still_groups_duplicates(ingested):
    spec = with_split(ingested, group_by_patient=False)
    res = split(spec, ingested.workspace)
    assert res.report["n_groups"] == 40

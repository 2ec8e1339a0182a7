"""The PHI guard refuses source paths and original identifiers, and never repeats them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from medxfer import tracking as T


def _spec(root: Path) -> SimpleNamespace:
    return SimpleNamespace(
        root=root,
        labels_csv=root.parent / "labels.csv",
        spec_path=None,
        split=SimpleNamespace(pinned_test=None),
        classes=["benign", "malignant"],
        name="demo",
    )


def test_guard_refuses_paths_folder_names_and_originals(tmp_path) -> None:
    root = tmp_path / "src"
    files = [[str(root / "DOE_JANE_19700101" / "series1" / "IM0001.dcm")], [str(root / "benign" / "x.dcm")]]
    pmap = tmp_path / "pseudonym_map.csv"
    pmap.write_text("pseudonym,kind,original\npt-0123456789abcdef0123,pt,PAT998877\n")
    g = T.PHIGuard.for_training(_spec(root), files, pseudonym_map=pmap)
    for bad in (
        str(root),
        f"see {root}/x",
        str(root.parent / "labels.csv"),
        "DOE_JANE_19700101",
        "reader: doe_jane_19700101/",
        "id=PAT998877",
        "DOE_JANE_19700101/series1/IM0001.dcm",
    ):
        with pytest.raises(T.PHIRefused) as exc:
            g.check("param x", bad)
        assert bad not in str(exc.value)  # the refusal never repeats the value
    # class names, common words, hashes and numbers that happen to share a folder name are fine
    for ok in ("benign", "data.batch_size", "efficientnet_lite0", "0.001", "32", "a3f9c0ffee", "series"):
        assert g.check("param x", ok) == ok
    with pytest.raises(T.PHIRefused):
        g.check_tree("artifact", {"a": [{"b": "x PAT998877 y"}]})


def test_common_folder_names_are_not_identifiers(tmp_path) -> None:
    root = tmp_path / "src"
    names = ("None", "all", "2019", "null", "true", "auto", "default", "image", "series", "001", "0.001")
    files = [[str(root / n / "1.dcm")] for n in names] + [[str(root / "PLANTEDNAME_X" / "SE2" / "IM0001.dcm")]]
    g = T.PHIGuard.for_training(_spec(root), files)
    # A recipe's stages log with None and 'all' in them; years, counts and config literals are everyday values.
    for ok in ("[{'epoch': 0, 'groups': 'all', 'lr_scale': None}]", "2019", "true", "auto", "image.size", "0.001"):
        assert g.check("param stages", ok) == ok
    for bad in ("PLANTEDNAME_X", "from plantedname_x/", "IM0001", "run on PLANTEDNAME_X"):
        with pytest.raises(T.PHIRefused):
            g.check("param x", bad)
    # IDs and dates stay guarded: 6+ digits, or 4+ characters that are not a common word.
    g2 = T.PHIGuard.for_training(_spec(root), [[str(root / "19700101" / "x.dcm")], [str(root / "1.2.840.99" / "a")]])
    for bad in ("19700101", "uid 1.2.840.99"):
        with pytest.raises(T.PHIRefused):
            g2.check("param x", bad)


def test_tree_with_common_folder_names_trains_and_logs_params(tmp_path, monkeypatch) -> None:
    """Study folders named None/, all/ and 2019/ (renamed patient folders of the tiny set) train and log."""
    from helpers import make_dicom2d_dataset
    from medxfer.core.workspace import Workspace
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.training.stage import train
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=12)
    for old, new in (("PAT0001", "None"), ("PAT0002", "all"), ("PAT0003", "2019")):
        (ds.root / old).rename(ds.root / new)
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    overrides = [
        "epochs=1",
        "weights=none",
        "data.size=[32,32]",
        "data.batch_size=8",
        "stages=[{epoch: 0, groups: all}]",
    ]
    res = train(ds.spec, ds.workspace, overrides=overrides, device="cpu")
    run = MlflowClient(Workspace.for_spec(ds.workspace, ds.spec.name).tracking_uri).get_run(res.main.run_id)
    assert "None" in run.data.params["stages"] and run.data.params["weights"] == "none"

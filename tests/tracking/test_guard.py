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

"""medxfer.core.ui: stage tables fit an 80-column terminal without breaking a value across lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from medxfer.core import ui
from rich.console import Console


@pytest.fixture
def term80(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(width=80, file=out, highlight=False))
    return out


LONG_PATH = "/srv/projects/radiology/medxfer-work/breastmnist-demo/runs/3f2a9c0d1e2b4f5a6b7c8d9e0f1a2b3c/best.pt"
ROWS = [
    ("run id", "3f2a9c0d1e2b4f5a6b7c8d9e0f1a2b3c"),
    ("test auroc", "0.876 [0.812, 0.931]   (val 0.901)"),
    ("time", "3.4 min (ingest 12s, split 1s, train 180s, evaluate 9s, register 4s)"),
    ("checkpoint", LONG_PATH),
    ("open the UI", "mlflow ui --backend-store-uri sqlite:////srv/projects/radiology/medxfer-work/mlflow.db"),
]


def test_a_stage_table_does_not_wrap_at_80_columns(term80: io.StringIO) -> None:
    ui.render_table("train", ROWS)
    lines = term80.getvalue().splitlines()
    assert lines[0].strip() == "train"
    # Rows that fit: one line each. Rows that do not: the key, then the whole value on one line of its own.
    assert [ln.split("  ")[0] for ln in lines[1:3]] == ["run id", "test auroc"]
    assert lines[3:] == ["time:", "  " + ROWS[2][1], "checkpoint:", "  " + LONG_PATH, "open the UI:", "  " + ROWS[4][1]]
    assert lines[2].rstrip().endswith("0.876 [0.812, 0.931]   (val 0.901)")  # brackets kept, not eaten as markup
    # Nothing wraps: only a single value longer than the terminal itself can reach past column 80.
    assert all(len(ln.rstrip()) <= 80 for ln in lines if ln.strip() not in (LONG_PATH, ROWS[4][1]))


def test_paths_under_the_working_folder_are_shown_relative(
    term80: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "medxfer-work" / "x" / "runs" / "abc" / "best.pt"
    assert ui.short_path(str(ckpt)) == "medxfer-work/x/runs/abc/best.pt"
    assert ui.short_path("mlflow ui --backend-store-uri /a/b") == "mlflow ui --backend-store-uri /a/b"
    assert ui.short_path("/elsewhere/file") == "/elsewhere/file"
    ui.render_table("ingest x", [("manifest", str(ckpt))])
    assert "manifest  medxfer-work/x/runs/abc/best.pt" in term80.getvalue()

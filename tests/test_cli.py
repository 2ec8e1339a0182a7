"""The CLI never shows a traceback for bad input or data, and turns anything unexpected into one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from medxfer.cli import app
from typer.testing import CliRunner


def _lines(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.strip()]


@pytest.mark.parametrize("content", ["name: x\nclasses: [a, b\n", None])
def test_bad_or_missing_spec_is_one_line(tmp_path: Path, content: str | None) -> None:
    spec = tmp_path / "spec.yaml"
    if content is not None:
        spec.write_text(content)
    res = CliRunner().invoke(app, ["check-spec", str(spec)])
    assert res.exit_code == 2, res.output
    [line] = _lines(res)
    assert line.startswith(f"error: {spec}: ") and "Traceback" not in res.output
    assert ("not valid YAML at line 3" if content else "no such spec file") in line


@pytest.fixture
def broken_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside a stage: the command's stage function raises something that is not a MedxferError."""

    def boom(_spec: Path) -> None:
        raise RuntimeError("boom [42]")

    monkeypatch.setattr("medxfer.config.spec.check_spec_command", boom)


def test_internal_error_is_one_line_without_traceback(tmp_path: Path, broken_stage: None) -> None:
    res = CliRunner().invoke(app, ["check-spec", str(tmp_path / "x.yaml")])
    assert res.exit_code == 1
    assert _lines(res) == [
        "internal error: RuntimeError: boom [42]; rerun with --debug for the traceback, and report it"
    ]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(tmp_path: Path, broken_stage: None, how: str) -> None:
    args = ["check-spec", str(tmp_path / "x.yaml")]
    if how == "option":
        res = CliRunner().invoke(app, ["--debug", *args])
    else:
        res = CliRunner().invoke(app, args, env={"MEDXFER_DEBUG": "1"})
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "RuntimeError: boom [42]" in res.output
    assert _lines(res)[-1].startswith("internal error: RuntimeError: boom [42]")


def test_debug_also_traces_user_errors(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--debug", "check-spec", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "Traceback" in res.output and "SpecError" in res.output
    assert _lines(res)[-1].startswith("error: ")


def test_usage_errors_stay_typers_own() -> None:
    res = CliRunner().invoke(app, ["check-spec"])
    assert res.exit_code == 2 and "Missing argument" in res.output and "internal error" not in res.output

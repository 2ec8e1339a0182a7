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
    # The type, not the message: a library's message may quote a source path (folders named after patients).
    assert _lines(res) == ["internal error: RuntimeError; rerun with --debug for the traceback, and report it"]
    assert "Traceback" not in res.output and "boom" not in res.output


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(tmp_path: Path, broken_stage: None, how: str) -> None:
    args = ["check-spec", str(tmp_path / "x.yaml")]
    if how == "option":
        res = CliRunner().invoke(app, ["--debug", *args])
    else:
        res = CliRunner().invoke(app, args, env={"MEDXFER_DEBUG": "1"})
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "RuntimeError: boom [42]" in res.output
    assert _lines(res)[-1].startswith("internal error: RuntimeError;")


def test_debug_also_traces_user_errors(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--debug", "check-spec", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "Traceback" in res.output and "SpecError" in res.output
    assert _lines(res)[-1].startswith("error: ")


def test_usage_errors_stay_typers_own() -> None:
    res = CliRunner().invoke(app, ["check-spec"])
    assert res.exit_code == 2 and "Missing argument" in res.output and "internal error" not in res.output


def test_version_names_medxfer_torch_and_mlflow() -> None:
    from importlib.metadata import version

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (
        f"medxfer {version('medxfer')} (torch {version('torch')}, mlflow {version('mlflow')})"
    )


@pytest.mark.parametrize("command", ["train", "run"])
def test_help_shows_set_examples_that_work(command: str) -> None:
    from medxfer.config.recipe import load_recipe

    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "--set optim.lr=3e-4" in res.output, res.output
    assert "--set lr=" not in res.output
    load_recipe(None, 2, ["optim.lr=3e-4", "epochs=8"])  # the examples given are valid keys


def test_run_has_trains_device_resume_and_control_options() -> None:
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"})
    assert all(opt in res.output for opt in ("--device", "--resume", "--control")), res.output


@pytest.mark.parametrize(
    ("key", "meant"), [("lr", "optim.lr"), ("batch_size", "data.batch_size"), ("optim.lrr", "optim.lr")]
)
def test_an_unknown_set_key_suggests_the_dotted_one(tiny_dicom2d, key: str, meant: str) -> None:
    ds = tiny_dicom2d
    res = CliRunner().invoke(app, ["run", str(ds.spec_path), "-w", str(ds.workspace), "--set", f"{key}=3"])
    assert res.exit_code == 2, res.output
    assert f"did you mean `{meant}`?" in res.output and f"field '{key}'" in res.output


def test_check_spec_refuses_a_root_that_climbs_out(tmp_path: Path) -> None:
    from helpers import spec_dict, write_spec

    (tmp_path / "specs").mkdir()
    spec = write_spec(tmp_path / "specs" / "s.yaml", spec_dict("x", "dicom", 2, "../../../../etc"))
    res = CliRunner().invoke(app, ["check-spec", str(spec)])
    assert res.exit_code == 2 and "field 'source.root'" in res.output and "allow_outside" in res.output

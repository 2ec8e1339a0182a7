"""The wheel: builds without metadata warnings, installs `medxfer` and nothing else, and works on its own.

The wheel goes into a fresh venv with --no-deps; a .pth line there adds this venv's site-packages for the
dependencies. A .pth line only adds a path: the .pth files in that path (this venv's editable finder among them)
do not run, so `import medxfer` in the fresh venv is the wheel's copy, which the tests assert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the Dockerfile copies before `pip install .`: the wheel must build from these alone.
SOURCES = ["pyproject.toml", "README.md", "pipeline", "models"]
WARNING = re.compile(r"deprecat|BuildBackendWarning|SetuptoolsWarning", re.IGNORECASE)
SHIPPED_DATA = [
    "medxfer/recipes/default_2d.yaml",
    "medxfer/recipes/default_3d.yaml",
    "medxfer/demo_data/breastmnist.npz",
    "medxfer/demo_data/adrenalmnist3d.npz",
    "medxfer/demo_data/ATTRIBUTION.md",
]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def _clean_env() -> dict[str, str]:
    # Nothing from the outer environment may point Python at the repo or the outer venv.
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Build the wheel once (from a copy of the sources, so no build/ folder lands in the repo) and install it."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = root / "dist"
    # -v: pip hides the build backend's output (where setuptools prints its deprecation warnings) without it.
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(dist), str(src)]
    proc = _run(cmd)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and "No matching distribution found for setuptools" in log:
        # Build isolation fetches setuptools from the index; without one (an offline machine) build with this
        # venv's setuptools, which the same pyproject pin (>=77) installed.
        proc = _run([*cmd, "--no-build-isolation"])
        log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (wheel,) = dist.glob("medxfer-*.whl")

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # this venv's pip installs into it (--python): no ensurepip
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "outer_venv_deps.pth").write_text("".join(f"{p}\n" for p in outer))
    proc = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"log": log, "wheel": wheel, "venv": env_dir, "python": py, "site": site, "cwd": root}


def test_the_build_prints_no_deprecation_warning(built):
    # setuptools 84 says "BuildBackendWarning: `project.license` as a TOML table is deprecated" (lower case d);
    # older ones raise SetuptoolsDeprecationWarning. Either is a line of the backend's output here.
    hits = [line for line in built["log"].splitlines() if WARNING.search(line)]
    assert not hits, "the build warns about the project's metadata:\n" + "\n".join(hits)


def test_the_wheel_holds_medxfer_only_and_every_module_and_data_file(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        record = [line.split(",")[0] for line in zf.read(f"{info}/RECORD").decode().splitlines() if line]
    assert top_level == ["medxfer"]
    assert {p.split("/")[0] for p in record} == {"medxfer", info}
    # pyproject lists the packages by hand: a new subpackage missing from that list would not ship
    want = {f"medxfer/{p.relative_to(REPO / 'pipeline').as_posix()}" for p in (REPO / "pipeline").rglob("*.py")}
    want |= {f"medxfer/models/{p.relative_to(REPO / 'models').as_posix()}" for p in (REPO / "models").rglob("*.py")}
    assert not want - names, f"source modules missing from the wheel: {sorted(want - names)}"
    assert not set(SHIPPED_DATA) - names, f"data files missing from the wheel: {sorted(set(SHIPPED_DATA) - names)}"


def test_the_venv_has_no_pipeline_or_models_package(built):
    entries = {p.name for p in built["site"].iterdir()}
    assert not entries & {"pipeline", "models"}, entries
    assert {e for e in entries if not e.endswith((".dist-info", ".pth"))} == {"medxfer"}, entries


CHECK = """
import importlib.util, json, medxfer, medxfer.cli, medxfer.models
from importlib import resources
from medxfer.config.recipe import default_recipe_path, load_recipe
for dims in (2, 3):
    load_recipe(None, dims)
print(json.dumps({
    "medxfer": medxfer.__file__,
    "models": medxfer.models.__file__,
    "encoders": len(medxfer.models.list_encoders()),
    "recipe": str(default_recipe_path(2)),
    "demo": str(resources.files("medxfer") / "demo_data" / "breastmnist.npz"),
    "demo_is_file": (resources.files("medxfer") / "demo_data" / "breastmnist.npz").is_file(),
    "folder_names": [m for m in ("pipeline", "models") if importlib.util.find_spec(m) is not None],
}))
"""


def test_the_installed_wheel_imports_and_ships_its_data(built):
    # -I: no PYTHONPATH, no cwd on sys.path; cwd outside the repo, where pipeline/ would be a namespace package
    proc = _run([str(built["python"]), "-I", "-c", CHECK], cwd=built["cwd"], env=_clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    site = built["site"]
    for key in ("medxfer", "models", "recipe", "demo"):
        assert Path(got[key]).is_relative_to(site), f"{key} comes from {got[key]}, not the fresh venv"
    assert got["demo_is_file"] and Path(got["recipe"]).is_file()
    assert got["encoders"] >= 16
    assert got["folder_names"] == []


def test_the_entry_points_run(built):
    env = _clean_env()
    module = _run([str(built["python"]), "-I", "-m", "medxfer", "--help"], cwd=built["cwd"], env=env)
    script = _run([str(built["venv"] / "bin" / "medxfer"), "--help"], cwd=built["cwd"], env=env)
    for proc in (module, script):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "models" in proc.stdout and "train" in proc.stdout
    head = (built["venv"] / "bin" / "medxfer").read_text().splitlines()[0]
    assert head == f"#!{built['python']}", head  # the script runs the fresh venv's Python, not this one

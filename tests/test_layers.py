"""The layers hold: every `medxfer` import points down, no subpackage has an import cycle, each module imports alone.

The order, lowest first (pipeline/__init__.py documents it for readers):

    core 0 < config 1 < io, stats, models 2 < ingest 3 < data 4 < tracking 5 < training, planning 6 < evaluation 7
    < handoff 8 < cli, runall, demo, __main__ 9

A module may import its own layer or lower ones. Two subpackages on one level (io, stats, models; training,
planning) are independent of each other: neither may import the other. Imports are read from the source with `ast`, so a
lazy import inside a function counts the same as one at the top.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The two source folders and the import names setuptools gives them (pyproject's package-dir).
ROOTS = {"medxfer": REPO / "pipeline", "medxfer.models": REPO / "models"}
LEVELS = {
    "core": 0,
    "config": 1,
    "io": 2,
    "stats": 2,
    "models": 2,
    "ingest": 3,
    "data": 4,
    "tracking": 5,
    "training": 6,
    "planning": 6,
    "evaluation": 7,
    "handoff": 8,
}
TOP_MODULES = {"cli", "runall", "autorun", "demo", "__main__"}
TOP_LEVEL = 9


def source_modules() -> dict[str, Path]:
    """Import name -> file, for every module under pipeline/ and models/ (models/ wins for medxfer.models)."""
    out: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((prefix, *rel))] = path
    return out


MODULES = source_modules()


def group(module: str) -> str:
    """The layer a module belongs to: its subpackage, "top" for the commands, "root" for medxfer itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in TOP_MODULES:
        return "top"
    return parts[1]


def level(module: str) -> int | None:
    g = group(module)
    # The package root holds only __version__; any module may read it, and the test below keeps it that way.
    return {"root": 0, "top": TOP_LEVEL}.get(g, LEVELS.get(g))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`: they never run, so they cannot close a cycle."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def imports_of(module: str, path: Path, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, target module) for every medxfer import in the file, at any depth (lazy ones included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_only(tree) if runtime_only else set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                # `from medxfer.x import y` imports module medxfer.x.y when there is one, else a name of medxfer.x
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return [(line, t) for line, t in found if t == "medxfer" or t.startswith("medxfer.")]


def import_graph(runtime_only: bool = False) -> dict[str, list[tuple[int, str]]]:
    return {m: imports_of(m, p, runtime_only) for m, p in MODULES.items()}


def layer_violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        src = level(module)
        for line, target in targets:
            dst = level(target)
            where = f"{MODULES[module].relative_to(REPO)}:{line}: {module} imports {target}"
            if src is None or dst is None:
                unknown = group(module) if src is None else group(target)
                bad.append(f"{where} (layer {unknown!r} has no level: add it to LEVELS here)")
            elif dst > src:
                bad.append(f"{where} (level {src} -> {dst}: upward)")
            elif dst == src and group(module) != group(target) and "root" not in (group(module), group(target)):
                bad.append(f"{where} (level {src}: {group(module)} and {group(target)} are siblings)")
    return bad


def cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Import cycles inside one layer (Tarjan's strongly connected components of more than one module)."""
    edges = {m: sorted({t for _, t in ts if t in graph and t != m and group(t) == group(m)}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_levels_name_every_subpackage():
    groups = {group(m) for m in MODULES} - {"root", "top"}
    assert groups <= set(LEVELS), f"subpackages without a level: {sorted(groups - set(LEVELS))}; add them to LEVELS"


def test_imports_only_point_down():
    bad = layer_violations(import_graph())
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_cycle_inside_a_layer():
    # Type-only imports (`if TYPE_CHECKING:`) are left out: a callback module may name the loop's type.
    found = cycles(import_graph(runtime_only=True))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_should(tmp_path):
    """The two checks above are only as good as the parser: feed them a known-bad graph."""
    fake = {
        "medxfer.core.errors": [(1, "medxfer.cli")],
        "medxfer.io.dicom": [(1, "medxfer.stats.metrics")],
        "medxfer.data.datasets": [(1, "medxfer.data.transforms")],
        "medxfer.data.transforms": [(1, "medxfer.data.datasets")],
    }
    saved = dict(MODULES)
    MODULES.update({m: REPO / "pipeline" / "x.py" for m in fake})
    try:
        bad = layer_violations(fake)
        assert any("upward" in b for b in bad) and any("siblings" in b for b in bad)
        assert cycles(fake) == [["medxfer.data.datasets", "medxfer.data.transforms"]]
    finally:
        MODULES.clear()
        MODULES.update(saved)
    # and the parser sees lazy, `from medxfer import x`, relative and type-only imports
    src = tmp_path / "stage.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from medxfer import tracking\n"
        "from ..core import errors\n"
        "from . import checkpoint\n"
        "if TYPE_CHECKING:\n"
        "    from medxfer.training.loop import Fit\n"
        "def build():\n"
        "    from medxfer.models.factory import create_classifier\n"
    )
    want = {
        "medxfer.tracking",
        "medxfer.core.errors",
        "medxfer.training.checkpoint",
        "medxfer.training.loop",
        "medxfer.models.factory",
    }
    assert {t for _, t in imports_of("medxfer.training.stage", src)} == want
    assert {t for _, t in imports_of("medxfer.training.stage", src, runtime_only=True)} == want - {
        "medxfer.training.loop"
    }


def test_the_package_root_stays_light():
    assert not imports_of("medxfer", MODULES["medxfer"]), "pipeline/__init__.py must import nothing of medxfer"


# --- each module imports alone ---------------------------------------------------------------------------------------


def walked_modules() -> list[str]:
    """Every importable module, as pkgutil sees the installed package (models/ is its own root in editable mode)."""
    import medxfer

    names = {m.name for m in pkgutil.walk_packages(medxfer.__path__, "medxfer.")}
    # walk_packages on a path list does not import the (heavy) package itself
    names |= {m.name for m in pkgutil.walk_packages([str(ROOTS["medxfer.models"])], "medxfer.models.")}
    names |= {"medxfer", "medxfer.models"}
    return sorted(n for n in names if not n.endswith("__main__"))


def test_walk_finds_every_source_module():
    assert set(walked_modules()) == set(source_modules()) - {"medxfer.__main__"}


# Forked from one parent that imported the heavy third-party libraries once and no medxfer module: each child is a
# fresh process as far as medxfer goes, and 57 imports cost ~10 s instead of ~35-110 s of 57 cold starts (torch,
# timm and MONAI alone take ~7 s a start; 110 s measured on 2 busy cores). A child that hangs is killed at 120 s.
FORK_DRIVER = r"""
import importlib, json, os, signal, sys, tempfile, time, traceback

modules = json.loads(sys.stdin.read())
for name in ("numpy", "pandas", "pyarrow", "torch", "torchvision", "timm", "monai", "mlflow", "matplotlib",
             "pydicom", "nibabel", "albumentations", "safetensors", "pydantic", "yaml", "typer", "rich", "tqdm"):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # a missing optional library shows up as the failing medxfer import instead
leaked = sorted(m for m in sys.modules if m == "medxfer" or m.startswith("medxfer."))
assert not leaked, f"the parent imported {leaked}: the children would not be fresh"
tmp = tempfile.mkdtemp()
results, running, todo = {}, {}, list(modules)
sys.stdout.flush()
sys.stderr.flush()
while todo or running:
    while todo and len(running) < WORKERS:
        module = todo.pop(0)
        err = os.path.join(tmp, module + ".err")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                importlib.import_module(module)
            except BaseException:
                with open(err, "w") as f:
                    f.write(traceback.format_exc()[-4000:])
                code = 1
            os._exit(code)  # not sys.exit: the parent's atexit handlers and buffers are not the child's
        running[pid] = (module, err, time.monotonic())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        for child, (module, _, began) in running.items():
            if time.monotonic() - began > 120:
                os.kill(child, signal.SIGKILL)
        time.sleep(0.02)
        continue
    module, err, _ = running.pop(pid)
    text = open(err).read() if os.path.exists(err) else ""
    results[module] = [os.waitstatus_to_exitcode(status), text]
print(json.dumps(results))
"""


def import_each_alone(modules: list[str], workers: int = 2) -> dict[str, tuple[int, str]]:
    """module -> (exit code, traceback) of `import module` in a process of its own."""
    # One BLAS/OpenMP thread: fewer native threads in the parent at fork, and 2 cores are shared anyway.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = FORK_DRIVER.replace("WORKERS", str(workers))
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(modules), capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {m: (rc, err) for m, (rc, err) in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the import-alone check forks (POSIX only)")
def test_each_module_imports_alone_in_a_fresh_process():
    """A module that only works after another was imported first (an order dependency, or a cycle that a lucky
    import order hides) fails here; so does one whose import raises."""
    modules = walked_modules()
    probe = "medxfer.core.no_such_module"  # the check must see a failing import
    results = import_each_alone([*modules, probe], workers=min(2, os.cpu_count() or 1))
    assert results.pop(probe)[0] != 0
    assert set(results) == set(modules)
    failed = [f"{m} (exit {rc}):\n{err}" for m, (rc, err) in results.items() if rc != 0]
    assert not failed, "modules that do not import alone:\n" + "\n".join(failed)


@pytest.mark.parametrize("module", ["medxfer.cli", "medxfer.core.errors", "medxfer.config.recipe"])
def test_light_modules_import_no_heavy_library(module):
    """The CLI starts fast: its import (and the config layer's) pulls in none of torch, mlflow, matplotlib, timm."""
    code = (
        f"import sys, {module}; heavy = {{'torch', 'mlflow', 'matplotlib', 'timm', 'monai', 'pydicom', 'nibabel'}}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


# Each heavy or format-specific library has one home, so swapping or pinning it touches one module; the
# docstrings of these modules say so, and this keeps it true (a lazy import inside a function counts too).
ONE_IMPORTER = {
    "pydicom": ("pipeline/io/dicom.py",),
    "nibabel": ("pipeline/io/nifti.py",),
    "matplotlib": ("pipeline/stats/plots.py",),
    "albumentations": ("pipeline/data/augment2d.py",),
    "mlflow": ("pipeline/tracking/",),
}


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_heavy_libraries_have_one_importer_each() -> None:
    bad = []
    for path in MODULES.values():
        rel = str(path.relative_to(REPO))
        for lib in _third_party_imports(path) & set(ONE_IMPORTER):
            if not rel.startswith(ONE_IMPORTER[lib]):
                bad.append(f"{rel} imports {lib}; only {', '.join(ONE_IMPORTER[lib])} may (go through it)")
    assert not bad, "\n".join(bad)

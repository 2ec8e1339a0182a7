"""Shared harness for the benchmarks: data lookup, machine facts, timing, isolation and result files.

Every benchmark reports ratios against a baseline measured in the same run on the same
machine, because shared CI machines are noisy; absolute times are context only.
Each benchmark module exposes ``run(size) -> dict`` (the result payload) where size is
``tiny`` (the smoke test: seconds), ``quick`` or ``full``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "quick", "full")
SCHEMA = 1
RESULT_KEYS = (
    "schema",
    "name",
    "title",
    "status",
    "reason",
    "size",
    "created",
    "wall_s",
    "machine",
    "versions",
    "ratios",
    "rows",
    "notes",
)
_CHILD_MARK = "@@BENCH-CHILD@@"
# Recipe overrides for every training run at the tiny size (the smoke test): small images, one epoch, a
# small batch, no bootstrap to speak of. Numbers from tiny runs mean nothing; they only prove it runs.
TINY_TRAIN = ["data.size=[32,32]", "epochs=1", "data.batch_size=8", "evaluation.bootstrap=20"]


def tiny_train(size: str, dims: int = 2) -> list[str]:
    """TINY_TRAIN at the tiny size (in 3D at 32^3), else nothing."""
    if size != "tiny":
        return []
    return list(TINY_TRAIN) if dims == 2 else ["data.size=[32,32,32]", *TINY_TRAIN[1:]]


class Skip(Exception):
    """A benchmark cannot run here (data, hardware or a stage missing); the message says which and how to fix."""


# ---------------------------------------------------------------------------------------------- locations


def results_dir() -> Path:
    """Committed results live in benchmarks/results; the smoke test points this elsewhere."""
    return Path(os.environ.get("MEDXFER_BENCH_RESULTS", REPO / "benchmarks" / "results"))


def work_dir(*parts: str) -> Path:
    """Scratch space for generated data and workspaces (gitignored)."""
    p = Path(os.environ.get("MEDXFER_BENCH_WORK", REPO / "benchmarks" / "work")).joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def shared_data() -> Path | None:
    root = Path(os.environ.get("MEDXFER_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


def medmnist(name: str) -> tuple[Path, str]:
    """(path, origin) of a MedMNIST npz: ../shared/data first, then the copy bundled with the demo."""
    shared = shared_data()
    if shared is not None and (shared / "medmnist" / f"{name}.npz").is_file():
        return shared / "medmnist" / f"{name}.npz", "shared"
    bundled = REPO / "pipeline" / "demo_data" / f"{name}.npz"
    if bundled.is_file():
        return bundled, "bundled"
    raise Skip(f"{name}.npz not found in ../shared/data/medmnist or pipeline/demo_data")


def ge_mr_series() -> Path:
    shared = shared_data()
    path = shared / "dicom" / "ge_mr_t1_mprage" if shared else None
    if path is None or not path.is_dir():
        raise Skip("the 130-slice GE MR series (../shared/data/dicom/ge_mr_t1_mprage) is absent")
    return path


def medmnist_tensors(
    name: str, size: list[int] | tuple[int, ...], limit: int | None = None, split: str = "train"
) -> tuple[Any, Any]:
    """Real MedMNIST images as a float tensor (N, 1, *size) in [0, 1] plus int64 labels.

    For step-level benchmarks that must not measure the data path: the images are real,
    resized once up front, and held in memory.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    path, _ = medmnist(name)
    with np.load(path) as z:
        x = z[f"{split}_images"][:limit]
        y = z[f"{split}_labels"][:limit].reshape(-1)
    t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    if tuple(t.shape[2:]) != tuple(size):
        mode = "bilinear" if len(size) == 2 else "trilinear"
        t = F.interpolate(t, size=tuple(size), mode=mode, align_corners=False)
    return t.contiguous(), torch.from_numpy(y.astype(np.int64))


def require(module: str, what: str) -> Any:
    """Import a stage module, or skip with the reason (other stages land independently)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{what} is not available ({module}: {exc})") from None


# ---------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import psutil
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_at_start": load,
    }


_PACKAGES = (
    "medxfer",
    "torch",
    "torchvision",
    "monai",
    "timm",
    "numpy",
    "mlflow",
    "pydicom",
    "nibabel",
    "albumentations",
    "onnx",
    "onnxruntime",
    "scikit-learn",
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


# ---------------------------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """Peak resident set of this process so far.

    VmHWM first: Linux carries ``ru_maxrss`` over from the parent into a forked-and-exec'd child, so
    in an isolated arm it would report at least the launcher's RSS.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["s"]`` holds the wall seconds."""
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `n` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


def ratio_entry(value: float, target: float | None, higher_is_better: bool = True, what: str = "") -> dict[str, Any]:
    met = None
    if target is not None and value == value:  # NaN never meets a target
        met = bool(value >= target) if higher_is_better else bool(value <= target)
    return {
        "value": round(float(value), 3),
        "target": target,
        "higher_is_better": higher_is_better,
        "met": met,
        "what": what,
    }


def run_isolated(target: str, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return its dict, plus its peak RSS.

    Arms that are compared on memory or on first-epoch cost must not share a process:
    one arm's allocations, import cost and warm caches would be billed to the other.
    """
    cmd = [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs)]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{tail}")


def _child_main(argv: list[str]) -> None:
    target, raw = argv[0], argv[1] if len(argv) > 1 else "{}"
    mod, fn = target.split(":")
    out = getattr(importlib.import_module(mod), fn)(**json.loads(raw))
    out = dict(out or {})
    out["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(_CHILD_MARK + json.dumps(out, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- results


def new_result(name: str, title: str, size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {
        "schema": SCHEMA,
        "name": name,
        "title": title,
        "status": "ok",
        "reason": None,
        "size": size,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_s": None,
        "machine": machine(),
        "versions": versions(),
        "ratios": {},
        "rows": [],
        "notes": [],
    }


def write_result(result: dict[str, Any]) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) >= 0.001 or v == 0 else f"{v:.2e}"
    return "" if v is None else str(v)


def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=160)
    status = result["status"]
    head = f"[bold]{result['title']}[/bold] ({result['name']}, size={result['size']})"
    if status != "ok":
        console.print(f"{head}: [yellow]{status}[/yellow] - {result['reason']}")
    else:
        console.print(head)
    rows = result.get("rows") or []
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        table = Table(show_header=True, header_style="bold")
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*[fmt(r.get(c)) for c in cols])
        console.print(table)
    if result.get("ratios"):
        table = Table(
            title="ratios (same run, same machine)", title_justify="left", show_header=True, header_style="bold"
        )
        for c in ("ratio", "value", "target", "met"):
            table.add_column(c)
        for k, r in result["ratios"].items():
            cmp = ">=" if r["higher_is_better"] else "<="
            met = {True: "yes", False: "NO", None: "-"}[r["met"]]
            table.add_row(k, fmt(r["value"]), f"{cmp} {r['target']}" if r["target"] is not None else "-", met)
        console.print(table)
    for n in result.get("notes") or []:
        console.print(f"  note: {n}")


def script_main(run: Callable[[str], dict[str, Any]]) -> None:
    """`python -m benchmarks.<name> [tiny|quick|full]`: run one benchmark, write and print its result."""
    try:
        result = run(sys.argv[1] if len(sys.argv) > 1 else "quick")
    except Skip as exc:
        print(f"skipped: {exc}")
        return
    write_result(result)
    print_result(result)


if __name__ == "__main__":
    _child_main(sys.argv[1:])

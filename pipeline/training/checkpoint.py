"""Training checkpoints: atomic writes, safe loads, resume state and the inference loader.

Layout of one run: ``<workspace>/<spec>/runs/<run_id>/{last.pt, last.prev.pt, best.pt}``.
Every file is written to a temp file in the same folder, fsynced and moved into
place with ``os.replace``, so a kill at any moment leaves the previous file whole.
``last.pt`` is rotated to ``last.prev.pt`` before it is replaced: a ``last`` that is
corrupt anyway (disk full, a copy gone wrong) falls back to the previous epoch.

Everything in a checkpoint is a tensor or a plain Python value, so it loads
with ``torch.load(weights_only=True)``: no pickled classes, no numpy objects.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medxfer.config.spec import strip_spec_paths
from medxfer.core.errors import MedxferError
from torch import nn

FORMAT = 1
LAST, PREV, BEST = "last.pt", "last.prev.pt", "best.pt"
# Keys an inference user never needs; dropped from the copy logged to MLflow.
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "train_model", "ema")


class CheckpointError(MedxferError):
    pass


# --- RNG state as plain values ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python `random` states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def plain(obj: Any) -> Any:
    """Make a value safe for weights_only loading: numpy scalars/arrays, Paths and tuples to plain types."""
    if isinstance(obj, dict):
        # int keys stay ints: optimizer state is keyed by parameter index
        return {(k if isinstance(k, int | str) else str(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor | str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise TypeError(f"checkpoint value of type {type(obj).__name__} cannot be loaded with weights_only=True")


# --- atomic files ----------------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space. torch.save says only RuntimeError "PytorchStreamWriter failed
    writing file" (issue 14: "inline_container.cc ... unexpected pos"), so its case is judged by the free space
    left while the partial temp file still holds it; the CLI then prints its disk-full line, not a traceback."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, RuntimeError):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file next to `path`, fsync, then os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(exc, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, "no space left on the device for a checkpoint") from None
        raise
    _fsync_dir(path.parent)


def save_epoch(run_dir: Path, ckpt: dict[str, Any], is_best: bool) -> None:
    """Write `last` (keeping the previous one as `last.prev`) and, when the epoch is the best so far, `best`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": FORMAT, **ckpt}
    fd, tmp = tempfile.mkstemp(prefix=f".{LAST}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if (run_dir / LAST).exists():
            os.replace(run_dir / LAST, run_dir / PREV)
        os.replace(tmp, run_dir / LAST)
    except BaseException as exc:
        full = _disk_full(exc, run_dir)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, "no space left on the device for a checkpoint") from None
        raise
    _fsync_dir(run_dir)
    if is_best:
        atomic_save(ckpt, run_dir / BEST)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path).name}: not a medxfer checkpoint (format {FORMAT})")
    return ckpt


def load_resume(run_dir: Path, warn=None) -> tuple[dict[str, Any], Path]:
    """The newest readable training checkpoint of a run: `last`, else `last.prev` with a message."""
    run_dir = Path(run_dir)
    # A write killed midway leaves its temp file (half a checkpoint, 20 MB for EfficientNet-Lite0); nothing reads
    # it, and nothing writes this run while it is being resumed.
    for stale in run_dir.glob(".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)
    problems = []
    for name in (LAST, PREV):
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            ckpt = load(path)
        except Exception as exc:  # a truncated zip, a wrong file: any reason to refuse it is the same to the user
            problems.append(f"{name}: unreadable ({type(exc).__name__})")
            continue
        if problems and warn is not None:
            warn(f"{'; '.join(problems)}; resuming from {name} (epoch {int(ckpt['epoch']) + 1}) instead")
        return ckpt, path
    raise CheckpointError(
        f"run {run_dir.name}: no usable checkpoint to resume from ({'; '.join(problems)}); "
        "start a new run without --resume"
    )


# --- what other stages read ------------------------------------------------------------------------------------------
def for_tracking(ckpt: dict[str, Any]) -> dict[str, Any]:
    """An inference-only copy for the MLflow artifact: no optimizer/RNG state, no local paths."""
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY}
    out["format"] = FORMAT
    if isinstance(out.get("spec"), dict):
        out["spec"] = strip_spec_paths(out["spec"])
    return out


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the trained architecture (random init; the caller loads the state dict)."""
    from medxfer.models.factory import create_classifier

    args = ckpt["model_args"]
    return create_classifier(
        args["name"],
        num_classes=int(args["num_classes"]),
        in_chans=int(args["in_chans"]),
        spatial_dims=int(args["spatial_dims"]),
        weights=None,
    )


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, checkpoint dict without optimizer/scheduler/scaler/RNG state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.name} not found in {path.parent.name}")
    ckpt = load(path, map_location="cpu")
    model = build_model(ckpt)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY}

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
from medxfer.core.errors import MedxferError, StageError
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
    """Rebuild the trained architecture (random init; the caller loads the state dict): one classifier, or a
    :class:`medxfer.models.ensemble.FoldEnsemble` of K for a checkpoint made by :func:`ensemble_checkpoint`."""
    from medxfer.models.ensemble import one_or_ensemble
    from medxfer.models.factory import create_classifier

    args = ckpt["model_args"]
    return one_or_ensemble(
        lambda: create_classifier(
            args["name"],
            num_classes=int(args["num_classes"]),
            in_chans=int(args["in_chans"]),
            spatial_dims=int(args["spatial_dims"]),
            weights=None,
        ),
        (ckpt.get("ensemble") or {}).get("members"),
    )


# What a fold ensemble's members must share: a member built from another recipe, architecture, class list or
# data (split hash) would make "the mean of the members" a mean of different models.
ENSEMBLE_SAME = ("model_args", "recipe", "classes", "positive_index", "hashes")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The first dotted key at which two plain trees differ, with both values (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k} (only in {'member 0' if k in a else 'this member'})"
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return None if same else path
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return None if same else f"{path} ({a!r} vs {b!r})"


def ensemble_checkpoint(members: list[dict[str, Any]], folds: list[int], member_run_ids: list[str]) -> dict[str, Any]:
    """ONE checkpoint for the fold ensemble of `members` (single-model checkpoints as :func:`load` returns them).

    Everything but the weights is member 0's (recipe, spec, hashes, classes, model_args); ``model`` holds the
    :class:`~medxfer.models.ensemble.FoldEnsemble` state dict (``members.{i}.<key>``); ``ensemble`` records
    ``{members: K, folds, member_run_ids}`` and each member's best epoch and metric. No optimiser or RNG state:
    an ensemble is never resumed, only evaluated, registered and exported.
    """
    if not members:
        raise CheckpointError("a fold ensemble needs at least one member checkpoint")
    if not (len(members) == len(folds) == len(member_run_ids)):
        raise CheckpointError(
            f"ensemble_checkpoint got {len(members)} checkpoints, {len(folds)} folds and "
            f"{len(member_run_ids)} run ids; pass one fold and one run id per member"
        )
    if len(set(folds)) != len(folds):
        raise CheckpointError(f"ensemble folds {folds} repeat a fold; each member must be trained on its own fold")
    first = members[0]
    for i, m in enumerate(members):
        if m.get("ensemble"):
            raise CheckpointError(f"member {i} (run {member_run_ids[i]}) is itself an ensemble; pass fold models")
        if not isinstance(m.get("model"), dict) or not m.get("model_args"):
            raise CheckpointError(f"member {i} (run {member_run_ids[i]}) is not a medxfer training checkpoint")
        for key in ENSEMBLE_SAME:
            d = _first_difference(first.get(key), m.get(key), key)
            if d:
                raise CheckpointError(
                    f"member {i} (run {member_run_ids[i]}) differs from member 0 (run {member_run_ids[0]}) in {d}; "
                    "a fold ensemble needs the same recipe, architecture, classes and split in every member"
                )
    out = {k: v for k, v in first.items() if k not in TRAINING_ONLY}
    for k in ("history", "best", "epoch", "stage", "param_groups", "best_metric"):
        out.pop(k, None)  # per-member facts: kept per member under "ensemble" below
    out["format"] = FORMAT
    out["model"] = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m["model"].items()}
    out["fold"] = None
    out["run_id"] = None  # the ensemble's own run (medxfer.training.ensemble.create_ensemble_run) sets it
    out["role"] = "main"
    out["control"] = None
    out["ensemble"] = {
        "members": len(members),
        "folds": [int(f) for f in folds],
        "member_run_ids": [str(r) for r in member_run_ids],
        # Counted from 1, as the console and MLflow count epochs (a checkpoint keeps the loop's 0-based index).
        "best_epochs": [None if m.get("epoch") is None else int(m["epoch"]) + 1 for m in members],
        "best_metrics": [None if m.get("best_metric") is None else float(m["best_metric"]) for m in members],
    }
    return out


def best_path(ws: Any, run_id: str, tmp: Path) -> Path:
    """A run's best checkpoint: the workspace run folder's ``best.pt``, else its ``checkpoints/best.pt`` artifact
    (downloaded under `tmp`). `ws`: the run's :class:`medxfer.core.workspace.Workspace`."""
    from medxfer import tracking

    local = ws.run_dir(run_id) / BEST
    if local.is_file():
        return local
    got = None
    if not run_id.startswith(("local-", "offline-")):  # untracked (local-) or spooled (offline-): no MLflow run
        got = tracking.download_run_artifact(ws.tracking_uri, run_id, "checkpoints/best.pt", tmp / run_id)
    if got is None:
        raise StageError(
            f"run {run_id}: no best checkpoint (neither {ws.run_dir(run_id).name}/best.pt in the "
            "workspace nor the checkpoints/best.pt artifact); did training finish?"
        )
    return got


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

"""Datasets, the preprocessing cache, loaders and samplers.

Cache design. The deterministic part of ``medxfer.data.transforms`` (decode -> RAS -> spacing -> intensity
-> size) runs once per study, before training; every epoch after that only runs the random part on the
cached tensor. Where the cache lives (``recipe.data.cache``):

- ``memory``: MONAI ``CacheDataset`` (one float32 tensor per study, in RAM);
- ``disk``: MONAI ``PersistentDataset`` files under ``<workspace>/<spec>/cache/<config hash>/``, one
  ``<item key>.pt`` per study, written atomically (temp file in the same folder, then ``os.replace``)
  and read back with ``torch.load(weights_only=True)``. They survive runs: resume, a second recipe
  with the same preprocessing, and evaluate reuse them;
- ``none``: decode every epoch (for data sets too big for either);
- ``auto``: memory while the estimate (studies x output shape x 4 bytes) fits the budget
  (``data.cache_memory_gb``, default 40% of the RAM available, shared by the local DDP ranks), else disk.

Keys. The folder is the hash of the deterministic transform config (``transforms.config_hash``: spacing,
intensity, size, fit, orientation, a version number); the file name hashes that config again, the study's
decoded-pixel hash from the manifest (``content_hash``) and the size and mtime of each of its files. A
changed config or a changed file therefore never reuses a stale entry. Cache files hold only the tensor.

Failures. A study that cannot be decoded is skipped with a warning naming its pseudonymous study key and
a reason code (never a path); its key is listed in ``ds.failed_keys`` / ``bundle.failed_keys`` and, when
it fails later inside an epoch, in ``loader.failed_keys`` and the batch's ``failed`` list. More than
``data.max_failed_fraction`` of a split failing is a StageError, not a silently smaller data set.

Randomness. Augmentation is reseeded from (recipe seed, epoch, worker) at the start of every epoch and
samplers are epoch-seeded, so an epoch's batches do not depend on what ran before it (resume-exact)
and every rank of a DDP job draws the same balanced permutation before taking its share.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Full, Queue
from typing import Any

import numpy as np
import pandas as pd
import torch
from medxfer.config.recipe import Recipe
from medxfer.config.spec import DataSpec
from medxfer.core import ui
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace
from medxfer.data.transforms import config_hash, deterministic_transforms, output_size, random_transforms
from monai.data import CacheDataset, PersistentDataset, ThreadDataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, Transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler

SPLITS = ("train", "val", "test")
_BYTES_PER_VOXEL = 4
_PER_ITEM_OVERHEAD = 512  # tensor object + dict entry; matters only for tiny images


# ------------------------------------------------------------------------------------------- failures


def failure_reason(exc: BaseException) -> str:
    """A PHI-free reason for a failed study: the reader's reason code, else the exception type.

    Messages are dropped on purpose: OS and library errors quote file paths.
    """
    root = exc
    while root.__cause__ is not None:  # MONAI wraps transform errors in RuntimeError("applying transform ...")
        root = root.__cause__
    code = getattr(root, "code", None)
    return code if isinstance(code, str) else type(root).__name__


def _allowed_failures(n: int, fraction: float) -> int:
    # One bad study in a small split should not stop a run; fraction 0 means none at all.
    return 0 if fraction <= 0 else max(1, int(fraction * n))


def _check_failures(split: str, n: int, failed: dict[str, str], fraction: float) -> None:
    if len(failed) > _allowed_failures(n, fraction):
        reasons: dict[str, int] = {}
        for r in failed.values():
            reasons[r] = reasons.get(r, 0) + 1
        why = ", ".join(f"{r} x{c}" for r, c in sorted(reasons.items(), key=lambda kv: -kv[1]))
        first = ", ".join(list(failed)[:5])
        raise StageError(
            f"{len(failed)} of {n} {split} studies failed to load ({why}; e.g. {first}); more than "
            f"data.max_failed_fraction={fraction:g} allows. Re-run `medxfer ingest` (files may have "
            f"changed since) or raise the limit with --set data.max_failed_fraction=..."
        )


# ------------------------------------------------------------------------------------------- cache keys


def _file_signature(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(b"missing;")
    return h.hexdigest()


def item_cache_key(row: dict[str, Any], cfg_hash: str) -> str:
    """Cache file key of one manifest row: transform config + decoded-pixel hash + file size/mtime."""
    blob = f"{cfg_hash}|{row.get('content_hash', '')}|{_file_signature(row['files'])}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def cache_folder(workspace: Workspace, spec: DataSpec, recipe: Recipe) -> Path:
    return workspace.cache_dir / config_hash(spec, recipe)


# ------------------------------------------------------------------------------------------- size estimate


def _native_voxels(row: dict[str, Any], spacing: list[float] | None) -> float:
    shape = [int(s) for s in row.get("shape") or []]
    n = float(np.prod(shape)) if shape else 0.0
    src = row.get("spacing")
    if spacing is not None and src is not None and len(src) == len(shape):
        # Volume in mm^3 over the target voxel volume: independent of the axis order of either list.
        n = n * float(np.prod([float(s) for s in src])) / float(np.prod(spacing))
    return n


def estimate_cache_bytes(spec: DataSpec, recipe: Recipe, rows: Sequence[dict[str, Any]]) -> int:
    size = output_size(spec, recipe)
    if size is not None:
        per = float(np.prod(size))
        return int(len(rows) * (per * _BYTES_PER_VOXEL + _PER_ITEM_OVERHEAD))
    spacing = spec.preprocess.spacing
    return int(sum(_native_voxels(r, spacing) * _BYTES_PER_VOXEL + _PER_ITEM_OVERHEAD for r in rows))


def memory_budget_bytes(recipe: Recipe) -> int:
    if recipe.data.cache_memory_gb is not None:
        return int(recipe.data.cache_memory_gb * 1e9)
    import psutil

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(0.4 * psutil.virtual_memory().available / ranks)


def resolve_cache_mode(recipe: Recipe, estimate: int) -> str:
    mode = recipe.data.cache
    if mode != "auto":
        return mode
    return "memory" if estimate <= memory_budget_bytes(recipe) else "disk"


# ------------------------------------------------------------------------------------------- cached stores


class _Guarded(Transform):
    """The deterministic part for the memory cache: a failed study becomes ``{"error": reason}``, not an abort.

    (CacheDataset would otherwise stop the whole build at the first bad file.) Only ``image`` is kept.
    """

    def __init__(self, det: Compose):
        self.det = det

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"image": self.det(data)["image"]}
        except Exception as exc:  # noqa: BLE001 - any reader/transform error is a per-study failure
            return {"error": failure_reason(exc)}


def _item_key_bytes(item: dict[str, Any]) -> bytes:
    return item["cache_key"].encode()


class WorkspacePersistentDataset(PersistentDataset):
    """PersistentDataset keyed by our item keys, with temp files inside the cache folder (not /tmp)."""

    def __init__(self, data: Sequence[dict[str, Any]], transform: Compose, cache_dir: Path):
        super().__init__(data, transform=transform, cache_dir=cache_dir, hash_func=_item_key_bytes)

    def cache_path(self, item: dict[str, Any]) -> Path:
        return self.cache_dir / f"{item['cache_key']}.pt"

    def _cachecheck(self, item_transformed: dict[str, Any]) -> dict[str, Any]:
        path = self.cache_path(item_transformed)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 - a torn or foreign file: recompute and overwrite
                path.unlink(missing_ok=True)
        out = {"image": self._pre_transform(dict(item_transformed))["image"]}
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            torch.save(out, tmp)
            os.replace(tmp, path)
        # A full or read-only disk costs speed, not the run. torch.save reports a full disk as RuntimeError
        # ("PytorchStreamWriter failed writing file"), not OSError: 4 of 12 studies "failed to load" before.
        except (OSError, RuntimeError):
            tmp.unlink(missing_ok=True)
        return out


# ------------------------------------------------------------------------------------------- dataset


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class StudyDataset(torch.utils.data.Dataset):
    """Items ``{"image": float32 (C, *spatial), "label": int, "study_key": str}`` for one split.

    Only studies that loaded are indexed; ``failed_keys`` lists the others. ``labels`` is an int64 array
    aligned with the index (samplers and class weights use it without touching images).
    """

    def __init__(
        self,
        split: str,
        base: torch.utils.data.Dataset,
        index: Sequence[int],
        study_keys: list[str],
        labels: Sequence[int],
        random_part: Compose | None,
        seed: int,
        cache_mode: str,
        failed: dict[str, str] | None = None,
        max_failed_fraction: float = 0.05,
    ):
        self.split = split
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)
        self.study_keys = list(study_keys)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.random_part = random_part
        self.seed = seed
        self.cache_mode = cache_mode
        self.failed = dict(failed or {})
        self.max_failed_fraction = max_failed_fraction
        self.epoch = 0
        self.reseed(0)

    @property
    def failed_keys(self) -> list[str]:
        return list(self.failed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.study_keys[i]
        try:
            image = self.base[int(self.index[i])]["image"]
            if self.random_part is not None:
                image = self.random_part({"image": image})["image"]
        except Exception as exc:  # noqa: BLE001 - reported per study by the loader, never fatal on its own
            return {"failed": key, "reason": failure_reason(exc)}
        return {"image": image, "label": int(self.labels[i]), "study_key": key}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.reseed(0)

    def reseed(self, worker: int) -> None:
        """Seed the random part from (seed, epoch, worker); worker 0 is the main process or thread."""
        if self.random_part is not None:
            self.random_part.set_random_state(seed=_mix_seed(self.seed, self.epoch, worker) % (2**32 - 1))

    def without_augmentation(self) -> StudyDataset:
        """The same studies and cache, deterministic part only (e.g. to score the training set)."""
        view = copy.copy(self)
        view.random_part = None
        return view

    def set_random_state(self, seed: int | None = None, state: Any = None) -> StudyDataset:
        # MONAI's DataLoader seeds datasets it is given; ours is seeded per epoch instead (see reseed).
        return self


class DataBundle(dict):
    """``{"train": ds, "val": ds, "test": ds}`` plus what happened while building it."""

    def __init__(
        self,
        datasets: dict[str, StudyDataset],
        cache_mode: str,
        cache_dir: Path | None,
        estimate_bytes: int,
        cfg_hash: str,
        seconds: float,
    ):
        super().__init__(datasets)
        self.cache_mode = cache_mode
        self.cache_dir = cache_dir
        self.estimate_bytes = estimate_bytes
        self.config_hash = cfg_hash
        self.seconds = seconds

    @property
    def failed_keys(self) -> list[str]:
        return [k for ds in self.values() for k in ds.failed_keys]

    def summary(self) -> dict[str, Any]:
        """JSON-safe and path-free: fit for MLflow params and the run summary."""
        return {
            "cache": self.cache_mode,
            "cache_estimate_mb": round(self.estimate_bytes / 1e6, 1),
            "transform_hash": self.config_hash,
            "prepare_s": round(self.seconds, 2),
            "n": {s: len(ds) for s, ds in self.items()},
            "failed": len(self.failed_keys),
            # Quarantined at cache build, by reason code (medxfer.io.checks.REASONS; the run's data.failed_by_reason
            # param) and by pseudonymous key: a study refused here (e.g. one slice with a NaN slope) is accounted for.
            "failed_by_reason": dict(sorted(Counter(r for ds in self.values() for r in ds.failed.values()).items())),
            "failed_studies": {s: dict(ds.failed) for s, ds in self.items() if ds.failed},
        }


def _rows(manifest_df: pd.DataFrame, splits_df: pd.DataFrame, split: str) -> list[dict[str, Any]]:
    keys = splits_df.loc[splits_df["split"] == split, "study_key"].tolist()
    by_key = manifest_df.set_index("study_key", drop=False)
    missing = [k for k in keys if k not in by_key.index]
    if missing:
        raise StageError(
            f"splits.csv lists {len(missing)} {split} studies that are not in the manifest "
            f"(e.g. {missing[0]}); re-run `medxfer split` after `medxfer ingest`"
        )
    cols = [
        c
        for c in ("study_key", "label_index", "source_kind", "files", "content_hash", "shape", "spacing")
        if c in by_key.columns
    ]
    sub = by_key.loc[keys, cols]
    rows = sub.to_dict("records")
    for r in rows:
        r["files"] = [str(f) for f in r["files"]]  # parquet lists arrive as numpy arrays
        for k in ("shape", "spacing"):
            if k in r and r[k] is not None:
                r[k] = list(r[k])
    return rows


def _resolve_paths(rows: list[dict[str, Any]], ws: Workspace) -> None:
    """Shareable manifest paths -> real ones, through the workspace's local file map.

    ``read_manifest`` already resolves them; a manifest read with plain ``pd.read_parquet`` (a notebook, a
    benchmark) still holds the relative, pseudonymised form. Resolving before the cache keys are computed
    keeps them what they were (size and mtime of the real files), so the cache still invalidates on a change.
    """
    from medxfer.ingest.manifest import resolve_files

    for r, files in zip(rows, resolve_files([r["files"] for r in rows], ws.file_map), strict=True):
        r["files"] = files


def _prepare(
    split: str, base: torch.utils.data.Dataset, keys: list[str], workers: int, shard: tuple[int, int] = (0, 1)
) -> dict[str, str]:
    """Run the deterministic part once per study (fills the cache); returns {study_key: reason} failures.

    ``shard=(rank, world)`` prepares every world-th study only (disk cache under DDP: the ranks split the
    decoding, then share their failures so every rank indexes the same studies).
    """
    rank, world = shard
    failed: dict[str, str] = {}

    def one(i: int) -> str | None:
        try:
            item = base[i]
        except Exception as exc:  # noqa: BLE001 - disk cache: the error surfaces here
            return failure_reason(exc)
        return item.get("error")

    mine = range(rank, len(keys), world)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = ex.map(one, mine)
        for i, reason in zip(
            mine, ui.progress(results, total=len(mine), description=f"preparing {split} images"), strict=True
        ):
            if reason is not None:
                failed[keys[i]] = reason
                ui.warn(f"{split}: study {keys[i]} could not be loaded ({reason}); skipped")
    if world > 1:
        gathered: list[dict[str, str] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, failed)  # also the barrier: every shard is on disk now
        failed = {k: v for part in gathered for k, v in (part or {}).items()}
    return failed


def _build_one(
    split: str,
    rows: list[dict[str, Any]],
    mode: str,
    det: Compose,
    rand: Compose | None,
    cache_dir: Path | None,
    recipe: Recipe,
    workers: int,
) -> StudyDataset:
    keys = [r["study_key"] for r in rows]
    labels = [int(r["label_index"]) for r in rows]
    items = [{"files": r["files"], "source_kind": r["source_kind"], "cache_key": r["cache_key"]} for r in rows]
    failed: dict[str, str] = {}
    if mode == "memory":
        base: torch.utils.data.Dataset = CacheDataset(
            items,
            transform=Compose([_Guarded(det)]),
            cache_rate=1.0,
            runtime_cache=True,
            copy_cache=False,
            progress=False,
        )
        failed = _prepare(split, base, keys, workers)
    elif mode == "disk":
        base = WorkspacePersistentDataset(items, transform=det, cache_dir=cache_dir)
        dist = _dist()
        failed = _prepare(split, base, keys, workers, shard=(dist[1], dist[0]) if dist else (0, 1))
    else:
        base = MonaiDataset(items, transform=det)
    _check_failures(split, len(rows), failed, recipe.data.max_failed_fraction)
    good = [i for i, k in enumerate(keys) if k not in failed]
    return StudyDataset(
        split,
        base,
        good,
        [keys[i] for i in good],
        [labels[i] for i in good],
        rand if split == "train" else None,
        recipe.seed,
        mode,
        failed,
        recipe.data.max_failed_fraction,
    )


def build_datasets(
    spec: DataSpec,
    recipe: Recipe,
    workspace: Workspace | Path,
    manifest_df: pd.DataFrame,
    splits_df: pd.DataFrame,
    splits: Sequence[str] = SPLITS,
) -> DataBundle:
    """One StudyDataset per split, each with its deterministic part computed once and cached.

    Only ``train`` gets the random part. Decoding happens here (threads, with a progress bar) unless the
    cache mode is ``none``. Raises StageError when too many studies of a split fail to load.
    """
    t0 = time.perf_counter()
    ws = workspace if isinstance(workspace, Workspace) else Workspace.for_spec(workspace, spec.name)
    det = deterministic_transforms(spec, recipe)
    rand = random_transforms(spec, recipe)
    cfg = config_hash(spec, recipe)
    per_split = {s: _rows(manifest_df, splits_df, s) for s in splits}
    _resolve_paths([r for rows in per_split.values() for r in rows], ws)
    for rows in per_split.values():
        for r in rows:
            r["cache_key"] = item_cache_key(r, cfg)
    estimate = estimate_cache_bytes(spec, recipe, [r for rows in per_split.values() for r in rows])
    mode = resolve_cache_mode(recipe, estimate)
    cache_dir = None
    if mode == "disk":
        ws.ensure()
        cache_dir = ws.cache_dir / cfg
        cache_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, os.cpu_count() or 1))
    datasets = {s: _build_one(s, rows, mode, det, rand, cache_dir, recipe, workers) for s, rows in per_split.items()}
    return DataBundle(datasets, mode, cache_dir, estimate, cfg, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- class balance


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> torch.Tensor:
    """Inverse-frequency weights n / (k * n_c), mean 1 over present classes; 0 for an absent class."""
    y = np.asarray(labels, dtype=np.int64)
    k = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    counts = np.bincount(y, minlength=k).astype(np.float64)[:k]
    present = counts > 0
    w = np.zeros(k)
    w[present] = y.size / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def _dist() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return None


class DistributedWeightedSampler(Sampler[int]):
    """Class-balanced sampling with replacement that stays balanced under DDP.

    Every rank draws the same weighted permutation from (seed, epoch), then takes every
    ``num_replicas``-th index from its rank on: disjoint shares of one balanced draw. With one replica
    it is a seeded WeightedRandomSampler. Call ``set_epoch`` each epoch (the loader does).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ):
        dist = _dist()
        self.num_replicas = num_replicas if num_replicas is not None else (dist[0] if dist else 1)
        self.rank = rank if rank is not None else (dist[1] if dist else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        y = np.asarray(labels, dtype=np.int64)
        self.weights = class_weights(y)[torch.as_tensor(y)].double() if y.size else torch.zeros(0, dtype=torch.float64)
        total = num_samples if num_samples is not None else len(y)
        self.num_samples = math.ceil(total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.total_size == 0 or len(self.weights) == 0:
            return iter([])
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0x5EED))
        idx = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(idx[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_sampler(ds: StudyDataset, recipe: Recipe, train: bool, distributed: bool | None = None) -> Sampler | None:
    """Training: balanced (DDP-aware) when ``data.balanced_sampling``, else an epoch-seeded shuffle
    (DistributedSampler, also with one process, so shuffles are reproducible). Evaluation: None
    (in order) without DDP, else a non-shuffling DistributedSampler (which pads to equal shares)."""
    dist = _dist() if distributed in (None, True) else None
    world, rank = dist if dist else (1, 0)
    if train and recipe.data.balanced_sampling:
        return DistributedWeightedSampler(ds.labels, num_replicas=world, rank=rank, seed=recipe.seed)
    if train:
        return DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
    return DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if dist else None


# ------------------------------------------------------------------------------------------- loaders


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good items; failed ones travel as ``failed`` (keys) so process workers can report them."""
    ok = [it for it in items if "image" in it]
    return {
        "image": torch.stack([it["image"] for it in ok]) if ok else None,
        "label": torch.tensor([it["label"] for it in ok], dtype=torch.long),
        "study_key": [it["study_key"] for it in ok],
        "failed": [(it["failed"], it["reason"]) for it in items if "failed" in it],
    }


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, StudyDataset):
        info.dataset.reseed(worker_id + 1)
    torch.set_num_threads(1)  # workers x intra-op threads would oversubscribe the cores


class StudyLoader:
    """Iterates batches ``{"image", "label", "study_key", "failed"}``; skips and reports failed studies.

    ``set_epoch(e)`` before each epoch seeds the sampler and the augmentation; without it each new
    iteration counts as the next epoch. ``failed_keys`` lists the studies that failed in the last epoch.
    """

    def __init__(self, loader: DataLoader, dataset: StudyDataset, kind: str):
        self.loader = loader
        self.dataset = dataset
        self.kind = kind
        self.failed_keys: list[str] = []
        self._epoch: int | None = None
        self._iterations = 0

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch if self._epoch is not None else self._iterations
        self._iterations += 1
        self._epoch = None
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        failed: dict[str, str] = {}
        self.failed_keys = []
        allowed = _allowed_failures(len(self.dataset), self.dataset.max_failed_fraction)
        for batch in self.loader:
            for key, reason in batch["failed"]:
                self.failed_keys.append(key)
                failed[key] = reason
                ui.warn(f"{self.dataset.split}: study {key} failed to load in epoch {epoch} ({reason}); skipped")
            if len(failed) > allowed:
                _check_failures(self.dataset.split, len(self.dataset), failed, self.dataset.max_failed_fraction)
            if batch["image"] is not None:
                yield batch


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


@functools.cache
def _openmp() -> Any:
    """The OpenMP runtime torch runs its CPU kernels on (a wheel bundles it in torch/lib), or None."""
    import ctypes

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for pattern in ("libgomp*.so*", "libiomp5*", "libomp*"):
        for path in sorted((Path(torch.__file__).parent / "lib").glob(pattern)):
            with contextlib.suppress(OSError, AttributeError):
                lib = ctypes.CDLL(str(path))  # the loaded copy: dlopen of the same file returns its handle
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                return lib
    return None


def one_openmp_thread() -> None:
    """Run this thread's torch CPU ops on itself alone, leaving the training thread's OpenMP team as it was.

    A helper thread that calls a parallel torch op (the loader's ``torch.stack`` of a batch) gets an OpenMP team
    of its own, and once libgomp manages more threads than there are cores it stops spinning at barriers: the
    training thread and its worker then sleep and wake at every parallel region. 3D pipeline, 2 cores, one
    process each: 48,000 voluntary context switches of the training thread and a median step of 14.9-17.5
    samples/s with the loader's team; 5,800 and 20.9 samples/s without it (the hand loop: 19-20).
    ``torch.set_num_threads(1)`` would not do: it also sets the process-wide count (and MKL's) for every thread.
    """
    lib = _openmp()
    if lib is not None:
        torch.get_num_threads()  # torch's per-thread set-up first: it would reset the count on the first op
        lib.omp_set_num_threads(1)


def _prefetch(iterable: Any, size: int) -> Iterator[Any]:
    """Produce batches in a background thread; an exception there is re-raised here, not swallowed.

    (MONAI's ThreadBuffer ends the iteration quietly when its thread dies: a silently short epoch.)
    """
    q: Queue = Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            one_openmp_thread()
            for item in iterable:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))

    thread = threading.Thread(target=produce, name="medxfer-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _ThreadLoader(ThreadDataLoader):
    """MONAI's ThreadDataLoader (thread workers, no IPC) with a background buffer that propagates errors."""

    def __iter__(self) -> Iterator[Any]:
        yield from _prefetch(DataLoader.__iter__(self), self.buffer_size)


def _loader_kind(ds: StudyDataset, recipe: Recipe) -> str:
    """``auto``: a background thread over cached tensors (no IPC, no pickling of the cache: the per-sample
    work is a few numpy/torch calls, mostly GIL-free); worker processes only when each item still costs
    file I/O or decoding (disk cache, no cache) and workers were asked for."""
    kind = recipe.data.loader
    if kind != "auto":
        return kind
    if ds.cache_mode == "memory" or recipe.data.num_workers == 0:
        return "thread"
    return "process"


def make_loader(
    ds: StudyDataset, recipe: Recipe, train: bool, sampler: Sampler | None = None, pin_memory: bool | None = None
) -> StudyLoader:
    """A loader over ``ds``: batch size, workers and loader kind from ``recipe.data`` (see ``_loader_kind``).

    Training draws from ``make_sampler`` unless a sampler is given, and drops a last batch smaller than
    the batch size (a batch of one breaks BatchNorm). ``train=False`` never augments, even over the
    training split. ``pin_memory`` defaults to CUDA being available.
    """
    if not train and ds.random_part is not None:
        ds = ds.without_augmentation()
    if sampler is None:
        sampler = make_sampler(ds, recipe, train)
    kind = _loader_kind(ds, recipe)
    bs = recipe.data.batch_size
    n_draw = len(sampler) if sampler is not None else len(ds)
    kwargs: dict[str, Any] = dict(
        batch_size=bs,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate,
        worker_init_fn=_worker_init,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train and n_draw > bs,
        # Our own generator: MONAI's DataLoader would otherwise draw from (and reset) torch's global RNG.
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    workers = recipe.data.num_workers
    if kind == "thread":
        loader: DataLoader = _ThreadLoader(
            ds, num_workers=workers, use_thread_workers=workers > 0, buffer_size=2, **kwargs
        )
    else:
        loader = DataLoader(ds, num_workers=max(1, workers), persistent_workers=False, **kwargs)
    return StudyLoader(loader, ds, kind)

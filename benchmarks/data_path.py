"""Benchmark 1: training data path, the pipeline's loader against the MONAI tutorial pattern.

Both arms read the same files (the manifest's file lists), apply the same deterministic transforms
(``medxfer.data.transforms.deterministic_transforms`` after the load step) and the same augmentation
distribution, with the recipe's batch size and worker count, and only iterate batches (no model), so the
numbers are the data path alone.

- pipeline: ``medxfer.data.datasets.build_datasets`` (decode once into its cache) + ``make_loader``, and for
  3D the batched random part the training loop runs (``medxfer.data.batch_augment``, called as
  ``medxfer.training.loop.train_batch`` calls it: one ``grid_sample`` per batch, in the main process with
  torch's threads, as training on the CPU does);
- baseline: ``monai.data.Dataset`` + ``LoadImaged`` (PydicomReader / NibabelReader) every epoch,
  ``EnsureChannelFirstd``, then the same transforms and the per-sample random part
  (``monai_random_transforms``: RandFlipd / RandAffined / RandShiftIntensityd for 3D, albumentations for
  2D), and a plain ``DataLoader`` with shuffling.

Steady state is the mean samples/s of epochs >= 2; the first epoch (for the pipeline: cache build +
epoch) and peak RSS are reported too. Each arm runs in its own process (fresh workspace, empty
cache), so memory and first-epoch cost are not shared. Sets: AdrenalMNIST3D-64 as .nii.gz (3D: 64^3
files brought to the default recipe's 40^3) and the BreastMNIST DICOM demo (2D, default recipe at
128 px); each with the recipe's augmentation and without it (which shows the loading cost alone). The
full size runs every (set, augmentation) pair ``_REPEATS`` times, arms alternating, and reports the
median ratio with its range: the machine is shared.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from benchmarks import common, fixtures

TITLE = "Data path: pipeline loader vs MONAI Dataset + LoadImaged every epoch"
NAME = "data_path"
TARGET = 10.0

# (demo studies per MedMNIST split, epochs) per size
# full: 200 studies, not all: steady-state samples/s does not grow with the set, and a full `make bench`
# spends its CPU time on the accuracy study.
_PLAN = {"tiny": (24, 2), "quick": (100, 3), "full": (200, 3)}
_REPEATS = {"tiny": 1, "quick": 1, "full": 3}
_SETS = (
    # label, dataset, dims, recipe overrides (none: the default recipe's size, 40^3 and 128 px)
    ("3D AdrenalMNIST3D-64 nii.gz -> 40^3", "adrenal64", 3, []),
    ("2D BreastMNIST DICOM", "breast", 2, []),
)


def _setup(kind: str, limit: int | None, dims: int, overrides: list[str], augment: bool):
    from medxfer.config.recipe import load_recipe

    spec, ws_root = fixtures.prepare(kind, limit)
    recipe = load_recipe(None, dims, list(overrides) + ([] if augment else ["data.augment={}"]))
    return spec, ws_root, recipe


def arm_pipeline(
    kind: str, limit: int | None, dims: int, overrides: list[str], augment: bool, epochs: int
) -> dict[str, Any]:
    import pandas as pd
    import torch
    from medxfer.core.workspace import Workspace
    from medxfer.data import datasets as data
    from medxfer.data.batch_augment import build_batch_augment

    spec, ws_root, recipe = _setup(kind, limit, dims, overrides, augment)
    run_ws = fixtures.fresh_workspace(spec, ws_root, f"data_path-{kind}-{limit}")
    ws = Workspace.for_spec(run_ws, spec.name)
    manifest, splits = pd.read_parquet(ws.manifest), pd.read_csv(ws.splits)
    t0 = time.perf_counter()
    bundle = data.build_datasets(spec, recipe, ws, manifest, splits, splits=("train",))
    prepare_s = time.perf_counter() - t0
    loader = data.make_loader(bundle["train"], recipe, train=True)
    augment = build_batch_augment(spec, recipe)  # what medxfer.training.loop.train_batch applies
    epoch_s, aug_s, samples = [], [], 0
    for e in range(epochs):
        loader.set_epoch(e)
        t0, n, ta = time.perf_counter(), 0, 0.0
        for step, batch in enumerate(loader):
            if augment is not None:
                t1 = time.perf_counter()
                x = augment(torch.as_tensor(batch["image"]).float(), e, step)
                ta += time.perf_counter() - t1
                assert x.shape == batch["image"].shape
            n += len(batch["label"])
        epoch_s.append(time.perf_counter() - t0)
        aug_s.append(ta)
        samples = n
    out = {
        "batched_augment_s": aug_s,
        "batched_augment": augment.describe() if augment is not None else None,
        "epoch_s": epoch_s,
        "samples_per_epoch": samples,
        "prepare_s": prepare_s,
        "cache_mode": bundle.cache_mode,
        "loader": loader.kind,
        "n_train": len(bundle["train"]),
    }
    shutil.rmtree(run_ws, ignore_errors=True)
    return out


def arm_monai(
    kind: str, limit: int | None, dims: int, overrides: list[str], augment: bool, epochs: int
) -> dict[str, Any]:
    import warnings

    import torch
    from medxfer.data.transforms import LoadStudyd, deterministic_transforms, monai_random_transforms
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    warnings.filterwarnings("ignore", category=UserWarning)  # PydicomReader's missing-geometry notes for US
    spec, ws_root, recipe = _setup(kind, limit, dims, overrides, augment)
    train = fixtures.tables(spec, ws_root)["train"]
    det = [t for t in deterministic_transforms(spec, recipe).transforms if not isinstance(t, LoadStudyd)]
    rand = monai_random_transforms(spec, recipe)
    reader = "PydicomReader" if spec.source.kind == "dicom" else "NibabelReader"
    transform = Compose(
        [
            LoadImaged("image", reader=reader, image_only=True),
            EnsureChannelFirstd("image"),
            *det,
            *(rand.transforms if rand is not None else []),
        ]
    )
    items = [
        {"image": list(f)[0] if len(f) == 1 else list(f), "label": int(y)}
        for f, y in zip(train["files"], train["label_index"], strict=True)
    ]
    ds = Dataset(items, transform=transform)
    loader = DataLoader(
        ds,
        batch_size=recipe.data.batch_size,
        shuffle=True,
        num_workers=recipe.data.num_workers,
        drop_last=len(items) > recipe.data.batch_size,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    epoch_s, samples = [], 0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        epoch_s.append(time.perf_counter() - t0)
        samples = n
    return {"epoch_s": epoch_s, "samples_per_epoch": samples, "n_train": len(items)}


def _steady(m: dict[str, Any]) -> float:
    later = m["epoch_s"][1:] or m["epoch_s"]
    return m["samples_per_epoch"] / (sum(later) / len(later))


def _spread(xs: list[float]) -> dict[str, Any]:
    return {"median": common.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _carry_over(result: dict[str, Any], ran: list[str], only: str) -> None:
    """Rows and ratios of the sets not re-run, from the committed result, marked as such (a partial re-run).

    Old sets whose label starts with ``only`` are superseded (e.g. the 64^3 3D rows by the 40^3 ones): dropped."""
    import json

    path = common.results_dir() / f"{NAME}.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("status") != "ok":
        return
    keep = [
        label for label in {r["set"] for r in old.get("rows", [])} if label not in ran and not label.startswith(only)
    ]
    if not keep:
        return
    result["rows"] += [r for r in old["rows"] if r["set"] in keep]
    for k, v in old.get("ratios", {}).items():
        if any(k.startswith(label + ",") for label in keep):
            result["ratios"][k] = v
    for k, v in old.get("details", {}).items():
        if any(k.startswith(label + "/") for label in keep):
            result.setdefault("details", {})[k] = v
    result["notes"].append(
        f"{', '.join(sorted(keep))}: not re-run here; rows and ratios carried over from the run of {old['created']}"
        f" (commit {old.get('versions', {}).get('git_commit')})"
    )


def run(size: str = "full", only: str | None = None, repeats: int | None = None) -> dict[str, Any]:
    """``only``: run the sets whose label starts with it and carry the others over from the committed result."""
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.data.datasets", "the pipeline's data path (medxfer.data.datasets)")
    limit, epochs = _PLAN[size]
    t0 = time.perf_counter()
    isolate = size != "tiny"
    ran: list[str] = []
    n_repeats = repeats if repeats is not None else _REPEATS[size]
    for label, kind, dims, overrides in _SETS:
        if only is not None and not label.startswith(only):
            continue
        if size == "tiny" and kind == "adrenal64":
            label, kind, overrides = "3D AdrenalMNIST3D-28 nii.gz", "adrenal", ["data.size=[28,28,28]"]
        elif size == "tiny":
            overrides = ["data.size=[32,32]"]
        try:
            fixtures.prepare(kind, limit)
        except common.Skip as exc:
            if kind != "adrenal64":
                raise
            # Without ../shared/data the bundled 28^3 set stands in for the 64^3 one.
            result["notes"].append(f"{label}: {exc}; used the bundled AdrenalMNIST3D 28^3 instead")
            label, kind, overrides = "3D AdrenalMNIST3D-28 nii.gz -> 40^3", "adrenal", []
            fixtures.prepare(kind, limit)
        ran.append(label)
        for augment in (True, False):
            kw = dict(kind=kind, limit=limit, dims=dims, overrides=overrides, augment=augment, epochs=epochs)
            runs = []
            for _ in range(n_repeats):
                if isolate:
                    mon = common.run_isolated("benchmarks.data_path:arm_monai", **kw)
                    pipe = common.run_isolated("benchmarks.data_path:arm_pipeline", **kw)
                else:
                    mon, pipe = arm_monai(**kw), arm_pipeline(**kw)
                runs.append((mon, pipe))
            ratios = [_steady(p) / _steady(m) for m, p in runs]
            k = sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]  # the median run's rows
            mon, pipe = runs[k]
            steady_m, steady_p = _steady(mon), _steady(pipe)
            first_m, first_p = mon["epoch_s"][0], pipe["prepare_s"] + pipe["epoch_s"][0]
            what = "recipe augmentation" if augment else "no augmentation"
            common_row = {"set": label, "augment": "recipe" if augment else "off", "train_studies": pipe["n_train"]}
            result["rows"].append(
                {
                    **common_row,
                    "arm": "MONAI Dataset+LoadImaged (baseline)",
                    "steady_samples_per_s": steady_m,
                    "first_epoch_s": first_m,
                    "peak_rss_mb": mon.get("peak_rss_mb"),
                    "ratio": 1.0,
                }
            )
            arm = f"medxfer ({pipe['cache_mode']} cache, {pipe['loader']}"
            arm += ", batched augmentation)" if pipe.get("batched_augment") else ")"
            result["rows"].append(
                {
                    **common_row,
                    "arm": arm,
                    "steady_samples_per_s": steady_p,
                    "first_epoch_s": first_p,
                    "peak_rss_mb": pipe.get("peak_rss_mb"),
                    "ratio": steady_p / steady_m,
                }
            )
            entry = common.ratio_entry(common.median(ratios), TARGET if augment else None)
            entry["spread"] = _spread(ratios)
            result["ratios"][f"{label}, {what}: steady samples/s"] = entry
            result["ratios"][f"{label}, {what}: first-epoch time"] = common.ratio_entry(
                first_p / first_m, None, higher_is_better=False, what="pipeline / baseline seconds"
            )
            result.setdefault("details", {})[f"{label}/{what}"] = {
                "median_run": k,
                "ratios": ratios,
                "runs": [{"monai": m, "pipeline": p} for m, p in runs],
            }
    result["notes"].append(
        f"{epochs} epochs per arm; steady state = epochs 2..{epochs}; batch size and workers from "
        f"the default recipe; each arm in its own process; {n_repeats} repeats per row, median ratio "
        "(spread: min..max in ratios[...]['spread']), rows from the median run"
        if isolate
        else "tiny: arms in one process, numbers meaningless"
    )
    result["notes"].append(
        "target (>= 10x) applies to the run with the recipe's augmentation; the no-augmentation "
        "row shows what caching the deterministic part alone buys"
    )
    if only is not None:
        _carry_over(result, ran, only)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    import sys

    # python -m benchmarks.data_path [size] [--only LABEL-PREFIX] [--repeats N]
    args = sys.argv[1:]
    opts = {k: args[args.index(k) + 1] for k in ("--only", "--repeats") if k in args}
    size_arg = args[0] if args and not args[0].startswith("--") else "quick"
    common.script_main(
        lambda _s: run(size_arg, opts.get("--only"), int(opts["--repeats"]) if "--repeats" in opts else None)
    )

"""Benchmark 1: training data path, the pipeline's loader against the MONAI tutorial pattern.

Both arms read the same files (the manifest's file lists), apply the same deterministic transforms
(``medxfer.data.transforms.deterministic_transforms`` after the load step) and the same random part
(``random_transforms``), with the recipe's batch size and worker count, and only iterate batches
(no model), so the numbers are the data path alone.

- pipeline: ``medxfer.data.datasets.build_datasets`` (decode once into its cache) + ``make_loader``;
- baseline: ``monai.data.Dataset`` + ``LoadImaged`` (PydicomReader / NibabelReader) every epoch,
  ``EnsureChannelFirstd``, then the same transforms, and a plain ``DataLoader`` with shuffling.

Steady state is the mean samples/s of epochs >= 2; the first epoch (for the pipeline: cache build +
epoch) and peak RSS are reported too. Each arm runs in its own process (fresh workspace, empty
cache), so memory and first-epoch cost are not shared. Sets: AdrenalMNIST3D-64 as .nii.gz (3D, at
64^3) and the BreastMNIST DICOM demo (2D, default recipe at 96 px); each with the recipe's
augmentation and without it (which shows the loading cost alone).
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
_SETS = (
    # label, dataset, dims, recipe overrides
    ("3D AdrenalMNIST3D-64 nii.gz", "adrenal64", 3, ["data.size=[64,64,64]"]),
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
    from medxfer.core.workspace import Workspace
    from medxfer.data import datasets as data

    spec, ws_root, recipe = _setup(kind, limit, dims, overrides, augment)
    run_ws = fixtures.fresh_workspace(spec, ws_root, f"data_path-{kind}-{limit}")
    ws = Workspace.for_spec(run_ws, spec.name)
    manifest, splits = pd.read_parquet(ws.manifest), pd.read_csv(ws.splits)
    t0 = time.perf_counter()
    bundle = data.build_datasets(spec, recipe, ws, manifest, splits, splits=("train",))
    prepare_s = time.perf_counter() - t0
    loader = data.make_loader(bundle["train"], recipe, train=True)
    epoch_s, samples = [], 0
    for e in range(epochs):
        loader.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        epoch_s.append(time.perf_counter() - t0)
        samples = n
    out = {
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
    from medxfer.data.transforms import LoadStudyd, deterministic_transforms, random_transforms
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    warnings.filterwarnings("ignore", category=UserWarning)  # PydicomReader's missing-geometry notes for US
    spec, ws_root, recipe = _setup(kind, limit, dims, overrides, augment)
    train = fixtures.tables(spec, ws_root)["train"]
    det = [t for t in deterministic_transforms(spec, recipe).transforms if not isinstance(t, LoadStudyd)]
    rand = random_transforms(spec, recipe)
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


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.data.datasets", "the pipeline's data path (medxfer.data.datasets)")
    limit, epochs = _PLAN[size]
    t0 = time.perf_counter()
    isolate = size != "tiny"
    for label, kind, dims, overrides in _SETS:
        if size == "tiny" and kind == "adrenal64":
            label, kind, overrides = "3D AdrenalMNIST3D-28 nii.gz", "adrenal", []  # seconds, not minutes
        elif size == "tiny":
            overrides = ["data.size=[32,32]"]
        try:
            fixtures.prepare(kind, limit)
        except common.Skip as exc:
            if kind != "adrenal64":
                raise
            # Without ../shared/data the bundled 28^3 set stands in for the 64^3 one.
            result["notes"].append(f"{label}: {exc}; used the bundled AdrenalMNIST3D 28^3 instead")
            label, kind, overrides = "3D AdrenalMNIST3D-28 nii.gz", "adrenal", []
            fixtures.prepare(kind, limit)
        for augment in (True, False):
            kw = dict(kind=kind, limit=limit, dims=dims, overrides=overrides, augment=augment, epochs=epochs)
            if isolate:
                mon = common.run_isolated("benchmarks.data_path:arm_monai", **kw)
                pipe = common.run_isolated("benchmarks.data_path:arm_pipeline", **kw)
            else:
                mon, pipe = arm_monai(**kw), arm_pipeline(**kw)
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
            result["rows"].append(
                {
                    **common_row,
                    "arm": f"medxfer ({pipe['cache_mode']} cache, {pipe['loader']})",
                    "steady_samples_per_s": steady_p,
                    "first_epoch_s": first_p,
                    "peak_rss_mb": pipe.get("peak_rss_mb"),
                    "ratio": steady_p / steady_m,
                }
            )
            result["ratios"][f"{label}, {what}: steady samples/s"] = common.ratio_entry(
                steady_p / steady_m, TARGET if augment else None
            )
            result["ratios"][f"{label}, {what}: first-epoch time"] = common.ratio_entry(
                first_p / first_m, None, higher_is_better=False, what="pipeline / baseline seconds"
            )
            result.setdefault("details", {})[f"{label}/{what}"] = {"monai": mon, "pipeline": pipe}
    result["notes"].append(
        f"{epochs} epochs per arm; steady state = epochs 2..{epochs}; batch size and workers from "
        "the default recipe; each arm in its own process"
        if isolate
        else "tiny: arms in one process, numbers meaningless"
    )
    result["notes"].append(
        "target (>= 10x) applies to the run with the recipe's augmentation; the no-augmentation "
        "row shows what caching the deterministic part alone buys"
    )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    common.script_main(run)

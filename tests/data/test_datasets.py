"""Datasets, the preprocessing cache, failure handling, loaders and samplers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import dataset_2d, dataset_3d, make_spec
from medxfer.config.recipe import load_recipe
from medxfer.core.errors import StageError
from medxfer.core.workspace import Workspace
from medxfer.data.datasets import (
    DistributedWeightedSampler,
    build_datasets,
    class_weights,
    estimate_cache_bytes,
    item_cache_key,
    make_loader,
    make_sampler,
    resolve_cache_mode,
)
from medxfer.data.transforms import config_hash


def _recipe(dims: int, *sets: str):
    return load_recipe(
        None, dims, ["data.batch_size=4", "data.size=" + ("[32, 32]" if dims == 2 else "[16, 16, 16]"), *sets]
    )


def _garble(path: str, keep_stat: bool = False) -> None:
    """Overwrite a file with junk; keep_stat keeps its size and mtime (a change only decoding would see)."""
    st = os.stat(path)
    Path(path).write_bytes(b"\x00garbage" * (st.st_size // 8) + b"\x00" * (st.st_size % 8) if keep_stat else b"junk")
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _epoch(loader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


def test_memory_cache_yields_contract_items_and_never_redecodes(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12)
    recipe = _recipe(2, "data.cache=memory")
    bundle = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits)
    assert bundle.cache_mode == "memory" and set(bundle) == {"train", "val", "test"}
    assert {k: len(v) for k, v in bundle.items()} == {"train": 6, "val": 3, "test": 3}
    item = bundle["val"][0]
    assert set(item) == {"image", "label", "study_key"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert isinstance(item["label"], int) and item["study_key"].startswith("st-")
    assert not (tmp_path / "ws" / spec.name / "cache").exists()  # memory mode writes nothing
    for f in manifest["files"]:
        _garble(f[0])  # any decode from here on would fail
    loader = make_loader(bundle["train"], recipe, train=True)
    for epoch in range(2):
        batches = _epoch(loader, epoch)
        assert sum(len(b["study_key"]) for b in batches) == 4  # 6 studies, batch 4, last partial batch dropped
        assert all(b["image"].shape[1:] == (1, 32, 32) and not b["failed"] for b in batches)
        assert loader.failed_keys == []
    evaluated = list(make_loader(bundle["test"], recipe, train=False))
    assert sorted(k for b in evaluated for k in b["study_key"]) == sorted(bundle["test"].study_keys)


def test_disk_cache_lives_in_the_workspace_and_is_keyed_by_config_and_content(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_3d(tmp_path / "src", n=6)
    recipe = _recipe(3, "data.cache=disk")
    ws = Workspace.for_spec(tmp_path / "ws", spec.name)
    first = build_datasets(spec, recipe, ws, manifest, splits)
    folder = ws.cache_dir / config_hash(spec, recipe)
    assert first.cache_mode == "disk" and first.cache_dir == folder
    cached = sorted(p.name for p in folder.iterdir())
    assert len(cached) == 6 and all(n.endswith(".pt") for n in cached)  # no temp files left behind
    before = first["val"][0]["image"]

    # Same size and mtime but undecodable content: a rebuild that decoded anything would fail.
    for f in manifest["files"]:
        _garble(f[0], keep_stat=True)
    second = build_datasets(spec, recipe, ws, manifest, splits)
    assert second.failed_keys == [] and torch.equal(second["val"][0]["image"], before)

    row = manifest.iloc[0].to_dict()
    row["files"] = list(row["files"])
    key = item_cache_key(row, config_hash(spec, recipe))
    assert key + ".pt" in cached
    other_cfg = _recipe(3, "data.cache=disk", "data.size=[12, 12, 12]")
    assert config_hash(spec, other_cfg) != config_hash(spec, recipe)
    assert item_cache_key({**row, "content_hash": "0" * 64}, config_hash(spec, recipe)) != key
    st = os.stat(row["files"][0])
    os.utime(row["files"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert item_cache_key(row, config_hash(spec, recipe)) != key  # a rewritten file is a new entry


def test_a_corrupt_study_is_skipped_and_reported_by_key_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12)
    bad = manifest.iloc[0]
    _garble(bad["files"][0])
    bundle = build_datasets(spec, _recipe(2, "data.cache=memory"), tmp_path / "ws", manifest, splits)
    assert bundle.failed_keys == [bad["study_key"]] == bundle["train"].failed_keys
    assert bad["study_key"] not in bundle["train"].study_keys and len(bundle["train"]) == 5
    err = capsys.readouterr().err
    assert bad["study_key"] in err and "skipped" in err
    assert str(tmp_path) not in err and "img0" not in err


def test_many_failures_stop_the_stage(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12)
    train = manifest[splits["split"] == "train"]
    for f in train["files"][:3]:
        _garble(f[0])
    with pytest.raises(StageError) as exc:
        build_datasets(spec, _recipe(2, "data.cache=disk"), tmp_path / "ws", manifest, splits)
    msg = str(exc.value)
    assert "3 of 6 train studies" in msg and "max_failed_fraction" in msg and str(tmp_path) not in msg


def test_a_study_failing_mid_epoch_is_skipped_not_fatal(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12)
    recipe = _recipe(2, "data.cache=none", "data.batch_size=2")
    bundle = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits)
    ds = bundle["train"]
    victim = ds.study_keys[2]
    _garble(manifest.set_index("study_key").loc[victim, "files"][0])
    loader = make_loader(ds, recipe, train=False)
    seen = [k for b in _epoch(loader, 0) for k in b["study_key"]]
    assert loader.failed_keys == [victim] and sorted(seen) == sorted(set(ds.study_keys) - {victim})


def test_augmentation_and_order_depend_only_on_seed_and_epoch(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12)
    recipe = _recipe(2, "data.cache=memory")
    bundle = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits)
    a, b = make_loader(bundle["train"], recipe, train=True), make_loader(bundle["train"], recipe, train=True)
    _epoch(a, 0)  # a has run an epoch before; b has not
    ea, eb = _epoch(a, 3), _epoch(b, 3)
    assert [x["study_key"] for x in ea] == [x["study_key"] for x in eb]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ea, eb, strict=True))
    e4 = _epoch(a, 4)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(ea, e4, strict=True))
    plain = [list(make_loader(bundle["train"], recipe, train=False)) for _ in range(2)]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(*plain, strict=True))  # eval never augments


def test_process_workers_and_3d_batches(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_3d(tmp_path / "src", n=6)
    recipe = _recipe(3, "data.cache=disk", "data.loader=process", "data.num_workers=1", "data.batch_size=2")
    bundle = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits)
    loader = make_loader(bundle["train"], recipe, train=True)
    assert loader.kind == "process"
    batches = _epoch(loader, 0)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 1, 16, 16, 16)] * 2
    assert all(b["label"].dtype == torch.long for b in batches)


def test_auto_cache_falls_back_to_disk_over_the_memory_budget(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=4, split_of=["train"] * 4)
    rows = manifest.to_dict("records")
    big = _recipe(2, "data.size=[512, 512]")
    assert estimate_cache_bytes(spec, big, rows) >= 4 * 512 * 512 * 4
    assert resolve_cache_mode(_recipe(2, "data.cache_memory_gb=0.001"), estimate_cache_bytes(spec, big, rows)) == "disk"
    assert resolve_cache_mode(_recipe(2, "data.cache_memory_gb=1"), estimate_cache_bytes(spec, big, rows)) == "memory"
    native = load_recipe(None, 2, ["data.size=null"])
    assert estimate_cache_bytes(spec, native, rows) < estimate_cache_bytes(spec, big, rows)


def test_class_weights() -> None:
    w = class_weights([0, 0, 0, 1])
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))
    assert torch.allclose(class_weights([0, 2, 2], num_classes=3), torch.tensor([1.5, 0.0, 0.75]))


def test_balanced_sampler_draws_classes_evenly() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    s = DistributedWeightedSampler(labels, num_replicas=1, rank=0, seed=0, num_samples=4000)
    drawn = labels[list(s)]
    assert len(drawn) == 4000 and 0.45 < drawn.mean() < 0.55


def test_ddp_sampler_partitions_one_balanced_draw_across_ranks() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    single = DistributedWeightedSampler(labels, num_replicas=1, rank=0, seed=3)
    ranks = [DistributedWeightedSampler(labels, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(5)
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert len(r0) == len(r1) == len(ranks[0]) == 50
    interleaved = [i for pair in zip(r0, r1, strict=True) for i in pair]
    assert interleaved == list(single)  # disjoint shares of the same draw
    for part in (r0, r1):
        assert 0.3 < labels[part].mean() < 0.7  # each rank stays balanced, not 20% positive
    ranks[0].set_epoch(6)
    assert list(ranks[0]) != r0


def test_make_sampler_choices(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=8, split_of=["train"] * 8)
    recipe = _recipe(2, "data.cache=memory")
    ds = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits, splits=("train",))["train"]
    assert make_sampler(ds, recipe, train=False) is None
    assert type(make_sampler(ds, recipe, train=True)).__name__ == "DistributedSampler"
    balanced = _recipe(2, "data.balanced_sampling=true")
    assert isinstance(make_sampler(ds, balanced, train=True), DistributedWeightedSampler)


def test_an_error_in_the_loader_thread_surfaces_instead_of_a_short_epoch(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=8, split_of=["train"] * 8)
    recipe = _recipe(2, "data.cache=memory", "data.batch_size=2")
    ds = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits, splits=("train",))["train"]

    class Broken(torch.utils.data.Sampler):
        def __iter__(self):
            yield from range(3)
            raise OSError("sampler broke")

        def __len__(self) -> int:
            return 8

    loader = make_loader(ds, recipe, train=False, sampler=Broken())
    assert loader.kind == "thread"
    with pytest.raises(OSError, match="sampler broke"):
        list(loader)


def test_datasets_pickle_for_spawned_workers(tmp_path: Path) -> None:
    spec, manifest, splits = dataset_2d(tmp_path / "src", n=8, split_of=["train"] * 8)
    for mode in ("memory", "disk"):
        recipe = _recipe(2, f"data.cache={mode}")
        ds = build_datasets(spec, recipe, tmp_path / "ws", manifest, splits, splits=("train",))["train"]
        clone = pickle.loads(pickle.dumps(ds))
        clone.set_epoch(1)
        ds.set_epoch(1)
        assert torch.equal(clone[0]["image"], ds[0]["image"])


def _ddp_rank(rank: int, init: str, src: str, ws: str, out: str) -> None:
    import pandas as pd

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        spec = make_spec(2, "dicom")
        manifest, splits = pd.read_pickle(Path(src) / "manifest.pkl"), pd.read_pickle(Path(src) / "splits.pkl")
        bundle = build_datasets(spec, _recipe(2, "data.cache=disk"), ws, manifest, splits, splits=("train",))
        Path(out, f"rank{rank}.txt").write_text(",".join(bundle["train"].failed_keys) + f"|{len(bundle['train'])}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_share_the_disk_cache_build_and_agree_on_failures(tmp_path: Path) -> None:
    import multiprocessing as mp

    spec, manifest, splits = dataset_2d(tmp_path / "src", n=12, split_of=["train"] * 12)
    bad = manifest.iloc[1]  # prepared by rank 1 (odd index)
    _garble(bad["files"][0])
    manifest.to_pickle(tmp_path / "src" / "manifest.pkl")
    splits.to_pickle(tmp_path / "src" / "splits.pkl")
    ctx = mp.get_context("fork")  # as DataLoader workers do; spawn would re-import torch per rank
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        ctx.Process(target=_ddp_rank, args=(r, init, str(tmp_path / "src"), str(tmp_path / "ws"), str(tmp_path)))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert results == {f"{bad['study_key']}|11"}
    folder = tmp_path / "ws" / spec.name / "cache"
    assert len(list(next(folder.iterdir()).glob("*.pt"))) == 11


def test_a_helper_thread_runs_its_ops_on_one_openmp_thread_and_the_caller_keeps_its_team():
    import threading

    from medxfer.data import datasets as ds_mod

    if ds_mod._openmp() is None:
        pytest.skip("torch here does not run on a bundled OpenMP runtime")
    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("one intra-op thread already: nothing to tell apart")
    seen: dict[str, int] = {}

    def helper() -> None:
        ds_mod.one_openmp_thread()
        torch.stack([torch.ones(64, 64, 64)] * 4)  # a parallel op: it must not bring back a team
        seen["helper"] = torch.get_num_threads()

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen["helper"] == 1
    assert torch.get_num_threads() == before
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]  # the process-wide count, which a new thread starts from, is untouched

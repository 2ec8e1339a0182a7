"""Benchmark 7: the GPU path. AMP against fp32, torch.compile, the batched data path, the demo end to end, DDP.

One prepared script that runs unattended in under 8 minutes on one H200 (``_BUDGET_S`` guards it: a section
that would start past it is skipped and says so) and writes ``benchmarks/results/gpu_amp.json``:

1. ``amp``: training samples/s and peak allocated memory for fp32, AMP bf16 and AMP fp16 + GradScaler, for 2D
   at 128 px and 224 px and 3D at 64^3 (the default recipes' encoders, pretrained weights not needed for
   speed). The batch is probed up from the recipe's: doubled while the fp32 peak stays under a quarter of the
   GPU's memory (capped per set), so the GPU is busy without one set taking the card. Steps run through the
   pipeline's own parts: ``Unfreezer`` (discriminative parameter groups), ``to_memory_format``
   (channels_last / channels_last_3d, as the loop converts models and inputs), the loop's GradScaler use;
2. ``frozen_groups``: fp16 + GradScaler on the 3D default recipe's partial stage (frozen groups without
   gradients): the loss stays finite, the scaler steps, the frozen weights do not move;
3. ``compile``: ``torch.compile`` on/off at 2D 128 px bf16 (compile time reported apart from samples/s);
4. ``data_path``: the 3D random part (AdrenalMNIST3D -> 40^3, the recipe's flips, rotation, zoom, shift):
   MONAI per sample on the CPU (the old loader path) vs ``medxfer.data.batch_augment`` on the CPU vs on the
   GPU after the loader's host-to-device copy of the cached batch;
5. ``demo``: wall time of the 2D demo recipe end to end on the GPU (``medxfer.runall.run_all``: ingest, split,
   train, evaluate, register) on the bundled BreastMNIST DICOM demo;
6. ``ddp``: with more than one GPU visible, two NCCL ranks train a few DDP steps and must agree on the weights.

Sections that need a package the machine lacks (MONAI, pydicom, MLflow, ...) are skipped with the import
error as the reason; one failing section is recorded under ``errors`` and the others still run.

``python -m benchmarks.gpu_amp --smoke`` runs the same code on the CPU at tiny sizes (< 60 s; tests/
test_gpu_amp_smoke.py) and writes ``gpu_amp_smoke.json``. Without CUDA and without ``--smoke`` it skips.

On the lent H200 (torch, timm and numpy are in its image; medxfer is not installed there), from the repo root:
``pip install -q --no-deps --no-build-isolation --target /tmp/site . && PYTHONPATH=/tmp/site
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_amp full``; MONAI, pydicom, nibabel, albumentations and MLflow
travel as wheels for sections 4-5 (see /work/.library/device/README.md).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common

TITLE = "GPU: AMP vs fp32, torch.compile, batched data path, demo end to end, DDP"
NAME = "gpu_amp"
_BUDGET_S = 7.5 * 60  # the whole script, on one H200; each section checks what is left

# per size: (warm-up steps, timed steps, batch-probe doublings, image sizes scaled to 1/scale)
_STEPS = {"smoke": (0, 1, 0), "tiny": (1, 2, 0), "quick": (3, 10, 2), "full": (5, 20, 4)}
# label, dims, input size, recipe batch to start the probe from, batch cap
_SETS = (
    ("2D 128 px", 2, (128, 128), 32, 1024),
    ("2D 224 px", 2, (224, 224), 32, 512),
    ("3D 64^3", 3, (64, 64, 64), 16, 128),
)
_SMOKE_SETS = (("2D 32 px", 2, (32, 32), 4, 4), ("3D 16^3", 3, (16, 16, 16), 2, 2))
_DATASETS = {2: "breastmnist", 3: "adrenalmnist3d"}


class _Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mib(dev: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def _reset_peak(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _images(dims: int, size: tuple[int, ...], n: int) -> tuple[Any, Any, str]:
    """n real MedMNIST images resized to `size` (repeated to n), else seeded noise where the npz is absent."""
    import torch

    try:
        x, y = common.medmnist_tensors(_DATASETS[dims], list(size), limit=min(n, 512))
        origin = "medmnist"
    except common.Skip:
        g = torch.Generator().manual_seed(0)
        x, y, origin = torch.rand(min(n, 512), 1, *size, generator=g), torch.randint(0, 2, (min(n, 512),)), "noise"
    reps = math.ceil(n / len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous(), y.repeat(reps)[:n], origin


def _model(dims: int, dev: Any, channels_last: bool) -> Any:
    from medxfer.config.recipe import load_recipe
    from medxfer.models.factory import create_classifier
    from medxfer.training.distributed import memory_format, to_memory_format

    recipe = load_recipe(None, dims)
    model = create_classifier(recipe.encoder, 2, in_chans=1, spatial_dims=dims, weights="none").to(dev)
    fmt = memory_format(dims) if channels_last else None
    if fmt is not None:
        to_memory_format(model, fmt)
    return model, recipe, fmt


def _stepper(
    model: Any, recipe: Any, precision: str, dev: Any, stages: Any = None, net: Any = None
) -> Callable[[Any, Any], Any]:
    """One training step as medxfer.training.loop.train_epoch takes it (Unfreezer, autocast, GradScaler).

    ``net`` (default: the model) is what the step calls, e.g. ``torch.compile(model)``.
    """
    import torch
    from medxfer.config.recipe import StageCfg
    from medxfer.training.unfreeze import Unfreezer

    stages = stages if stages is not None else [{"epoch": 0, "groups": "all"}]
    net = model if net is None else net

    unf = Unfreezer(model, [StageCfg.model_validate(s) for s in stages], recipe.optim, epochs=1, steps_per_epoch=1000)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    unf.set_train_mode()

    def step(x: Any, y: Any) -> float:
        unf.step_lr()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(net(x), y)
        unf.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(unf.optimizer)
        scaler.update()
        return loss

    step.scaler = scaler  # type: ignore[attr-defined]
    step.unfreezer = unf  # type: ignore[attr-defined]
    return step


def _time_steps(step: Callable, x: Any, y: Any, dev: Any, warm: int, timed: int) -> dict[str, Any]:
    for _ in range(warm):
        step(x, y)
    _sync(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    loss = None
    for _ in range(timed):
        loss = step(x, y)
    _sync(dev)
    wall = time.perf_counter() - t0
    return {
        "samples_per_s": timed * x.shape[0] / wall,
        "step_ms": 1000 * wall / timed,
        "peak_mem_mib": _peak_mib(dev),
        "final_loss": float(loss.detach()) if loss is not None else None,
    }


def _probe_batch(dims: int, size: tuple[int, ...], start: int, cap: int, doublings: int, dev: Any) -> int:
    """Double the batch while the fp32 step's peak stays under 1/4 of the GPU's memory (at most `doublings`)."""
    import torch

    if dev.type != "cuda" or doublings == 0:
        return start
    total = torch.cuda.get_device_properties(dev).total_memory / 2**20
    batch = start
    for _ in range(doublings):
        nxt = batch * 2
        if nxt > cap:
            break
        model, recipe, fmt = _model(dims, dev, True)
        x, y, _ = _images(dims, size, nxt)
        x, y = _to(x, y, dev, fmt)
        m = _time_steps(_stepper(model, recipe, "fp32", dev), x, y, dev, 1, 1)
        del model, x, y
        if m["peak_mem_mib"] is None or m["peak_mem_mib"] > total / 4:
            break
        batch = nxt
    _reset_peak(dev)
    return batch


def _to(x: Any, y: Any, dev: Any, fmt: Any) -> tuple[Any, Any]:
    x = x.to(dev).float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, y.to(dev).long()


def section_amp(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    import torch

    warm, timed, doublings = _STEPS[size]
    bf16 = dev.type == "cpu" or torch.cuda.is_bf16_supported()
    precisions = ["fp32", "bf16", "fp16"] if bf16 else ["fp32", "fp16"]
    sets = _SMOKE_SETS if size == "smoke" else _SETS
    for label, dims, shape, start, cap in sets:
        if clock.left() < 60:
            result["notes"].append(f"amp {label}: skipped, the time budget ran out")
            continue
        batch = _probe_batch(dims, shape, start, cap, doublings, dev)
        base = None
        for prec in precisions:
            torch.manual_seed(0)
            model, recipe, fmt = _model(dims, dev, dev.type == "cuda" and recipe_channels_last(dims))
            x, y, origin = _images(dims, shape, batch)
            x, y = _to(x, y, dev, fmt)
            m = _time_steps(_stepper(model, recipe, prec, dev), x, y, dev, warm, timed)
            base = base or m
            result["rows"].append(
                {
                    "section": "amp",
                    "set": label,
                    "encoder": recipe.encoder,
                    "batch": batch,
                    "precision": prec + (" + GradScaler" if prec == "fp16" else ""),
                    "memory_format": str(fmt).replace("torch.", "") if fmt is not None else "contiguous",
                    "images": origin,
                    **m,
                    "speedup_vs_fp32": m["samples_per_s"] / base["samples_per_s"],
                    "mem_vs_fp32": (m["peak_mem_mib"] / base["peak_mem_mib"]) if base["peak_mem_mib"] else None,
                }
            )
            if not math.isfinite(m["final_loss"]):
                result["errors"].append(f"amp {label} {prec}: non-finite loss {m['final_loss']}")
            if prec != "fp32":
                result["ratios"][f"{label} {prec} / fp32 samples/s"] = common.ratio_entry(
                    m["samples_per_s"] / base["samples_per_s"], None
                )
            del model, x, y
            _reset_peak(dev)


def recipe_channels_last(dims: int) -> bool:
    from medxfer.config.recipe import load_recipe

    return bool(load_recipe(None, dims).channels_last)


def section_frozen_groups(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    """fp16 + GradScaler where some groups are frozen (the 3D default's stage 1): finite, stepping, frozen intact."""
    import torch

    shape = (16, 16, 16) if size == "smoke" else (40, 40, 40)
    model, recipe, fmt = _model(3, dev, dev.type == "cuda")
    stages = [s.model_dump() for s in recipe.stages]
    step = _stepper(model, recipe, "fp16" if dev.type == "cuda" else "bf16", dev, stages=stages)
    unf = step.unfreezer  # type: ignore[attr-defined]
    unf.begin_epoch(max(int(s.epoch or 0) for s in recipe.stages))  # the last (partial) stage
    model.train()
    unf.set_train_mode()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in frozen]
    x, y, _ = _images(3, shape, 4)
    x, y = _to(x, y, dev, fmt)
    losses = [float(step(x, y).detach()) for _ in range(2)]
    moved = sum(int(not torch.equal(a, p.detach())) for a, p in zip(before, frozen, strict=True))
    ok = all(math.isfinite(v) for v in losses) and moved == 0 and len(frozen) > 0
    result["rows"].append(
        {
            "section": "frozen_groups",
            "set": f"3D {shape[0]}^3, default recipe stage {unf.stage}",
            "precision": "fp16 + GradScaler" if dev.type == "cuda" else "bf16 (CPU smoke)",
            "frozen_params": len(frozen),
            "frozen_params_moved": moved,
            "losses": losses,
            "scale": float(step.scaler.get_scale()) if step.scaler.is_enabled() else None,  # type: ignore[attr-defined]
            "ok": ok,
        }
    )
    if not ok:
        result["errors"].append(f"frozen_groups: losses {losses}, {moved} frozen tensors moved")


def section_compile(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    import torch

    if clock.left() < 150:
        result["notes"].append("compile: skipped, the time budget ran out")
        return
    warm, timed, _ = _STEPS[size]
    label, dims, shape, batch, _cap = _SMOKE_SETS[0] if size == "smoke" else (*_SETS[0][:3], 256, 256)
    prec = "bf16"
    base = None
    for compiled in (False, True):
        torch.manual_seed(0)
        model, recipe, fmt = _model(dims, dev, dev.type == "cuda")
        x, y, _ = _images(dims, shape, batch)
        x, y = _to(x, y, dev, fmt)
        t0 = time.perf_counter()
        # The Unfreezer walks the plain module's layer groups; the step runs through the compiled one.
        # smoke (CPU): dynamo's tracing without inductor's C++ build, which takes minutes on a small CPU
        backend = "eager" if size == "smoke" else "inductor"
        step = _stepper(model, recipe, prec, dev, net=torch.compile(model, backend=backend) if compiled else None)
        if compiled:
            step(x, y)  # compiles
            _sync(dev)
        compile_s = time.perf_counter() - t0 if compiled else 0.0
        m = _time_steps(step, x, y, dev, warm, timed)
        base = base or m
        result["rows"].append(
            {
                "section": "compile",
                "set": label,
                "batch": batch,
                "precision": prec,
                "torch_compile": compiled,
                "compile_s": round(compile_s, 1),
                **m,
                "speedup_vs_eager": m["samples_per_s"] / base["samples_per_s"],
            }
        )
        del model, step, x, y
        _reset_peak(dev)
    result["ratios"][f"{label} {prec}: torch.compile / eager samples/s"] = common.ratio_entry(
        result["rows"][-1]["speedup_vs_eager"], None
    )


def section_data_path(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    """3D random part per batch of 16 at 40^3: MONAI per sample (CPU), batched on the CPU, batched on the device."""
    import torch
    from medxfer.config.recipe import load_recipe
    from medxfer.data.batch_augment import build_batch_augment
    from medxfer.data.transforms import monai_random_transforms

    class _Spec:  # what the transforms read of a DataSpec
        dims = 3

    side = 16 if size == "smoke" else 40
    recipe = load_recipe(None, 3, [f"data.size=[{side},{side},{side}]"])
    bs, n_batches = recipe.data.batch_size, (2 if size == "smoke" else 20)
    x_all, _, origin = _images(3, (side,) * 3, bs * n_batches)
    batches = [x_all[i * bs : (i + 1) * bs].contiguous() for i in range(n_batches)]
    if dev.type == "cuda":
        batches = [b.pin_memory() for b in batches]  # the loader pins under CUDA (make_loader's pin_memory)
    aug = build_batch_augment(_Spec(), recipe)  # type: ignore[arg-type]
    rows = []

    def timed_loop(fn: Callable[[Any, int], Any], on: Any) -> float:
        fn(batches[0], 0)  # warm-up (kernels, allocator)
        _sync(on)
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            fn(b, i)
        _sync(on)
        return bs * n_batches / (time.perf_counter() - t0)

    mon = monai_random_transforms(_Spec(), recipe)  # type: ignore[arg-type]
    mon.set_random_state(seed=0)
    cpu = torch.device("cpu")
    per_sample = timed_loop(lambda b, i: torch.stack([mon({"image": s})["image"] for s in b]), cpu)
    rows.append(("CPU, MONAI per sample (the previous loader path)", per_sample))
    rows.append(("CPU, batched (medxfer.data.batch_augment)", timed_loop(lambda b, i: aug(b, 0, i), cpu)))
    if dev.type == "cuda":
        gpu = timed_loop(lambda b, i: aug(b.to(dev, non_blocking=True), 0, i), dev)
        rows.append((f"{dev.type}, batched after the host-to-device copy", gpu))
        copy_only = timed_loop(lambda b, i: b.to(dev, non_blocking=True), dev)
        rows.append((f"{dev.type}, host-to-device copy alone", copy_only))
    for arm, sps in rows:
        result["rows"].append(
            {
                "section": "data_path",
                "set": f"3D {side}^3 recipe augmentation, batch {bs}",
                "arm": arm,
                "images": origin,
                "samples_per_s": sps,
                "ratio_vs_monai_per_sample": sps / per_sample,
            }
        )
    best = rows[2][1] if len(rows) > 2 else rows[1][1]
    result["ratios"]["3D augmentation: batched on the training device / MONAI per sample on the CPU"] = (
        common.ratio_entry(best / per_sample, None)
    )


def section_demo(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    """The 2D demo recipe end to end (ingest, split, train, evaluate, register) on the training device."""
    if clock.left() < 200 and size != "smoke":
        result["notes"].append("demo: skipped, the time budget ran out")
        return
    import shutil

    from medxfer.config.spec import load_spec
    from medxfer.runall import run_all

    from benchmarks import fixtures

    small = size in ("smoke", "tiny")
    limit = 24 if small else None
    spec_path = fixtures.dataset("breast", limit)
    spec = load_spec(spec_path)
    ws = common.work_dir("runs", f"gpu-demo-{limit}")
    shutil.rmtree(ws, ignore_errors=True)
    over = list(common.TINY_TRAIN) if small else []
    t0 = time.perf_counter()
    try:
        res = run_all(spec, ws, overrides=over, device=dev.type)
    except Exception as exc:  # noqa: BLE001 - offline without pretrained weights: retry without them, say so
        if "weights" not in str(exc).lower():
            raise
        result["notes"].append(f"demo: default weights unavailable here ({type(exc).__name__}); ran weights=none")
        shutil.rmtree(ws, ignore_errors=True)
        t0 = time.perf_counter()
        res = run_all(spec, ws, overrides=[*over, "weights=none"], device=dev.type)
    wall = time.perf_counter() - t0
    result["rows"].append(
        {
            "section": "demo",
            "set": "2D BreastMNIST DICOM demo, default recipe" + (" (tiny: 24 per split, 1 epoch)" if small else ""),
            "device": str(dev),
            "wall_s": wall,
            "stage_s": {k: round(v, 1) for k, v in res.seconds.items()},
            "test": res.test,
        }
    )
    shutil.rmtree(ws, ignore_errors=True)


def _ddp_worker(rank: int, world: int, port: int, out: Any) -> None:
    import os

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    model, recipe, fmt = _model(2, dev, True)
    net = DDP(model, device_ids=[rank])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    for _ in range(5):
        x = torch.rand(32, 1, 128, 128, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (32,), generator=g).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize(dev)
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        out.put(
            {
                "max_weight_diff": float(max((t - gathered[0]).abs().max() for t in gathered)),
                "seconds": time.perf_counter() - t0,
            }
        )
    dist.destroy_process_group()


def section_ddp(result: dict[str, Any], dev: Any, size: str, clock: _Clock) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if n < 2:
        result["notes"].append(f"ddp: skipped, {n} GPU visible (the NCCL sanity run needs 2)")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, q), nprocs=2, join=True, start_method="spawn")
    r = q.get(timeout=60)
    ok = r["max_weight_diff"] == 0.0
    result["rows"].append({"section": "ddp", "set": "2D 128 px, 2 ranks, NCCL, 5 steps", **r, "ok": ok})
    if not ok:
        result["errors"].append(f"ddp: ranks disagree on the weights by {r['max_weight_diff']}")


_SECTIONS = (
    ("amp", section_amp),
    ("frozen_groups", section_frozen_groups),
    ("data_path", section_data_path),
    ("compile", section_compile),
    ("demo", section_demo),
    ("ddp", section_ddp),
)


def run(size: str = "full", smoke: bool = False) -> dict[str, Any]:
    import torch

    size = "smoke" if smoke else size
    result = common.new_result(NAME, TITLE, "tiny" if smoke else size)
    if not smoke and not torch.cuda.is_available():
        raise common.Skip(
            "no CUDA device on this machine; not run here (the benchmark session that produced the "
            "committed results had no GPU lent). Run `python -m benchmarks.run_all --only gpu_amp` "
            "on a CUDA machine; `python -m benchmarks.gpu_amp --smoke` runs the same code on the CPU."
        )
    common.require("medxfer.models.factory", "the encoder factory (medxfer.models.factory)")
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as medxfer.training.distributed.setup_device sets it
    result["errors"] = []
    result["sections"] = {}
    clock = _Clock(_BUDGET_S)
    for name, fn in _SECTIONS:
        t0 = time.perf_counter()
        try:
            fn(result, dev, size, clock)
            status = "ok"
        except ImportError as exc:
            status = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' numbers
            status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            result["errors"].append(f"{name}: {status}")
        result["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"gpu_amp: {name}: {status} in {result['sections'][name]['seconds']} s", file=sys.stderr, flush=True)
    if smoke:
        result["name"] = f"{NAME}_smoke"
        result["notes"].append("smoke: the same code on the CPU at tiny sizes; numbers are meaningless")
    result["wall_s"] = round(clock.budget - clock.left(), 1)
    return result


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:
        res = run(smoke=True)
        common.write_result(res)
        common.print_result(res)
        sys.exit(1 if res["errors"] else 0)
    common.script_main(run)

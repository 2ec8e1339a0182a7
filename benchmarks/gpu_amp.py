"""Benchmark 7: AMP (bf16, fp16 + GradScaler) against fp32 training on a CUDA GPU, 2D and 3D default recipes.

One prepared script: for each packaged default recipe it builds the recipe's encoder at the
recipe's input size and batch size, feeds real MedMNIST images (resized once, resident on
the GPU so the data path is not measured) and times full fine-tuning steps. Reports samples/s
and peak allocated memory; ratios are AMP / fp32 from the same run. Skips without CUDA.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common

TITLE = "GPU: AMP vs fp32 training samples/s and peak memory"
NAME = "gpu_amp"

# (warm-up steps, timed steps) per size
_STEPS = {"tiny": (1, 2), "quick": (5, 20), "full": (10, 50)}
_SETS = {2: "breastmnist", 3: "adrenalmnist3d"}


def _arm(model: Any, x: Any, y: Any, precision: str, steps: tuple[int, int], channels_last: bool) -> dict[str, Any]:
    import torch

    dev = torch.device("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    warm, timed = steps
    for _ in range(warm):
        step()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    return {
        "samples_per_s": timed * x.shape[0] / wall,
        "step_ms": 1000 * wall / timed,
        "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20,
    }


def run(size: str = "full") -> dict[str, Any]:
    import torch

    result = common.new_result(NAME, TITLE, size)
    if not torch.cuda.is_available():
        raise common.Skip(
            "no CUDA device on this machine; not run here (the benchmark session that produced the "
            "committed results had no GPU lent). Run `python -m benchmarks.run_all --only gpu_amp` "
            "on a CUDA machine."
        )
    factory = common.require("medxfer.models.factory", "the encoder factory (medxfer.models.factory)")
    from medxfer.config.recipe import load_recipe

    t0 = time.perf_counter()
    precisions = ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    for dims, dataset in _SETS.items():
        recipe = load_recipe(None, dims)
        input_size = recipe.data.size or [28] * dims
        batch = recipe.data.batch_size if size != "tiny" else 4
        x, y = common.medmnist_tensors(dataset, input_size, limit=batch)
        x, y = x.cuda(), y.cuda()
        base = None
        for prec in precisions:
            torch.manual_seed(0)
            model = factory.create_classifier(recipe.encoder, 2, in_chans=1, spatial_dims=dims, weights="none").cuda()
            if recipe.channels_last and dims == 2:
                model = model.to(memory_format=torch.channels_last)
            m = _arm(model, x, y, prec, _STEPS[size], recipe.channels_last)
            base = base or m
            result["rows"].append(
                {
                    "recipe": f"default_{dims}d",
                    "encoder": recipe.encoder,
                    "input": "x".join(map(str, input_size)),
                    "batch": batch,
                    "precision": prec,
                    "samples_per_s": m["samples_per_s"],
                    "step_ms": m["step_ms"],
                    "peak_mem_mib": m["peak_mem_mib"],
                    "speedup_vs_fp32": m["samples_per_s"] / base["samples_per_s"],
                    "mem_vs_fp32": m["peak_mem_mib"] / base["peak_mem_mib"],
                }
            )
            if prec != "fp32":
                result["ratios"][f"{dims}D {prec} / fp32 samples/s"] = common.ratio_entry(
                    m["samples_per_s"] / base["samples_per_s"], None
                )
            del model
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    common.script_main(run)

"""Benchmark 2: training step throughput.

(a) ``medxfer.training.stage.train`` samples/s (its own per-epoch training-only measurement, from the run
    history) against a plain hand-written torch loop with the same encoder, pretrained weights,
    batch size and input size: AdamW + cross-entropy over real MedMNIST images held in memory as
    one tensor (the ideal data path; augmentation is off in the pipeline run too). Target >= 0.95x.
(b) head-only (stage 0: encoder frozen, no gradient through it) against full fine-tuning, both from
    the same pipeline run (``stages: [{epoch: 0, groups: 0}, {epoch: H, groups: all}]``), skipping the
    first epoch of each stage. The hand-written loop's frozen-encoder step is reported as context.
    Target >= 3x.

Arms run in their own processes, in the order hand, pipeline, hand; the baseline is the mean of
the two hand runs so drift on a shared machine hits both sides.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import common, fixtures

TITLE = "Training step: pipeline vs hand-written torch loop; head-only vs full fine-tuning"
NAME = "train_step"
TARGET_LOOP = 0.95
TARGET_HEAD = 3.0

# (demo studies per split, epochs per pipeline stage, hand-loop timed epochs) per size
# full: 200 studies, not all: a step costs the same whatever the set size, and a full `make bench`
# spends its CPU time on the accuracy study.
_PLAN = {"tiny": (24, 1, 1), "quick": (120, 3, 2), "full": (200, 3, 2)}
_SETS = {
    "tiny": (("2D", "breast", "breastmnist", 2),),
    "quick": (("2D", "breast", "breastmnist", 2),),
    "full": (("2D", "breast", "breastmnist", 2), ("3D", "adrenal", "adrenalmnist3d", 3)),
}


def arm_hand(
    dataset: str, dims: int, n: int, epochs: int, head_only: bool, extra: list[str] | None = None
) -> dict[str, Any]:
    """The loop a user writes by hand: no framework, in-memory tensors, AdamW + cross-entropy."""
    import torch
    from medxfer.config.recipe import load_recipe
    from medxfer.models.factory import create_classifier

    recipe = load_recipe(None, dims, extra or [])
    size = recipe.data.size or [28] * dims
    x_all, y_all = common.medmnist_tensors(dataset, size, limit=n)
    torch.manual_seed(0)
    model = create_classifier(recipe.encoder, 2, in_chans=1, spatial_dims=dims, weights=recipe.weights)
    if head_only:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = recipe.data.batch_size
    epoch_s, seen = [], 0
    for e in range(epochs + 1):  # epoch 0 warms up allocators and kernels
        model.train()
        if head_only:
            model.encoder.eval()
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(e))
        t0, seen = time.perf_counter(), 0
        for i in range(0, len(perm) - bs + 1, bs):
            idx = perm[i : i + bs]
            x, y = x_all[idx], y_all[idx]
            if head_only:
                with torch.no_grad():
                    feats = model.encoder(x)
                logits = model.head(feats)
            else:
                logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        epoch_s.append(time.perf_counter() - t0)
    timed = epoch_s[1:]
    return {
        "samples_per_s": seen / (sum(timed) / len(timed)),
        "epoch_s": epoch_s,
        "n": len(y_all),
        "batch_size": bs,
        "size": size,
        "encoder": recipe.encoder,
        "threads": torch.get_num_threads(),
    }


def arm_pipeline(
    kind: str, limit: int | None, dims: int, stage_epochs: int, extra: list[str] | None = None
) -> dict[str, Any]:
    from medxfer.config.spec import load_spec
    from medxfer.training.stage import train

    spec, ws_root = fixtures.prepare(kind, limit)
    run_ws = fixtures.fresh_workspace(spec, ws_root, f"train_step-{kind}-{limit}")
    epochs = 2 * stage_epochs
    res = train(
        load_spec(spec.spec_path),
        run_ws,
        overrides=[
            *(extra or []),
            f"epochs={epochs}",
            f"stages=[{{epoch: 0, groups: 0}}, {{epoch: {stage_epochs}, groups: all}}]",
            "data.augment={}",
        ],
        device="cpu",
    )
    hist = res.main.history
    head = [h["samples_per_s"] for h in hist if h["stage"] == 0]
    full = [h["samples_per_s"] for h in hist if h["stage"] != 0]
    head, full = head[1:] or head, full[1:] or full  # each stage's first epoch warms up (tiny: one epoch)
    return {
        "head_samples_per_s": sum(head) / len(head),
        "full_samples_per_s": sum(full) / len(full),
        "history": [{k: h[k] for k in ("epoch", "stage", "samples_per_s", "epoch_seconds")} for h in hist],
        "n_train": len(fixtures.tables(spec, ws_root)["train"]),
    }


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.training.stage", "the training stage (medxfer.training.stage)")
    common.require("medxfer.models.factory", "the encoder factory (medxfer.models.factory)")
    limit, stage_epochs, hand_epochs = _PLAN[size]
    isolate = size != "tiny"
    t0 = time.perf_counter()

    def call(fn: str, **kw: Any) -> dict[str, Any]:
        if isolate:
            return common.run_isolated(f"benchmarks.train_step:{fn}", **kw)
        return globals()[fn](**kw)

    for label, kind, dataset, dims in _SETS[size]:
        fixtures.prepare(kind, limit)
        extra = common.tiny_train(size, dims)
        hand_kw = dict(dataset=dataset, dims=dims, epochs=hand_epochs, extra=extra)
        pipe = None
        hands: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        # hand, pipeline, hand: drift on a shared machine hits both sides; tiny only checks that it runs.
        for step in ("hand", "pipeline", "hand") if isolate else ("pipeline", "hand"):
            if step == "pipeline":
                pipe = call("arm_pipeline", kind=kind, limit=limit, dims=dims, stage_epochs=stage_epochs, extra=extra)
                continue
            n = pipe["n_train"] if pipe else len(fixtures.tables(*fixtures.prepare(kind, limit))["train"])
            for head_only in (False, True):
                hands[head_only].append(call("arm_hand", n=n, head_only=head_only, **hand_kw))
        hand_full = sum(h["samples_per_s"] for h in hands[False]) / len(hands[False])
        hand_head = sum(h["samples_per_s"] for h in hands[True]) / len(hands[True])
        h0 = hands[False][0]
        ctx = {
            "set": label,
            "encoder": h0["encoder"],
            "input": "x".join(map(str, h0["size"])),
            "batch": h0["batch_size"],
            "train_samples": pipe["n_train"],
        }
        result["rows"] += [
            {**ctx, "arm": "hand-written loop, full fine-tuning (baseline)", "samples_per_s": hand_full, "ratio": 1.0},
            {
                **ctx,
                "arm": "medxfer train, full fine-tuning stage",
                "samples_per_s": pipe["full_samples_per_s"],
                "ratio": pipe["full_samples_per_s"] / hand_full,
            },
            {
                **ctx,
                "arm": "hand-written loop, frozen encoder",
                "samples_per_s": hand_head,
                "ratio": hand_head / hand_full,
            },
            {
                **ctx,
                "arm": "medxfer train, head-only stage 0",
                "samples_per_s": pipe["head_samples_per_s"],
                "ratio": pipe["head_samples_per_s"] / hand_full,
            },
        ]
        result["ratios"][f"{label}: pipeline / hand loop (full fine-tuning)"] = common.ratio_entry(
            pipe["full_samples_per_s"] / hand_full, TARGET_LOOP
        )
        result["ratios"][f"{label}: head-only / full step (pipeline)"] = common.ratio_entry(
            pipe["head_samples_per_s"] / pipe["full_samples_per_s"], TARGET_HEAD
        )
        result["ratios"][f"{label}: head-only / full step (hand loop)"] = common.ratio_entry(
            hand_head / hand_full, None
        )
        result.setdefault("details", {})[label] = {"pipeline": pipe, "hand": hands}
    result["notes"].append(
        "pipeline samples/s is its own training-only figure per epoch (validation excluded), "
        "averaged over each stage's epochs after its first; augmentation off in both arms"
    )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    common.script_main(run)

"""Benchmark 2: training step throughput.

(a) ``medxfer.training.stage.train`` samples/s (its own per-epoch training-only measurement, from the run
    history) against a plain hand-written torch loop with the same encoder, pretrained weights,
    batch size and input size: AdamW + cross-entropy over real MedMNIST images held in memory as
    one tensor (the ideal data path; augmentation is off in the pipeline run too). Target >= 0.95x.
(b) head-only (stage 0: encoder frozen, no gradient through it) against full fine-tuning, both from
    the same pipeline run (``stages: [{epoch: 0, groups: 0}, {epoch: H, groups: all}]``), skipping the
    first epoch of each stage. With augmentation off (as here) the head-only stage computes the encoder
    features once, on its first epoch, and trains the head on them after that
    (``medxfer.training.loop._FeatureCache``); the ratio of the stage's first epoch (feature pass + head)
    is reported too. The hand-written loop's frozen-encoder step (encoder forward every batch) is context.
    Target >= 3x.

Estimator. Both arms also time every optimiser step (the pipeline's from one ``on_step_end`` to the next: loader
wait, forward, loss, backward, step) and the ratio with the target is the one of the median step times: on the
shared 2-core VM an epoch mean swings up to 5x with the other jobs' load (hand-loop epochs of 14 s and 70 s in one
run), a median step does not. The epoch-mean ratio (history samples/s) is kept beside it. The hand loop does what
the recipe does to BatchNorm (``freeze_bn_stats``: the 3D default keeps the pretrained statistics, so its BN layers
run in eval mode, ~6% cheaper a step), so the two arms compute the same thing and the ratio is the pipeline's
overhead alone.

Arms run in their own processes, in the order hand, pipeline, hand (then pipeline, hand again per
repeat); each pipeline run is compared with the mean of the hand runs either side of it, so drift on a
shared machine hits both sides, and the ratios are the median over repeats with their range.
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
# full: 3, so that the median is not the mean of two: with 2 the 3D ratio was 0.87 from runs of 0.74 and 0.99
# (idle fresh clone, 13:29 UTC), while an interleaved A/B of the same code measured 1.01.
_REPEATS = {"tiny": 1, "quick": 1, "full": 3}
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
    epoch_s, step_s, seen = [], [], 0
    for e in range(epochs + 1):  # epoch 0 warms up allocators and kernels
        model.train()
        if head_only:
            model.encoder.eval()
        if recipe.freeze_bn_stats:  # as the recipe trains: pretrained BatchNorm statistics kept (eval mode)
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(e))
        t0, seen = time.perf_counter(), 0
        for i in range(0, len(perm) - bs + 1, bs):
            ts = time.perf_counter()
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
            if e:
                step_s.append(len(y) / (time.perf_counter() - ts))
        epoch_s.append(time.perf_counter() - t0)
    timed = epoch_s[1:]
    return {
        "samples_per_s": seen / (sum(timed) / len(timed)),
        "median_step_samples_per_s": common.median(step_s),
        "epoch_s": epoch_s,
        "step_samples_per_s": [round(t, 3) for t in step_s],
        "freeze_bn_stats": recipe.freeze_bn_stats,
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
    from medxfer.training.callbacks import Callback
    from medxfer.training.stage import train

    class StepTimes(Callback):
        """Samples/s of each optimiser step (from the previous step's end, the first from the epoch's start),
        per (stage, epoch)."""

        def __init__(self) -> None:
            self.steps: dict[tuple[int, int], list[float]] = {}
            self.last, self.seen = 0.0, 0

        def on_epoch_start(self, fit: Any, epoch: int) -> None:
            self.key, self.seen, self.last = (fit.unfreezer.stage, epoch), 0, time.perf_counter()

        def on_step_end(self, fit: Any, loss_sum: Any, seen: int) -> None:
            now = time.perf_counter()
            self.steps.setdefault(self.key, []).append((seen - self.seen) / max(now - self.last, 1e-9))
            self.last, self.seen = now, seen

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
        callbacks=[timer := StepTimes()],
    )
    hist = res.main.history
    head_all = [h["samples_per_s"] for h in hist if h["stage"] == 0]
    full = [h["samples_per_s"] for h in hist if h["stage"] != 0]
    head, full = head_all[1:] or head_all, full[1:] or full  # each stage's first epoch warms up (tiny: one epoch)
    head_s = [h["epoch_seconds"] for h in hist if h["stage"] == 0]
    full_epochs = sorted(k for k in timer.steps if k[0] != 0)
    full_steps = [t for k in (full_epochs[1:] or full_epochs) for t in timer.steps[k]]  # after the stage's first
    return {
        "head_samples_per_s": sum(head) / len(head),
        # the stage's first epoch: the feature pass (encoder over every study once) plus the head's steps
        "head_first_epoch_samples_per_s": head_all[0],
        "head_epoch_seconds": head_s,
        "full_samples_per_s": sum(full) / len(full),
        "full_median_step_samples_per_s": common.median(full_steps),
        "full_step_samples_per_s": [round(t, 3) for t in full_steps],
        "history": [{k: h[k] for k in ("epoch", "stage", "samples_per_s", "epoch_seconds")} for h in hist],
        "n_train": len(fixtures.tables(spec, ws_root)["train"]),
    }


def _spread(xs: list[float]) -> dict[str, Any]:
    return {"median": common.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _entry(xs: list[float], target: float | None) -> dict[str, Any]:
    e = common.ratio_entry(common.median(xs), target)
    e["spread"] = _spread(xs)
    return e


def _carry_over(result: dict[str, Any], ran: list[str]) -> None:
    """Rows and ratios of the sets not re-run, from the committed result, marked as such (a partial re-run)."""
    import json

    path = common.results_dir() / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("status") != "ok":
        return
    keep = sorted({r["set"] for r in old.get("rows", [])} - set(ran))
    if not keep:
        return
    result["rows"] += [r for r in old["rows"] if r["set"] in keep]
    result["ratios"].update({k: v for k, v in old["ratios"].items() if k.split(":")[0] in keep})
    result.setdefault("details", {}).update({k: v for k, v in old.get("details", {}).items() if k in keep})
    result["notes"].append(
        f"{', '.join(keep)}: not re-run here; rows and ratios carried over from the run of {old['created']}"
        f" (commit {old.get('versions', {}).get('git_commit')})"
    )


def run(size: str = "full", sets: list[str] | None = None) -> dict[str, Any]:
    """``sets`` (labels, e.g. ["2D"]): run only those and carry the others over from the committed result."""
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

    ran: list[str] = []
    # --only picks from every set at any size (e.g. `quick --only 3D` while working on the 3D step)
    for label, kind, dataset, dims in _SETS["full"] if sets is not None else _SETS[size]:
        if sets is not None and label not in sets:
            continue
        ran.append(label)
        fixtures.prepare(kind, limit)
        extra = common.tiny_train(size, dims)
        hand_kw = dict(dataset=dataset, dims=dims, epochs=hand_epochs, extra=extra)
        n = len(fixtures.tables(*fixtures.prepare(kind, limit))["train"])
        pipes: list[dict[str, Any]] = []
        hands: list[dict[bool, dict[str, Any]]] = []  # one {full, head-only} pair per hand slot

        def hand(n: int = n, hand_kw: dict[str, Any] = hand_kw, hands: list = hands) -> None:
            hands.append({h: call("arm_hand", n=n, head_only=h, **hand_kw) for h in (False, True)})

        # hand, (pipeline, hand) x repeats: every pipeline run sits between two hand runs; tiny only checks it runs.
        if isolate:
            hand()
        for _ in range(_REPEATS[size]):
            pipes.append(
                call("arm_pipeline", kind=kind, limit=limit, dims=dims, stage_epochs=stage_epochs, extra=extra)
            )
            hand()
        loop_r, step_r, head_r, head_first_r, hand_head_r, base = [], [], [], [], [], []
        for i, pipe in enumerate(pipes):
            around = hands[i : i + 2] if isolate else hands[i : i + 1]
            hand_full = sum(h[False]["samples_per_s"] for h in around) / len(around)
            hand_head = sum(h[True]["samples_per_s"] for h in around) / len(around)
            hand_step = common.median([s for h in around for s in h[False]["step_samples_per_s"]])
            base.append((hand_full, hand_head, hand_step))
            loop_r.append(pipe["full_samples_per_s"] / hand_full)
            step_r.append(pipe["full_median_step_samples_per_s"] / hand_step)
            head_r.append(pipe["head_samples_per_s"] / pipe["full_samples_per_s"])
            head_first_r.append(pipe["head_first_epoch_samples_per_s"] / pipe["full_samples_per_s"])
            hand_head_r.append(hand_head / hand_full)
        k = sorted(range(len(pipes)), key=lambda i: step_r[i])[len(pipes) // 2]  # rows from the median run
        pipe, (hand_full, hand_head, hand_step) = pipes[k], base[k]
        h0 = hands[0][False]
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
                "arm": "hand-written loop, full fine-tuning, median step (baseline of the target ratio)",
                "samples_per_s": hand_step,
                "ratio": 1.0,
            },
            {
                **ctx,
                "arm": "medxfer train, full fine-tuning stage, median step",
                "samples_per_s": pipe["full_median_step_samples_per_s"],
                "ratio": pipe["full_median_step_samples_per_s"] / hand_step,
            },
            {
                **ctx,
                "arm": "hand-written loop, frozen encoder",
                "samples_per_s": hand_head,
                "ratio": hand_head / hand_full,
            },
            {
                **ctx,
                "arm": "medxfer train, head-only stage 0, first epoch (feature pass + head)",
                "samples_per_s": pipe["head_first_epoch_samples_per_s"],
                "ratio": pipe["head_first_epoch_samples_per_s"] / hand_full,
            },
            {
                **ctx,
                "arm": "medxfer train, head-only stage 0, later epochs (cached features)",
                "samples_per_s": pipe["head_samples_per_s"],
                "ratio": pipe["head_samples_per_s"] / hand_full,
            },
        ]
        result["ratios"][f"{label}: pipeline / hand loop (full fine-tuning, median step)"] = _entry(step_r, TARGET_LOOP)
        result["ratios"][f"{label}: pipeline / hand loop (full fine-tuning, epoch means)"] = _entry(loop_r, None)
        result["ratios"][f"{label}: head-only / full step (pipeline)"] = _entry(head_r, TARGET_HEAD)
        result["ratios"][f"{label}: head-only first epoch (feature pass) / full step (pipeline)"] = _entry(
            head_first_r, None
        )
        result["ratios"][f"{label}: head-only / full step (hand loop)"] = _entry(hand_head_r, None)
        result.setdefault("details", {})[label] = {
            "median_run": k,
            "pipeline": pipes,
            "hand": [{"full": h[False], "head_only": h[True]} for h in hands],
        }
    result["notes"].append(
        "pipeline samples/s is its own training-only figure per epoch (validation excluded), "
        "averaged over each stage's epochs after its first; 'median step': the median of every optimiser step's "
        "samples/s over the same epochs (the target ratio: robust to the shared VM's load swings); "
        "augmentation off in both arms; the hand loop freezes BatchNorm statistics when the recipe does; "
        f"{_REPEATS[size]} pipeline run(s) per set, each against the mean of the hand runs either side; "
        "ratios are medians with their range in 'spread'"
    )
    if sets is not None:
        _carry_over(result, ran)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    import sys

    # python -m benchmarks.train_step [size] [--only 2D|3D]
    args = sys.argv[1:]
    only = [args[args.index("--only") + 1]] if "--only" in args else None
    size_arg = args[0] if args and not args[0].startswith("--") else "quick"
    common.script_main(lambda _s: run(size_arg, only))

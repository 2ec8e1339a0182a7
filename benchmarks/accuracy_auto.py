"""Benchmark 4b: ``medxfer run --auto --budget B`` on the two demo sets, the numbers issue #12 asks for.

Each run is the product end to end through :func:`medxfer.autorun.auto_run`: ingest -> plan -> k-fold split (the
MedMNIST test studies pinned) -> the arm race on out-of-fold predictions -> the winner's fold ensemble ->
evaluate (calibration and threshold on the out-of-fold logits; the test split is read once, here) -> register.
The seed (``--set seed=N``) varies initialisation and data order; the split stays fixed.

Reported per set: test AUROC mean +- sd over the seeds, test ECE after calibration, the arm the race chose
(and whether it called negative transfer), and wall clock / budget. Goals (issue #12, 2-core CPU, 30 min):
BreastMNIST >= 0.94 mean with sd <= 0.01, AdrenalMNIST3D >= 0.86 mean, ECE <= 0.05 on both, wall clock within
the budget + 10%. Anchors: MedMNIST+ best 0.940 (BreastMNIST), ResNet-18+ACS 0.839 (AdrenalMNIST3D).

The full size is 3 seeds x 2 sets x 30 min = 3 hours of one machine; ``MEDXFER_AUTO_BUDGET`` (e.g. ``10m``),
``MEDXFER_AUTO_SEEDS`` (e.g. ``0``) and ``MEDXFER_AUTO_SETS`` (e.g. ``adrenal``) shorten it, and the result says
what ran. Results are written after every run, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from typing import Any

from benchmarks import common, fixtures

TITLE = "run --auto within a wall-clock budget: test AUROC (mean +- sd over seeds), ECE, budget kept"
NAME = "accuracy_auto"
SETS = {  # label, dataset, dims, anchor, AUROC target, sd target
    "breast": ("BreastMNIST (2D, DICOM)", "breast", 2, {"MedMNIST+ best": 0.940, "AutoML Vision": 0.919}, 0.94, 0.01),
    "adrenal": ("AdrenalMNIST3D (3D, NIfTI)", "adrenal", 3, {"ResNet-18+ACS": 0.839}, 0.86, None),
}
TARGET_ECE = 0.05
# size -> (demo limit, budget, seeds, sets)
_PLAN: dict[str, tuple[int | None, str, list[int], list[str]]] = {
    "tiny": (24, "2m", [0], ["breast"]),
    "quick": (None, "5m", [0], ["breast"]),
    "full": (None, "30m", [0, 1, 2], ["breast", "adrenal"]),
}


def one_run(
    kind: str, limit: int | None, budget: str, seed: int, extra: list[str], folds: int | None = None
) -> dict[str, Any]:
    from medxfer.autorun import auto_run
    from medxfer.config.spec import load_spec

    spec = load_spec(fixtures.dataset(kind, limit))
    ws = common.work_dir("runs", f"auto-{kind}-{limit}-{budget}-{seed}")
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    t0 = time.perf_counter()
    res = auto_run(spec, ws, budget=budget, overrides=[f"seed={seed}", *extra], device="cpu", force=True, folds=folds)
    wall = time.perf_counter() - t0
    s = res.summary()

    def val(k: str) -> float | None:
        v = (s.get("test") or {}).get(k)
        return float(v["value"]) if isinstance(v, dict) and v.get("value") is not None else None

    auroc = (s.get("test") or {}).get("auroc") or {}
    return {
        "auroc": val("auroc"),
        "auroc_ci": [auroc.get("ci_low"), auroc.get("ci_high")],
        "ece": val("ece"),
        "brier": val("brier"),
        "wall_s": round(wall, 1),
        "budget_s": s["budget"]["budget_s"],
        "planned_train_s": s["budget"]["planned_train_s"],
        "actual_train_s": s["budget"]["actual_train_s"],
        "winner": s["winner"],
        "reason": s["reason"],
        "negative_transfer": s["negative_transfer"],
        "folds": s["race"].get("folds"),
        "arms": [
            {k: a.get(k) for k in ("name", "oof_auroc", "diff_vs_best", "seconds", "planned_s", "eliminated_at_rung")}
            for a in s["race"]["arms"]
        ],
        "alias": s.get("alias"),
    }


def _summarise(result: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    from medxfer.autorun import OVER_BUDGET  # the product's promise: the budget + 10%

    rows, ratios = [], {}
    # One row per set and budget: a result may merge runs at two budgets (e.g. 10m seeds and a 30m run).
    for set_key, budget_s in dict.fromkeys((r["set"], r.get("budget_s")) for r in runs):
        group = [r for r in runs if (r["set"], r.get("budget_s")) == (set_key, budget_s) and r.get("auroc") is not None]
        if not group:
            continue
        name, _, _, anchors, target, sd_target = SETS[set_key]
        label = f"{name}, --budget {budget_s / 60:g}m"
        aucs = [r["auroc"] for r in group]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else float("nan")
        eces = [r["ece"] for r in group if r.get("ece") is not None]
        over = max(r["wall_s"] / r["budget_s"] for r in group)
        rows.append(
            {
                "set": name,
                "seeds": len(aucs),
                "budget": group[0]["budget_s"],
                "test_auroc_mean": round(statistics.mean(aucs), 4),
                "test_auroc_sd": round(sd, 4) if sd == sd else None,
                "test_ece_mean": round(statistics.mean(eces), 4) if eces else None,
                "winners": ", ".join(r["winner"] for r in group),
                "negative_transfer": ", ".join("yes" if r["negative_transfer"] else "no" for r in group),
                "wall_s_each": ", ".join(f"{r['wall_s']:.0f}" for r in group),
                "best_anchor": f"{max(anchors.values()):.3f}",
            }
        )
        ratios[f"{label}: run --auto test AUROC (mean)"] = common.ratio_entry(
            statistics.mean(aucs), target, what="absolute AUROC"
        )
        if sd_target is not None and sd == sd:
            ratios[f"{label}: test AUROC sd over seeds"] = common.ratio_entry(
                sd, sd_target, higher_is_better=False, what="sd"
            )
        if eces:
            ratios[f"{label}: test ECE after calibration (mean)"] = common.ratio_entry(
                statistics.mean(eces), TARGET_ECE, higher_is_better=False, what="ECE"
            )
        ratios[f"{label}: wall clock / budget (worst run)"] = common.ratio_entry(
            over, OVER_BUDGET, higher_is_better=False, what="ratio"
        )
    result["rows"], result["ratios"] = rows, ratios


def run(size: str = "full") -> dict[str, Any]:
    result = common.new_result(NAME, TITLE, size)
    common.require("medxfer.autorun", "run --auto (medxfer.autorun)")
    limit, budget, seeds, sets = _PLAN[size]
    budget = os.environ.get("MEDXFER_AUTO_BUDGET", budget)
    if os.environ.get("MEDXFER_AUTO_SEEDS"):
        seeds = [int(s) for s in os.environ["MEDXFER_AUTO_SEEDS"].split(",")]
    if os.environ.get("MEDXFER_AUTO_SETS"):  # e.g. "adrenal": one set at a budget of its own
        sets = [s for s in os.environ["MEDXFER_AUTO_SETS"].split(",") if s in SETS]
    # tiny: the smoke test's size (2 folds, 1 epoch at 32 px); it checks that the path runs, not what it scores
    extra, folds = (list(common.TINY_TRAIN), 2) if size == "tiny" else ([], None)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    result["runs"] = runs
    result["anchors"] = {SETS[k][0]: SETS[k][3] for k in SETS}
    result["notes"] += [
        f"budget per run {budget} of wall time on this machine (ingest to registered model); seeds {seeds}",
        "split fixed (spec seed 0, MedMNIST test pinned); selection on out-of-fold predictions only; "
        "the test split is read once per run, by evaluate",
    ]
    for seed in seeds:  # seeds outermost: a stopped run still has one complete seed of every set
        for set_key in sets:
            _, kind, _, _, _, _ = SETS[set_key]
            try:
                kw = {"kind": kind, "limit": limit, "budget": budget, "seed": seed, "extra": extra, "folds": folds}
                r = common.run_isolated("benchmarks.accuracy_auto:one_run", **kw) if size != "tiny" else one_run(**kw)
            except RuntimeError as exc:
                r = {"error": str(exc)[-800:]}
            runs.append({"set": set_key, "seed": seed, **r})
            _summarise(result, runs)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            if size != "tiny":
                common.write_result(result)
    if any("error" in r for r in runs):
        result["notes"].append(f"{sum('error' in r for r in runs)} run(s) failed; see runs[].error")
    return result


if __name__ == "__main__":
    common.script_main(run)

"""The arm race of ``medxfer run --auto``: successive halving over folds, then selection on out-of-fold predictions.

Pure: no training, no I/O. The orchestrator (:mod:`medxfer.autorun`) trains what :meth:`Race.next_rung` asks for,
hands each fold model's logits on its own validation fold to :meth:`Race.record`, and closes the rung; this module
decides who goes on, who wins and why.

**Schedule.** Rungs over folds: rung r brings the folds trained so far to min(k, 2^r) (k = 5: folds {0}, {1},
{2, 3}, {4}; k = 2: {0}, {1}). Every arm trains rung 0; after each rung but the last, ceil(alive / 2) arms go on
(eta = 2). A fold is the unit, not an epoch: the members of the fold ensemble must share one recipe (epochs
included), so an arm's epochs cannot change between its folds, and a fully trained fold model is what the
ensemble would use anyway. Comparing arms on the same folds makes the comparison paired.

**Who goes on.** On the studies of the folds every alive arm has trained: each arm's OOF AUROC with a
patient-bootstrap CI, and each arm's paired patient-bootstrap difference from the best arm. An arm whose
difference CI lies wholly below 0 stops (it lost). Of the rest, the arm the selection rule would pick now (the
simplest arm tied with the best) always goes on, so a tie-break that favours it can still happen at the end;
the other places go to the highest OOF AUROC.

**Budget.** After each rung the measured seconds per fold re-plan the rest: when the remaining rungs, at the
measured cost, would end past the training deadline, fewer arms go on (down to one: the current pick).

**Selection.** After the last rung, among the finalists (every fold trained): the best OOF AUROC; the arms
whose difference CI from it includes 0 tie with it; the simplest of the tied arms wins (:func:`simplicity_order`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from medxfer.core.errors import MedxferError
from medxfer.stats import metrics as M

ETA = 2
# The transfer family, simplest first. The probe trains the head alone (fewest free parameters: the plan costs
# its step at 0.4x a full one, and it cannot overfit the encoder on a small set); progressive unfreezing trains
# the head first and the encoder later (fewer encoder updates, 0.8x); transfer fine-tunes every group from epoch
# 0. When two of them cannot be told apart on out-of-fold predictions, the one with less to overfit is preferred.
FAMILY_ORDER = ("probe", "progressive", "transfer")
# Scratch sits in that order by its measured training cost (seconds per epoch x epochs, from the training loop:
# the first fold run of a workspace also pays for decoding and caching the data, which is no cost of its arm):
# it is placed after every family arm that costs no more than 1.25x it. Scratch and transfer do the same work per
# step, and the same arm's epoch took 6.8 s on one fold and 11.9 s on the next on the loaded 2-core machine, so
# only a clear saving counts; below it, at equal OOF AUROC, a pretrained encoder (which has seen far more images
# than the user's set) is kept, and scratch must win outright to be chosen.
COST_SLACK = 1.25
NEGATIVE_TRANSFER = "negative transfer: scratch was chosen"


def rung_folds(k: int) -> list[list[int]]:
    """The new folds each rung trains: cumulative 1, 2, 4, ... up to k."""
    if k < 2:
        raise MedxferError(f"the race needs at least 2 folds (got {k}); set a larger --budget or split.folds >= 2")
    out, done, size = [], 0, 1
    while done < k:
        nxt = min(k, size)
        out.append(list(range(done, nxt)))
        done, size = nxt, size * ETA
    return out


def halving_cost(costs: list[float], rungs: list[list[int]]) -> float:
    """Seconds these rungs take when the arms of these per-fold ``costs`` enter the first of them and
    ceil(n / ETA) go on after each, the costliest surviving (an upper bound: no early losses)."""
    costs = sorted(costs, reverse=True)
    n, total = len(costs), 0.0
    for new in rungs:
        total += len(new) * sum(costs[:n])
        n = max(1, math.ceil(n / ETA))
    return total


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logit_columns(df: pd.DataFrame) -> list[str]:
    cols = sorted((c for c in df.columns if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    if not cols:
        raise MedxferError("an out-of-fold table has no logit_0 ... columns")
    return cols


def _iv(iv: M.Interval) -> dict[str, float | None]:
    d = iv.as_dict()
    return {"value": d["value"], "lo": d["ci_low"], "hi": d["ci_high"]}


@dataclass
class RaceArm:
    name: str
    kind: str  # transfer | progressive | probe | scratch
    epochs: int
    planned_s: float  # per fold, the plan's estimate
    seconds: dict[int, float] = field(default_factory=dict)  # fold -> measured wall seconds
    train_s: dict[int, float] = field(default_factory=dict)  # fold -> training-loop seconds (epoch_s x epochs)
    oof: dict[int, pd.DataFrame] = field(default_factory=dict)  # fold -> study_key, fold, logit_*
    run_ids: dict[int, str] = field(default_factory=dict)
    eliminated_at_rung: int | None = None
    planned_s_per_sample: float | None = None  # the plan's probed training-step seconds per sample
    s_per_sample: dict[int, float] = field(default_factory=dict)  # fold -> the training loop's, measured

    @property
    def cost(self) -> float:
        """Seconds per fold: measured when it has trained a fold, else the plan's estimate."""
        return float(np.mean(list(self.seconds.values()))) if self.seconds else float(self.planned_s)

    @property
    def train_cost(self) -> float:
        """Training-loop seconds per fold (what the simplicity order compares); wall seconds when not recorded."""
        return float(np.mean(list(self.train_s.values()))) if self.train_s else self.cost

    def table(self) -> pd.DataFrame:
        return pd.concat([self.oof[f] for f in sorted(self.oof)], ignore_index=True)


def simplicity_order(arms: list[RaceArm]) -> list[str]:
    """Arm names, simplest/cheapest first: the family in FAMILY_ORDER, scratch placed by its measured cost."""
    family = sorted((a for a in arms if a.kind != "scratch"), key=lambda a: FAMILY_ORDER.index(a.kind))
    out = [a.name for a in family]
    for s in (a for a in arms if a.kind == "scratch"):
        cheaper = [i for i, a in enumerate(family) if a.train_cost <= s.train_cost * COST_SLACK]
        out.insert(out.index(family[max(cheaper)].name) + 1 if cheaper else 0, s.name)
    return out


@dataclass
class Labels:
    """The non-test studies: their label index and patient, for the bootstrap (pseudonyms only)."""

    table: pd.DataFrame  # study_key, y, patient_key
    n_classes: int
    positive_index: int | None = None  # binary: which column is the positive class

    def scores(self, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(study_key, y, prob, patients) for the studies of ``oof``, in study_key order."""
        df = oof.merge(self.table, on="study_key", how="inner", validate="one_to_one").sort_values("study_key")
        prob = _softmax(df[logit_columns(oof)].to_numpy(np.float64))
        y = df["y"].to_numpy(int)
        if self.n_classes == 2:
            pos = 1 if self.positive_index is None else self.positive_index
            prob, y = M.binary_prob(prob, pos), (y == pos).astype(int)
        return df["study_key"].to_numpy(), y, prob, df["patient_key"].to_numpy()


# macro one-vs-rest AUROC (for two classes, the AUROC), as the batched bootstrap statistic: ~6x the per-resample loop
_auroc_stat = M.auroc_statistic(None)


def compare(
    arms: dict[str, pd.DataFrame], labels: Labels, n_resamples: int, seed: int, best: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per arm: OOF AUROC with its patient-bootstrap CI (on the arm's own studies) and, against ``best`` (default:
    the highest AUROC), the paired bootstrap difference on the studies both have."""
    scored = {n: labels.scores(df) for n, df in arms.items()}
    out: dict[str, dict[str, Any]] = {}
    for n, (_, y, p, pat) in scored.items():
        res = M.bootstrap(y, p, pat, _auroc_stat, n_resamples=n_resamples, seed=seed)
        out[n] = {"oof_auroc": _iv(res.intervals["auroc"]), "n_studies": int(y.size)}
    best = best or max(out, key=lambda n: _nan_low(out[n]["oof_auroc"]["value"]))
    for n, sc in scored.items():
        out[n]["diff_vs_best"] = (
            {"value": 0.0, "lo": 0.0, "hi": 0.0} if n == best else _paired(sc, scored[best], n_resamples, seed)
        )
    return {"best": best, "arms": out}


def _paired(a: tuple, b: tuple, n_resamples: int, seed: int) -> dict[str, Any]:
    """AUROC of ``a`` minus ``b`` (two :meth:`Labels.scores`), paired patient bootstrap on the studies both have."""
    (k, y, p, pat), (kb, _, pb, _) = a, b
    common, ia, ib = np.intersect1d(k, kb, return_indices=True)
    d = M.paired_bootstrap_diff(y[ia], p[ia], pb[ib], pat[ia], M.macro_auroc, n_resamples=n_resamples, seed=seed)
    return _iv(d["diff"]) | {"n_studies": int(common.size)}


def _nan_low(v: float | None) -> float:
    return -math.inf if v is None or not math.isfinite(v) else float(v)


def _tied(stats: dict[str, Any]) -> list[str]:
    """Arms whose difference CI from the best includes 0 (an unknown CI counts as a tie: nothing shows a loss).

    An upper bound of exactly 0 under a negative difference is a loss, not a tie: the arm was never better in
    97.5% of the resamples, and only equalled the best where both were perfect (16 validation studies, best
    AUROC 1.000 [1.000, 1.000], the other 0.906 with difference -0.094 [-0.334, 0.000]). An identical arm
    (difference 0 [0, 0]) still ties."""
    out = []
    for n, s in stats["arms"].items():
        d = s["diff_vs_best"]
        if d["hi"] is None or d["hi"] > 0 or (d["hi"] == 0 and (d["value"] or 0) >= 0):
            out.append(n)
    return out


@dataclass
class Rung:
    index: int
    folds: list[int]  # the new folds this rung trains
    arms: list[str]


class Race:
    """Successive halving over folds within a budget, then selection; see the module docstring."""

    def __init__(
        self,
        arms: list[RaceArm],
        folds: int,
        labels: Labels,
        budget_s: float,
        train_deadline_s: float | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
    ):
        if not arms:
            raise MedxferError("the race needs at least one arm; check plan.json's arms")
        self.arms = {a.name: a for a in arms}
        self.k = folds
        self.schedule = rung_folds(folds)
        self.labels = labels
        self.budget_s = float(budget_s)
        self.deadline_s = float(train_deadline_s if train_deadline_s is not None else budget_s)
        self.n_resamples, self.seed = n_resamples, seed
        self.alive = [a.name for a in arms]
        self.rungs: list[dict[str, Any]] = []
        self.notes: list[str] = []

    # -- schedule ---------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return len(self.rungs) >= len(self.schedule)

    def next_rung(self) -> Rung | None:
        if self.done:
            return None
        i = len(self.rungs)
        return Rung(i, self.schedule[i], list(self.alive))

    def planned_s(self) -> float:
        """The schedule's cost at the plan's estimates, with halving as planned (no early losses)."""
        return halving_cost([a.planned_s for a in self.arms.values()], self.schedule)

    def record(
        self,
        name: str,
        fold: int,
        seconds: float,
        oof: pd.DataFrame,
        run_id: str | None = None,
        train_s: float | None = None,
        s_per_sample: float | None = None,
    ) -> None:
        arm = self.arms[name]
        if s_per_sample is not None:
            arm.s_per_sample[fold] = float(s_per_sample)
        arm.seconds[fold] = float(seconds)
        if train_s is not None:
            arm.train_s[fold] = float(train_s)
        arm.oof[fold] = oof
        if run_id is not None:
            arm.run_ids[fold] = run_id

    def _projected(self, keep: list[str], rung: int) -> float:
        """Seconds the rungs after ``rung`` need when ``keep`` go on (each later rung halves again)."""
        return halving_cost([self.arms[n].cost for n in keep], self.schedule[rung + 1 :])

    def close_rung(self, elapsed_s: float) -> dict[str, Any]:
        """Compare the alive arms on the folds trained so far; stop losers; re-plan from the measured costs."""
        i = len(self.rungs)
        rung = self.schedule[i]
        for n in self.alive:
            missing = [f for f in rung if f not in self.arms[n].oof]
            if missing:
                raise MedxferError(f"arm {n}: folds {missing} of rung {i} have no out-of-fold predictions")
        upto = [f for r in self.schedule[: i + 1] for f in r]
        tables = {n: self.arms[n].table().loc[lambda d: d["fold"].isin(upto)] for n in self.alive}
        stats = compare(tables, self.labels, self.n_resamples, self.seed)
        last = i == len(self.schedule) - 1
        order = simplicity_order([self.arms[n] for n in self.alive])
        tied = _tied(stats)
        pick = next(n for n in order if n in tied)
        entry: dict[str, Any] = {
            "index": i,
            "folds": upto,
            "arms": list(self.alive),
            "best": stats["best"],
            "pick": pick,
            "stats": stats["arms"],
            "elapsed_s": round(float(elapsed_s), 1),
            "eliminated": [],
            "replan": None,
        }
        if not last:
            lost = [n for n in self.alive if n not in tied]
            contenders = [n for n in self.alive if n in tied]
            keep_n = max(1, math.ceil(len(self.alive) / ETA))
            by_auroc = sorted(contenders, key=lambda n: -_nan_low(stats["arms"][n]["oof_auroc"]["value"]))
            ranked = [pick] + [n for n in by_auroc if n != pick]
            # Re-plan from the measured seconds per fold: fewer arms go on when the rest would end past the deadline.
            while keep_n > 1 and elapsed_s + self._projected(ranked[:keep_n], i) > self.deadline_s:
                keep_n -= 1
            keep = ranked[:keep_n]
            proj = self._projected(keep, i)
            measured = ", ".join(f"{n} {self.arms[n].cost:.0f}s" for n in self.alive)
            entry["replan"] = (
                f"measured seconds per fold ({measured}) re-plan the rest: {len(keep)} arm(s) go on, "
                f"~{proj:.0f} s more training; at {elapsed_s:.0f} s of the {self.deadline_s:.0f} s training deadline"
            )
            if elapsed_s + proj > self.deadline_s:
                over = elapsed_s + proj - self.deadline_s
                note = (
                    f"even {keep[0]} alone needs ~{proj:.0f} s for its remaining folds: the run will pass its "
                    f"training deadline by ~{over:.0f} s (raise --budget, or fewer folds)"
                )
                entry["replan"] += "; " + note
                self.notes.append(note)
            for n in self.alive:
                if n not in keep:
                    self.arms[n].eliminated_at_rung = i
                    entry["eliminated"].append(n)
            entry["lost"] = lost
            self.alive = [n for n in self.alive if n in keep]
        self.rungs.append(entry)
        return entry

    # -- selection --------------------------------------------------------------------------------------------------
    def result(self, actual_s: float | None = None, planned_s: float | None = None) -> dict[str, Any]:
        """The race dict (iface.md): every arm, the winner, why, and the transfer gain."""
        if not self.done:
            raise MedxferError("the race has rungs left to train; close every rung before selecting")
        final = self.rungs[-1]
        winner, best = final["pick"], final["best"]
        full = {n: self.arms[n].table() for n in self.arms}
        every = compare(full, self.labels, self.n_resamples, self.seed, best=best)
        missing = [f for f in range(self.k) if f not in self.arms[winner].oof]
        if missing:  # cannot happen by construction; the ensemble needs every fold
            raise MedxferError(f"internal error: the winner {winner} lacks folds {missing}")
        fs = final["stats"]
        order = simplicity_order([self.arms[n] for n in final["arms"]])
        tied = [n for n in order if n in _tied({"arms": fs})]
        bw = fs[best]["oof_auroc"]
        if winner == best:
            others = [n for n in tied if n != best]
            reason = f"{winner} has the best out-of-fold AUROC, {fmt_interval(bw)}"
            reason += (
                f"; {', '.join(others)} tie with it (difference CI includes 0) but {winner} comes first in the "
                f"order simplest/cheapest first ({' < '.join(order)})"
                if others
                else (
                    "; every other finalist's paired difference CI lies below 0"
                    if len(final["arms"]) > 1
                    else "; it was the only arm left after the earlier rungs"
                )
            )
        else:
            d = fs[winner]["diff_vs_best"]
            reason = (
                f"{winner} ties with the best arm {best} ({fmt_interval(bw)}): difference {fmt_interval(d)} "
                "includes 0, and "
                f"{winner} is simpler/cheaper (order {' < '.join(order)})"
            )
        lost = [n for r in self.rungs for n in r.get("eliminated", [])]
        if lost:
            reason += "; stopped early: " + ", ".join(f"{n} at rung {self.arms[n].eliminated_at_rung}" for n in lost)
        scratch = [n for n, a in self.arms.items() if a.kind == "scratch"]
        negative = bool(scratch) and self.arms[winner].kind == "scratch"
        if negative:
            reason = f"{NEGATIVE_TRANSFER}. " + reason
        arms = []
        for n, a in self.arms.items():
            s = every["arms"][n]
            arms.append(
                {
                    "name": n,
                    "kind": a.kind,
                    "folds": sorted(a.oof),
                    "epochs": a.epochs,
                    "seconds": round(sum(a.seconds.values()), 1),
                    "planned_s": round(a.planned_s * len(a.oof), 1),
                    "run_ids": {str(f): r for f, r in sorted(a.run_ids.items())},
                    "oof_auroc": s["oof_auroc"],
                    "diff_vs_best": {k: s["diff_vs_best"][k] for k in ("value", "lo", "hi")},
                    "eliminated_at_rung": a.eliminated_at_rung,
                    "s_per_sample": _planned_actual(a.planned_s_per_sample, a.s_per_sample),
                }
            )
        return {
            "folds": self.k,
            "budget_s": self.budget_s,
            "planned_s": round(self.planned_s() if planned_s is None else planned_s, 1),
            "actual_s": None if actual_s is None else round(actual_s, 1),
            "rungs": [{k: v for k, v in r.items() if k != "stats"} for r in self.rungs],
            "arms": arms,
            "best": best,
            "winner": winner,
            "reason": reason,
            "transfer_gain": self.transfer_gain(full, every["arms"]),
            "negative_transfer": negative,
            "notes": list(self.notes),
            "selection": (
                "out-of-fold AUROC with a patient-bootstrap 95% CI; paired patient-bootstrap difference from the "
                "best arm; a difference CI that includes 0 is a tie, and the simplest/cheapest tied arm wins "
                f"(order: {' < '.join(simplicity_order(list(self.arms.values())))})"
            ),
        }

    def transfer_gain(
        self, full: dict[str, pd.DataFrame] | None = None, stats: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Best transfer-family arm minus scratch: the paired OOF AUROC difference on the studies both have.
        ``stats``: :func:`compare`'s arms on ``full`` when the caller has them (their OOF AUROC picks the best)."""
        full = full or {n: self.arms[n].table() for n in self.arms}
        scratch = [n for n, a in self.arms.items() if a.kind == "scratch"]
        family = [n for n, a in self.arms.items() if a.kind != "scratch"]
        if not scratch or not family:
            return None
        s = scratch[0]
        stats = stats or compare({n: full[n] for n in family}, self.labels, self.n_resamples, self.seed)["arms"]
        top = max(family, key=lambda n: _nan_low(stats[n]["oof_auroc"]["value"]))
        gain = _paired(self.labels.scores(full[top]), self.labels.scores(full[s]), self.n_resamples, self.seed)
        return gain | {"arm": top, "control": s}


def fmt_interval(iv: dict[str, Any] | None, signed: bool = False) -> str:
    """A race interval ``{value, lo, hi}`` as ``0.912 [0.870, 0.950]`` (``signed``: a difference, ``+0.012 ...``)."""
    if not iv or iv.get("value") is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = iv.get("lo"), iv.get("hi")
    return f.format(iv["value"]) + (f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None and hi is not None else "")


def _planned_actual(planned: float | None, measured: dict[int, float]) -> dict[str, Any]:
    """The probe's training seconds per sample against the loop's on the arm's first fold (the same process and
    machine: what the plan's epochs were bought with) and its mean over folds."""
    first = measured[min(measured)] if measured else None
    return {
        "planned": planned,
        "first_fold": None if first is None else round(first, 6),
        "mean": round(float(np.mean(list(measured.values()))), 6) if measured else None,
        "ratio": round(first / planned, 3) if first and planned else None,
    }

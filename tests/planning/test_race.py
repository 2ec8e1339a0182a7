"""The arm race: successive halving over folds, elimination, the tie rule, negative transfer, budget re-planning.

Synthetic out-of-fold logits (no training): each arm's logit is signal * (2y - 1) + noise, so an arm's quality is
set by its signal, and two arms with the same signal and noise are a tie.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from medxfer.core.errors import MedxferError
from medxfer.planning.race import NEGATIVE_TRANSFER, Labels, Race, RaceArm, rung_folds, simplicity_order

N = 240  # studies, 2 per patient
RESAMPLES = 200


def _labels(k: int, seed: int = 0) -> tuple[Labels, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, N)
    keys = np.array([f"s{i:04d}" for i in range(N)])
    table = pd.DataFrame({"study_key": keys, "y": y, "patient_key": [f"p{i // 2:04d}" for i in range(N)]})
    fold = np.arange(N) % k
    return Labels(table, 2, positive_index=1), fold


def _oof(labels: Labels, fold_of: np.ndarray, fold: int, signal: float, noise_seed: int) -> pd.DataFrame:
    t = labels.table[fold_of == fold]
    rng = np.random.default_rng(noise_seed * 100 + fold)
    z = signal * (2 * t["y"].to_numpy() - 1) + rng.normal(0, 1, len(t))
    return pd.DataFrame({"study_key": t["study_key"], "fold": fold, "logit_0": -z / 2, "logit_1": z / 2})


def _arms(cost: dict[str, float] | None = None) -> list[RaceArm]:
    cost = cost or {"transfer": 10.0, "progressive": 8.0, "probe": 4.0, "scratch": 10.0}
    return [RaceArm(n, n, 3, c) for n, c in cost.items()]


def _run(race: Race, labels, fold_of, signal: dict[str, float], noise: dict[str, int] | None = None, clock=None):
    """Train what each rung asks for (synthetically), close it; returns the arms each rung trained."""
    trained, elapsed = [], 0.0
    while (r := race.next_rung()) is not None:
        trained.append((r.folds, r.arms))
        for name in r.arms:
            for f in r.folds:
                s = (clock or {}).get(name, race.arms[name].planned_s)
                elapsed += s
                oof = _oof(labels, fold_of, f, signal[name], (noise or {}).get(name, hash(name) % 97))
                race.record(name, f, s, oof, run_id=f"run-{name}-{f}")
        race.close_rung(elapsed)
    return trained, elapsed


def test_rungs_double_the_folds_trained() -> None:
    assert rung_folds(5) == [[0], [1], [2, 3], [4]]
    assert rung_folds(2) == [[0], [1]]
    assert rung_folds(4) == [[0], [1], [2, 3]]
    with pytest.raises(MedxferError, match="at least 2 folds"):
        rung_folds(1)


def test_a_clear_loser_stops_at_rung_0_and_a_tie_goes_to_the_simpler_arm() -> None:
    labels, fold_of = _labels(2)
    race = Race(_arms(), 2, labels, budget_s=1e6, n_resamples=RESAMPLES)
    # probe and transfer: identical outputs (same signal, same noise) -> a tie; scratch and progressive far worse.
    signal = {"transfer": 2.0, "probe": 2.0, "progressive": 0.3, "scratch": 0.1}
    trained, _ = _run(race, labels, fold_of, signal, noise={"transfer": 1, "probe": 1, "progressive": 2, "scratch": 3})
    assert trained[0] == ([0], ["transfer", "progressive", "probe", "scratch"])
    assert sorted(trained[1][1]) == ["probe", "transfer"]  # ceil(4 / 2) go on
    res = race.result(actual_s=50.0)
    assert res["winner"] == "probe" and ("simpler" in res["reason"] or "comes first" in res["reason"])
    arms = {a["name"]: a for a in res["arms"]}
    assert arms["scratch"]["eliminated_at_rung"] == 0 and arms["progressive"]["eliminated_at_rung"] == 0
    assert arms["probe"]["folds"] == [0, 1] and arms["scratch"]["folds"] == [0]
    assert arms["probe"]["diff_vs_best"]["lo"] <= 0 <= arms["probe"]["diff_vs_best"]["hi"]
    assert arms["scratch"]["diff_vs_best"]["hi"] < 0  # clearly worse
    for a in res["arms"]:
        iv = a["oof_auroc"]
        assert iv["lo"] <= iv["value"] <= iv["hi"]
    assert res["negative_transfer"] is False and res["transfer_gain"]["lo"] > 0
    assert res["folds"] == 2 and res["actual_s"] == 50.0 and len(res["rungs"]) == 2
    assert set(res) >= {"budget_s", "planned_s", "rungs", "arms", "winner", "reason", "transfer_gain"}


def test_scratch_winning_is_negative_transfer() -> None:
    labels, fold_of = _labels(2)
    race = Race(_arms(), 2, labels, budget_s=1e6, n_resamples=RESAMPLES)
    _run(race, labels, fold_of, {"transfer": 0.4, "progressive": 0.3, "probe": 0.2, "scratch": 2.5})
    res = race.result()
    assert res["winner"] == "scratch" and res["negative_transfer"] is True
    assert res["reason"].startswith(NEGATIVE_TRANSFER)
    gain = res["transfer_gain"]
    assert gain["arm"] in ("transfer", "progressive", "probe") and gain["control"] == "scratch" and gain["hi"] < 0


def test_five_folds_halve_to_one_arm_that_trains_every_fold() -> None:
    labels, fold_of = _labels(5)
    race = Race(_arms(), 5, labels, budget_s=1e6, n_resamples=RESAMPLES)
    signal = {"transfer": 2.0, "progressive": 2.0, "probe": 0.3, "scratch": 0.3}
    trained, _ = _run(race, labels, fold_of, signal, noise={"transfer": 1, "progressive": 1, "probe": 2, "scratch": 3})
    assert [len(a) for _, a in trained] == [4, 2, 1, 1]
    res = race.result()
    assert res["winner"] == "progressive"  # tied with transfer, simpler
    assert next(a for a in res["arms"] if a["name"] == "progressive")["folds"] == [0, 1, 2, 3, 4]
    assert next(a for a in res["arms"] if a["name"] == "transfer")["eliminated_at_rung"] == 1
    # planned: rung 0 all four arms (32 s), rung 1 the two dearest (20 s), rungs 2-3 one arm, 3 folds (30 s)
    assert res["planned_s"] == pytest.approx(32 + 20 + 30)


def test_measured_cost_replans_the_rest_to_fit_the_deadline() -> None:
    labels, fold_of = _labels(5)
    race = Race(_arms(), 5, labels, budget_s=200, train_deadline_s=170, n_resamples=RESAMPLES)
    signal = {"transfer": 2.0, "progressive": 2.0, "probe": 2.0, "scratch": 2.0}
    # Each fold takes 30 s, not the planned 4-10: after rung 0 (120 s of the 170 s deadline) the 4 folds left need
    # 120 s even for one arm: one arm goes on, and the re-plan says the deadline will pass.
    trained, _ = _run(race, labels, fold_of, signal, noise=dict.fromkeys(signal, 5), clock=dict.fromkeys(signal, 30.0))
    assert [len(a) for _, a in trained] == [4, 1, 1, 1]
    first = race.rungs[0]
    assert "re-plan" in first["replan"] and "1 arm(s) go on" in first["replan"]
    assert "pass its training deadline" in first["replan"] and race.notes
    # All four identical: the simplest (probe) goes on and wins.
    assert race.result()["winner"] == "probe"


def test_scratch_takes_its_place_in_the_order_by_measured_cost() -> None:
    arms = _arms()
    assert simplicity_order(arms) == ["probe", "progressive", "transfer", "scratch"]  # equal cost: transfer first
    arms[3].seconds = {0: 9.0}  # 10% cheaper than transfer: noise on a loaded machine, transfer still first
    assert simplicity_order(arms) == ["probe", "progressive", "transfer", "scratch"]
    arms[3].seconds = {0: 5.0}  # scratch measured at 5 s per fold: cheaper than progressive (8) and transfer (10)
    assert simplicity_order(arms) == ["probe", "scratch", "progressive", "transfer"]
    arms[3].train_s = {0: 1.0}  # the training loop's seconds win over wall seconds (which include data caching)
    assert simplicity_order(arms)[0] == "scratch"


def test_selection_refuses_an_unfinished_race() -> None:
    labels, _ = _labels(2)
    race = Race(_arms(), 2, labels, budget_s=100)
    with pytest.raises(MedxferError, match="rungs left"):
        race.result()
    with pytest.raises(MedxferError, match="no out-of-fold predictions"):
        race.close_rung(0.0)


def test_an_upper_bound_of_exactly_zero_under_a_loss_is_not_a_tie() -> None:
    from medxfer.planning.race import _tied

    stats = {
        "arms": {
            "transfer": {"diff_vs_best": {"value": 0.0, "lo": 0.0, "hi": 0.0}},  # the best itself
            "scratch": {"diff_vs_best": {"value": -0.094, "lo": -0.334, "hi": 0.0}},  # never better: lost
            "probe": {"diff_vs_best": {"value": -0.01, "lo": -0.05, "hi": 0.02}},  # tie
            "progressive": {"diff_vs_best": {"value": None, "lo": None, "hi": None}},  # unknown: tie
        }
    }
    assert _tied(stats) == ["transfer", "probe", "progressive"]


def test_the_race_reports_the_probed_against_the_measured_seconds_per_sample() -> None:
    labels, fold_of = _labels(2)
    arms = _arms()
    for a in arms:
        a.planned_s_per_sample = 0.01
    race = Race(arms, 2, labels, budget_s=1e6, n_resamples=RESAMPLES)
    while (r := race.next_rung()) is not None:
        for name in r.arms:
            for f in r.folds:
                oof = _oof(labels, fold_of, f, 1.0, 1)
                race.record(name, f, 10.0, oof, s_per_sample=0.012 if f == 0 else 0.02)
        race.close_rung(10.0)
    res = race.result()
    for a in res["arms"]:
        sps = a["s_per_sample"]
        assert sps["planned"] == 0.01 and sps["first_fold"] == 0.012 and sps["ratio"] == pytest.approx(1.2)
        assert sps["mean"] == pytest.approx(0.016 if a["folds"] == [0, 1] else 0.012)

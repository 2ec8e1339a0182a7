"""medxfer plan: each decision follows its stated rule, on the demo specs and on an unusual generated set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_labels, write_nifti, write_spec
from medxfer.config.recipe import default_recipe_path, load_recipe
from medxfer.config.spec import load_spec
from medxfer.core.errors import MedxferError
from medxfer.ingest.ingest import ingest
from medxfer.ingest.split import split
from medxfer.planning import plan as P

CPU = {"device": "cpu", "cores": 2, "memory_available_gb": 16.0}
PROBE = {"seconds_per_sample": 0.01, "bytes_per_sample": 50 * 2**20}


def _fp(dims=2, shape=(28, 28), spacing=(1.0, 1.0), n=200, minority=0.3, p10=None, test=40, classes=2) -> dict:
    small = int(n * minority)
    per = {"a": {"studies": small, "patients": small}}
    per |= {f"c{i}": {"studies": (n - small) // (classes - 1), "patients": 1} for i in range(classes - 1)}
    return {
        "spec": "x",
        "dims": dims,
        "n_studies": n,
        "classes": per,
        "minority_fraction": minority,
        "shape": {"p10": list(shape), "p50": list(shape), "p90": list(shape)},
        "spacing": {"p10": list(p10 or spacing), "p50": list(spacing), "p90": list(spacing)},
        "split": {"test": test},
    }


def test_2d_size_rule_upsamples_small_images_and_caps_large_ones() -> None:
    assert P.make_plan(_fp(shape=(28, 28)), CPU, PROBE, 1800).decision("input_size").value == [128, 128]
    assert P.make_plan(_fp(shape=(150, 170)), CPU, PROBE, 1800).decision("input_size").value == [160, 160]
    assert P.make_plan(_fp(shape=(512, 512)), CPU, PROBE, 1800).decision("input_size").value == [224, 224]
    gpu = CPU | {"device": "cuda"}
    assert P.make_plan(_fp(shape=(512, 512)), gpu, PROBE, 1800).decision("input_size").value == [384, 384]


def test_3d_anisotropic_axis_takes_its_10th_percentile_spacing_and_the_voxel_budget_holds() -> None:
    fp = _fp(dims=3, shape=(256, 256, 30), spacing=(0.8, 0.8, 5.0), p10=(0.7, 0.7, 2.5))
    p = P.make_plan(fp, CPU, PROBE, 1800)
    assert p.decision("spacing").value == [0.8, 0.8, 2.5]
    size = p.decision("input_size").value
    assert np.prod(size) <= 1.1 * 64**3 and all(s % 8 == 0 and s >= P.MIN_SIDE_3D for s in size)
    assert "anisotropic" in p.decision("input_size").reason
    iso = P.make_plan(_fp(dims=3, shape=(28, 28, 28), spacing=(1.5, 1.5, 1.5)), CPU, PROBE, 1800)
    assert iso.decision("spacing").value == [1.5, 1.5, 1.5] and iso.decision("input_size").value == [40, 40, 40]


def test_batch_loss_arms_folds_and_epochs_follow_their_rules() -> None:
    p = P.make_plan(_fp(n=2000, minority=0.45), CPU, PROBE, 3600)
    assert p.decision("batch_size").value == 64  # 4 GiB share fits 81 per 50 MiB -> 64, the cap
    assert p.decision("loss").value == "ce" and p.decision("arms").value == ["transfer", "probe", "scratch"]
    tiny = P.make_plan(_fp(n=24, minority=0.25, test=4), CPU, PROBE, 1800)
    assert tiny.decision("batch_size").value == 4  # n_train/4 = 4
    assert tiny.decision("loss").value == "focal" and "progressive" in tiny.decision("arms").value
    big_mem = P.make_plan(_fp(n=200), CPU | {"memory_available_gb": 0.5}, PROBE, 1800)
    assert big_mem.decision("batch_size").value == 4  # only 2 fit in 128 MiB: the floor
    # A budget that pays for 5 folds keeps them; a small one drops folds first, then epochs hit their floor.
    roomy = P.make_plan(_fp(n=200), CPU, PROBE, 3600)
    assert roomy.folds == 5 and roomy.decision("epochs").value <= P.EPOCHS_RANGE[2][1]
    tight = P.make_plan(_fp(n=200), CPU, PROBE | {"seconds_per_sample": 0.2}, 900)
    assert tight.folds < 5 and "not 5" in tight.decision("folds").reason
    assert tight.decision("epochs").value == P.EPOCHS_RANGE[2][0] and "budget" not in [x.key for x in tight.decisions]
    assert roomy.estimated_s <= 3600 and all(a.epochs == roomy.decision("epochs").value for a in roomy.arms)
    assert tight.estimated_s <= 900


def test_a_budget_below_the_minimum_epochs_trains_fewer_and_says_so_loudly() -> None:
    probe = PROBE | {"seconds_per_sample": 0.2}
    short = P.make_plan(_fp(n=200), CPU, probe, 400)
    lo = P.EPOCHS_RANGE[2][0]
    assert short.folds == P.FOLDS_MIN and 1 <= short.decision("epochs").value < lo
    b = short.decision("budget")
    assert b.value == "under_min" and "BUDGET TOO SMALL" in b.reason and f"minimum {lo}" in b.reason
    assert short.estimated_s <= 400  # the promise holds at fewer epochs rather than 10x over at the minimum
    hopeless = P.make_plan(_fp(n=200), CPU, probe, 200)
    assert hopeless.decision("budget").value == "over" and hopeless.decision("epochs").value == 1
    assert hopeless.estimated_s > 200 and "over budget" in hopeless.decision("budget").reason


def test_the_whole_run_is_budgeted_time_spent_before_and_after_the_race_included() -> None:
    fp, budget = _fp(n=400), 900
    fresh = P.make_plan(fp, CPU, PROBE, budget)
    late = P.make_plan(fp, CPU, PROBE, budget, reserved_s=300)
    assert late.decision("epochs").value < fresh.decision("epochs").value
    assert late.reserved_s == 300 and late.estimated_s == pytest.approx(300 + late.race_s + late.post_s)
    for p in (fresh, late):
        assert p.estimated_s <= budget and p.race_deadline_s == pytest.approx(budget - p.post_s)
        assert p.post_s >= P.POST_FIXED_S  # test inference of every member + the fixed evaluation/registration
    assert "spent (ingest, plan)" in late.decision("epochs").reason
    # More studies for every fold member to infer (test, and non-test for the OOD features): more after the race.
    assert P.make_plan(_fp(n=800), CPU, PROBE, budget).post_s > fresh.post_s
    # ... and fewer bootstrap resamples (--set evaluation.bootstrap=20): less.
    few = P.make_plan(fp, CPU, PROBE, budget, {"evaluation": {"bootstrap": 20}})
    assert few.post_s == pytest.approx(fresh.post_s - 980 * P.POST_PER_RESAMPLE_S, abs=0.1)


def test_each_arm_is_costed_from_its_own_measured_step() -> None:
    probe = PROBE | {"seconds_per_sample_head": 0.002, "seconds_per_sample_eval": 0.003, "checkpoint_s": 0.1}
    p = P.make_plan(_fp(n=200, minority=0.25), CPU, probe, 1800)
    arms = {a.name: a for a in p.arms}
    assert arms["probe"].s_per_sample == pytest.approx(0.002) and arms["transfer"].s_per_sample == 0.01
    assert arms["progressive"].s_per_sample == pytest.approx(0.25 * 0.002 + 0.75 * 0.01)
    assert arms["probe"].epoch_s < arms["progressive"].epoch_s < arms["transfer"].epoch_s == arms["scratch"].epoch_s
    for a in p.arms:
        assert a.estimated_s == pytest.approx(a.fixed_s + a.epochs * a.epoch_s, abs=0.2)
    # The race's plan is the halving schedule at these per-fold costs, as the race itself prices it.
    from medxfer.planning.race import Labels, Race, RaceArm

    race = Race([RaceArm(a.name, a.kind, a.epochs, a.estimated_s) for a in p.arms], p.folds, Labels(None, 2), 1800)
    assert race.planned_s() == pytest.approx(p.race_s, rel=0.01)
    assert P.schedule_cost(2, [10, 20, 30]) == pytest.approx(60 + 50)  # rung 0: all 3; rung 1: ceil(3/2) = 2


def test_probe_times_the_planned_batch_after_a_warm_up() -> None:
    probe = P.probe_cost("efficientnet_lite0", 2, [32, 32], 2, steps=1, batch=2)
    assert probe["batch"] == 2 and probe["warmup_steps"] == 1 and probe["steps"] == 1
    for k in ("seconds_per_sample", "seconds_per_sample_head", "seconds_per_sample_eval", "checkpoint_s"):
        assert probe[k] > 0, k
    assert probe["seconds_per_sample_eval"] < probe["seconds_per_sample"] and probe["bytes_per_sample"] > 0


def test_budget_parsing() -> None:
    assert P.parse_budget("30m") == 1800 and P.parse_budget("90s") == 90 and P.parse_budget("1.5h") == 5400
    assert P.parse_budget("120") == 120
    with pytest.raises(MedxferError, match="30m"):
        P.parse_budget("soon")


def _check_written(res: P.PlanResult, dims: int, n_classes: int) -> dict:
    """plan.json re-derives from its own recorded inputs (the rules are a pure function), and every arm's recipe
    loads and validates as a recipe for this spec."""
    body = json.loads(res.paths["plan"].read_text())
    defaults = yaml.safe_load(default_recipe_path(dims).read_text())
    fp, machine, probe = body["fingerprint"], body["machine"], body["probe"]
    again = P.make_plan(fp, machine, probe, body["budget_s"], defaults, reserved_s=body["reserved_s"])
    assert [d["value"] for d in body["decisions"] if d["key"] != "encoder"] == [
        d.value for d in again.decisions if d.key != "encoder"
    ]
    for arm in body["arms"]:
        recipe = load_recipe(res.paths["plan"].parent / body["recipes"][arm["name"]], dims, n_classes=n_classes)
        assert recipe.epochs == arm["epochs"] and list(recipe.data.size) == body["decisions"][1]["value"]
    assert all(d["reason"] for d in body["decisions"])
    return body


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from medxfer.demo import write_demo

    base = tmp_path_factory.mktemp("plan-demo")
    write_demo(base / "demo-data", limit=12)
    specs = Path(__file__).resolve().parents[2] / "data_specs"
    for name in ("breastmnist_demo.yaml", "adrenal3d_demo.yaml"):
        (base / name).write_text((specs / name).read_text().replace("../demo-data", "demo-data"))
    return base


@pytest.mark.parametrize(("spec_name", "dims"), [("breastmnist_demo.yaml", 2), ("adrenal3d_demo.yaml", 3)])
def test_plan_on_the_demo_specs(demo, spec_name: str, dims: int, monkeypatch) -> None:
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    spec = load_spec(demo / spec_name)
    ingest(spec, demo / "ws")
    split(spec, demo / "ws")
    res = P.plan(spec, demo / "ws", "30m")
    body = _check_written(res, dims, 2)
    size = res.plan.decision("input_size").value
    assert size == ([128, 128] if dims == 2 else [40, 40, 40])  # 28 px -> 128; 28^3 at 1.5 mm -> the 40 floor
    assert body["fingerprint"]["split"]["test"] == 12 and body["machine"]["cores"] >= 1
    assert res.summary()["paths"]["plan"].endswith("plan.json")


def test_plan_on_a_tiny_anisotropic_three_class_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        rel = f"s{i:02d}.nii.gz"
        write_nifti(tmp_path / "nifti" / rel, rng.normal(0, 1, (48, 48, 6)).astype(np.float32), (0.8, 0.8, 6.0))
        rows.append([rel, ["a", "b", "c"][i % 3], f"P{i:02d}"])
    write_labels(tmp_path / "labels.csv", ["path", "label", "patient"], rows)
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        {
            "name": "odd",
            "task": "multiclass",
            "dims": 3,
            "source": {"kind": "nifti", "root": "nifti"},
            "labels": {"csv": "labels.csv", "key": "path", "column": "label", "patient": "patient"},
            "classes": ["a", "b", "c"],
            "split": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 0},
        },
    )
    spec = load_spec(spec_path)
    ingest(spec, tmp_path / "ws")
    split(spec, tmp_path / "ws")
    res = P.plan(spec, tmp_path / "ws", "10m")
    body = _check_written(res, 3, 3)
    assert res.plan.decision("spacing").value[2] == pytest.approx(6.0)  # one spacing: its p10 is itself
    assert "anisotropic" in res.plan.decision("input_size").reason
    assert res.plan.decision("batch_size").value == P.BATCH_RANGE[0]  # 14 train+val studies: n_train/4 < 4
    assert "progressive" in res.plan.decision("arms").value and body["fingerprint"]["classes"]["a"]["studies"] == 6
    text = yaml.safe_load((res.paths["plan"].parent / body["recipes"]["scratch"]).read_text())
    assert text["weights"] == "none"

"""`medxfer run --auto`: the arm race end to end on the tiny DICOM set, down to a registered fold ensemble.

The race logic itself (halving, ties, negative transfer, budget re-planning) is unit-tested on synthetic
out-of-fold scores in tests/planning/test_race.py; here the real stages run once, on 2 folds and 1 epoch.
"""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest
import yaml
from helpers import make_dicom2d_dataset
from medxfer import tracking
from medxfer.autorun import kfold_spec
from medxfer.cli import app
from medxfer.config.spec import load_spec
from medxfer.core.workspace import Workspace
from medxfer.ingest.ingest import ingest
from medxfer.ingest.split import split
from typer.testing import CliRunner

# The cheapest real arms: tiny inputs, 1 epoch, no augmentation; the arms keep their own stages and weights.
AUTO_CHEAP = [
    "epochs=1",
    "data.size=[32,32]",
    "data.batch_size=8",
    "optim.warmup_epochs=0",
    "data.augment={}",
    "evaluation.bootstrap=20",
]
H4 = all(importlib.util.find_spec(m) for m in ("medxfer.training.ensemble", "medxfer.models.ensemble"))


def _with_folds(spec_path, folds: int):
    d = yaml.safe_load(spec_path.read_text())
    d["split"] = {**d["split"], "folds": folds}
    spec_path.write_text(yaml.safe_dump(d, sort_keys=False))  # fractions in the order the deal reads them
    return load_spec(spec_path)


def test_adding_folds_keeps_the_test_studies(tiny_dicom2d) -> None:
    ds = tiny_dicom2d
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    splits = Workspace.for_spec(ds.workspace, ds.spec.name).splits
    single = pd.read_csv(splits)
    split(kfold_spec(ds.spec, 2), ds.workspace)  # what run --auto splits with
    kfold = pd.read_csv(splits)
    assert set(kfold.loc[kfold.split == "test", "study_key"]) == set(single.loc[single.split == "test", "study_key"])
    assert set(kfold.loc[kfold.split == "train", "fold"]) == {0, 1}
    assert set(kfold.split) == {"train", "test"}


def test_auto_flags_that_do_not_mix_fail_before_any_stage(tiny_dicom2d) -> None:
    ds = tiny_dicom2d
    res = CliRunner().invoke(app, ["run", str(ds.spec_path), "-w", str(ds.workspace), "--auto", "--resume"])
    assert res.exit_code != 0 and "--auto plans its own recipes" in res.output
    res = CliRunner().invoke(app, ["run", str(ds.spec_path), "-w", str(ds.workspace), "--budget", "5m"])
    assert res.exit_code != 0 and "--budget goes with --auto" in res.output
    assert not any(ds.workspace.rglob("manifest.parquet"))


@pytest.mark.skipif(not H4, reason="the fold-ensemble plumbing (medxfer.training.ensemble) has not landed")
def test_run_auto_races_the_arms_and_registers_the_fold_ensemble(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    ds = make_dicom2d_dataset(tmp_path / "d2")
    _with_folds(ds.spec_path, 2)  # 2 folds whatever the plan's probe measures on this machine
    args = ["run", str(ds.spec_path), "-w", str(ds.workspace), "--auto", "--budget", "90s", "--name", "tiny-auto"]
    args += [x for s in AUTO_CHEAP for x in ("--set", s)] + ["--force", "--json"]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    race = s["race"]
    err = res.stderr
    # A progress line per arm and fold, and the closing table of arms.
    assert "arm transfer, fold 1/2" in err and "arm scratch, fold 1/2" in err and "arm probe" in err
    assert "WINNER" in err and "re-plan" in err
    arms = {a["name"]: a for a in race["arms"]}
    assert set(arms) == {"transfer", "progressive", "probe", "scratch"}
    assert race["folds"] == 2 and arms[race["winner"]]["folds"] == [0, 1]
    # Successive halving: at most half the arms train fold 1, unless every arm was kept.
    assert sum(a["eliminated_at_rung"] == 0 for a in race["arms"]) >= 2
    for a in race["arms"]:
        assert a["oof_auroc"]["value"] is not None and a["seconds"] > 0
    assert isinstance(race["negative_transfer"], bool) and race["reason"]
    # The plan probed its cost at the size --set fixed, and says so.
    size = next(d for d in s["stages"]["plan"]["decisions"] if d["key"] == "input_size")
    assert size["value"] == [32, 32] and "set by the user" in size["reason"]
    # Budget: planned against actual, per arm and in total.
    b = s["budget"]
    assert b["budget_s"] == 90 and b["actual_s"] > 0 and set(b["per_arm"]) == set(arms)
    assert b["planned_s"] > 0 and b["planned_after_s"] > 0 and b["actual_before_s"] > 0
    for a in b["per_arm"].values():  # the probe's seconds per training sample against the loop's first fold
        sps = a["s_per_sample"]
        assert sps["planned"] > 0 and sps["first_fold"] > 0 and sps["ratio"] > 0
    # One registered model: the fold ensemble run, nested under the auto parent, its members tagged with the arm.
    uri = s["tracking_uri"]
    run = tracking.get_run(uri, s["run_id"])
    assert run["tags"].get("medxfer.ensemble") == "2" and run["tags"].get("medxfer.registered") == "tiny-auto/1"
    assert s["model_version"] == "1"
    for rid in arms[race["winner"]]["run_ids"].values():
        tags = tracking.get_run(uri, rid)["tags"]
        assert tags["medxfer.auto.arm"] == race["winner"] and tags["mlflow.parentRunId"] == s["parent_run_id"]
    ws = Workspace.for_spec(ds.workspace, ds.spec.name)
    # The evaluate stage's summary names the ensemble run's evaluation.json (read just below).
    assert s["stages"]["evaluate"]["evaluation_json"] == str(ws.run_dir(s["run_id"]) / "evaluation.json")
    evaluation = json.loads((ws.run_dir(s["run_id"]) / "evaluation.json").read_text())
    assert evaluation["validation_source"] == "out_of_fold" and evaluation["race"]["winner"] == race["winner"]
    # The model card renders the race.
    card = tracking.download_run_artifact(uri, s["run_id"], "model_card/model_card.md", tmp_path / "card")
    md = card.read_text()
    assert "## Arm race" in md and race["winner"] in md and "out-of-fold AUROC" in md
    assert ("Negative transfer: scratch was chosen" in md) == race["negative_transfer"]

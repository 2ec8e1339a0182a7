"""The train stage end to end on tiny real DICOM/NIfTI data: ingest -> split -> train, MLflow on sqlite.

One module-scoped dataset (40 US studies with planted PHI) is ingested and split once; the runs below
share its workspace and MLflow store. Training is made deterministic on CPU, so a run killed with
SIGKILL and resumed must end where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PHI, make_dicom2d_dataset, make_nifti3d_dataset
from medxfer import tracking as T
from medxfer.config.recipe import load_recipe
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import Workspace
from medxfer.io.phi import scan_for_phi
from medxfer.training import checkpoint as C
from medxfer.training.stage import train

REPO = Path(__file__).resolve().parents[2]
KILL = Path(__file__).with_name("kill_train.py")  # train, SIGKILLed after epoch N by a callback
STAGES = "stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: 2}, {epoch: 2, groups: all}]"
# random init: ImageNet EfficientNet-Lite0 pools to all-zero features at 32 px, which would make the
# validation metrics constant and the resume comparison meaningless
BASE = ["epochs=3", STAGES, "data.size=[32, 32]", "data.batch_size=8", "weights=none", "data.cache=memory"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    mp = pytest.MonkeyPatch()
    mp.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The monitor samples on a timer; an idle machine finishes this tiny run in about a second.
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    ds = make_dicom2d_dataset(tmp_path_factory.mktemp("train") / "d2")
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    yield ds
    mp.undo()


@pytest.fixture(scope="module")
def baseline(prepared):
    """One uninterrupted run: checked end to end, and the reference for the kill-and-resume test."""
    return train(prepared.spec, prepared.workspace, overrides=BASE)


def _client(ds):
    from mlflow.tracking import MlflowClient

    return MlflowClient(Workspace.for_spec(ds.workspace, ds.spec.name).tracking_uri)


def _cli(ds, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`medxfer train SPEC --workspace WS --json ARGS`, in a new process (under torchrun with `torchrun` ranks)."""
    return _run(
        ["-m", "medxfer", "train", str(ds.spec_path), "--workspace", str(ds.workspace), "--json", *args], torchrun
    )


def _kill(ds, after: int, overrides: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    """Train in a new process that SIGKILLs itself (rank 0) once epoch `after` is logged and checkpointed."""
    return _run([str(KILL), str(after), str(ds.spec_path), str(ds.workspace), *overrides], torchrun)


def _run(args: list[str], torchrun: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    env = {**os.environ, "MEDXFER_SYSTEM_METRICS": "0"}
    env.pop("MEDXFER_PSEUDONYM_KEY", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_train_needs_ingest_and_split_first(tmp_path) -> None:
    ds = make_dicom2d_dataset(tmp_path / "d", n_studies=4)
    with pytest.raises(MedxferError, match="medxfer ingest"):
        train(ds.spec, ds.workspace, overrides=BASE)


def test_end_to_end_logs_params_metrics_artifacts_checkpoints(prepared, baseline) -> None:
    ds, res = prepared, baseline
    s = res.summary()
    assert s["run_id"] and s["best_epoch"] in (1, 2, 3) and set(s["val"]) == {"loss", "auroc", "balanced_accuracy"}
    assert s["mlflow_ui"] == f"{T.medxfer_executable()} ui --workspace {ds.workspace.resolve()}"
    rows = dict(res.table()[1])
    assert rows["run id"] == s["run_id"] and "medxfer ui" in rows["open the UI"]

    client = _client(ds)
    run = client.get_run(res.run_id)
    p, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and tags[T.TAG_STATUS] == "finished" and tags[T.TAG_ROLE] == "main"
    default = load_recipe(None, 2)
    assert p["optim.lr"] == str(default.optim.lr) and p["focal.gamma"] == str(default.focal.gamma)
    assert p["model.encoder"] == "efficientnet_lite0"
    assert p["model.weights.source"] == "none" and p["weights"] == "none"
    hashes = {"hash.spec", "hash.labelled_content", "hash.split"}  # medxfer.ingest.manifest names what each covers
    assert hashes | {"git.commit", "version.torch", "version.mlflow"} <= set(p)
    assert p["loss.class_weight.pos"] and p["schedule.0"].startswith("stage 0")
    assert "spec.source.root" not in p and "spec.labels.csv" not in p
    hist = {
        k: [m.value for m in client.get_metric_history(res.run_id, k)]
        for k in ("train/loss", "val/auroc", "schedule/unfrozen_groups", "lr/head", "lr/stem", "time/samples_per_s")
    }
    assert len(hist["train/loss"]) == 3 and hist["schedule/unfrozen_groups"] == [1.0, 3.0, 6.0]
    # one epoch convention: MLflow steps are the epoch numbers the console prints (1-based), best/epoch too
    assert [m.step for m in client.get_metric_history(res.run_id, "val/auroc")] == [1, 2, 3]
    best = client.get_metric_history(res.run_id, "best/epoch")
    assert [(m.step, m.value) for m in best] == [(res.summary()["best_epoch"], res.summary()["best_epoch"])]
    assert not {"train_loss", "val_auroc", "best_epoch"} & set(run.data.metrics)
    assert len(hist["lr/head"]) == 3 and len(hist["lr/stem"]) == 1  # a group's LR is logged once it trains
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics are on
    arts = {a.path for d in ("", "reports", "plots", "checkpoints") for a in client.list_artifacts(res.run_id, d)}
    assert {
        "recipe.yaml",
        "unfreeze_schedule.txt",
        "history.json",
        "reports/split_counts.json",
        "reports/ingest_report.json",
        "plots/learning_curve.png",
        "checkpoints/best.pt",
    } <= arts

    # the local checkpoints load safely and rebuild the model
    run_dir = Workspace.for_spec(ds.workspace, ds.spec.name).run_dir(res.run_id)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["stage"] == 2 and len(last["param_groups"]) == 6
    model, ck = C.load_for_inference(run_dir / "best.pt")
    assert "optimizer" not in ck and not model.training
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def _kill_and_resume(ds, full, overrides: list[str], check_refusal: bool = False) -> tuple[str, dict, dict]:
    """Kill a run after epoch 2 with SIGKILL, resume it, and check it ends where `full` ended."""
    ws = Workspace.for_spec(ds.workspace, ds.spec.name)
    killed = _kill(ds, 2, overrides)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_id = T.find_unfinished_run(ws.tracking_uri, ds.spec.name)
    assert run_id and run_id != full.run_id
    at_kill = C.load(ws.run_dir(run_id) / "last.pt")
    assert at_kill["epoch"] == 1 and at_kill["stage"] == 1
    assert [g["name"] for g in at_kill["param_groups"]] == ["head", "stage4", "stage3"]
    if check_refusal:
        _resume_refuses_a_changed_split(ds, ws)

    resumed = train(ds.spec, ds.workspace, resume=True)
    assert resumed.run_id == run_id and resumed.main.resumed_from_epoch == 2
    client = _client(ds)
    assert client.get_run(run_id).info.status == "FINISHED"
    # one value per epoch in the continued run: nothing logged twice, nothing missing
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]

    for ha, hb in zip(full.main.history, resumed.main.history, strict=True):
        for k in ("train_loss", "val_loss", "val_auroc", "val_balanced_accuracy", "stage", "unfrozen_groups"):
            assert hb[k] == pytest.approx(ha[k], abs=1e-6), (ha["epoch"], k)
    end_a = C.load(ws.run_dir(full.run_id) / "last.pt")
    end_b = C.load(ws.run_dir(run_id) / "last.pt")
    assert end_b["param_groups"] == end_a["param_groups"]
    for key in ("model", "train_model"):
        if key in end_a:
            diff = max((end_a[key][k].float() - end_b[key][k].float()).abs().max().item() for k in end_a[key])
            assert diff < 1e-5, key
    return run_id, end_a, end_b


def _resume_refuses_a_changed_split(ds, ws: Workspace) -> None:
    """A re-split could move validation studies into training: the killed run must not continue on it."""
    report = ws.split_report.read_text()
    try:
        ws.split_report.write_text(json.dumps({**json.loads(report), "split_hash": "0" * 16}))
        with pytest.raises(MedxferError, match="the split changed since it started"):
            train(ds.spec, ds.workspace, resume=True)
    finally:
        ws.split_report.write_text(report)


def test_kill_and_resume_matches_an_uninterrupted_run(prepared, baseline) -> None:
    ds = prepared
    _, end, _ = _kill_and_resume(ds, baseline, BASE, check_refusal=True)
    assert "train_model" not in end and "ema" not in end

    with pytest.raises(MedxferError, match="no unfinished training run"):
        train(ds.spec, ds.workspace, resume=True)


def test_weight_ema_is_what_is_validated_shipped_and_resumed(prepared) -> None:
    ds = prepared
    overrides = [*BASE, "ema_decay=0.9"]
    full = train(ds.spec, ds.workspace, overrides=overrides)
    run_id, end, _ = _kill_and_resume(ds, full, overrides)
    # the shipped weights are the average, not the last raw step; the raw ones are kept only to resume
    assert end["ema"]["steps"] > 0
    assert any(not torch.equal(end["model"][k], end["train_model"][k]) for k in end["model"])
    _, ck = C.load_for_inference(Workspace.for_spec(ds.workspace, ds.spec.name).run_dir(run_id) / "best.pt")
    assert "train_model" not in ck and "ema" not in ck


def test_probe_control_is_a_nested_run_tagged_on_the_parent(prepared) -> None:
    ds = prepared
    imagenet = ["epochs=2", *(o for o in BASE[1:] if o != "weights=none")]  # the offline ImageNet weights
    res = train(ds.spec, ds.workspace, overrides=imagenet, control="probe")
    client = _client(ds)
    parent = client.get_run(res.run_id)
    assert parent.data.params["model.weights.source"] == "package"
    assert len(parent.data.params["model.weights.sha256"]) == 64
    assert (
        client.get_run(parent.data.tags[T.TAG_CONTROL_RUN]).data.params["model.weights.sha256"]
        == parent.data.params["model.weights.sha256"]
    )  # the probe keeps the pretrained encoder
    child_id = parent.data.tags[T.TAG_CONTROL_RUN]
    assert res.control is not None and res.control.run_id == child_id and res.summary()["control_run_id"] == child_id
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == res.run_id and child.data.tags[T.TAG_ROLE] == "control"
    assert child.data.tags[T.TAG_CONTROL] == "probe" and child.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(child_id, "schedule/unfrozen_groups")] == [1.0, 1.0]
    assert child.data.params["data.n_train"] == parent.data.params["data.n_train"]
    assert child.data.params["epochs"] == parent.data.params["epochs"] == "2"


def test_scratch_control_trains_the_same_architecture_from_random_init(prepared) -> None:
    ds = prepared
    res = train(
        ds.spec, ds.workspace, overrides=["epochs=1", *(o for o in BASE[1:] if o != "weights=none")], control="scratch"
    )
    client = _client(ds)
    child = client.get_run(res.control.run_id)
    assert (
        child.data.params["model.weights.source"] == "none"
        and child.data.params["model.encoder"] == client.get_run(res.run_id).data.params["model.encoder"]
    )
    assert [m.value for m in client.get_metric_history(res.control.run_id, "schedule/unfrozen_groups")] == [6.0]
    assert "control (scratch)" in dict(res.table()[1])


def test_ddp_two_cpu_processes_under_torchrun_killed_and_resumed(prepared) -> None:
    ds = prepared
    ws = Workspace.for_spec(ds.workspace, ds.spec.name)
    killed = _kill(ds, 1, ["epochs=2", *BASE[1:]], torchrun=2)
    assert killed.returncode != 0, killed.stderr[-3000:]
    run_id = T.find_unfinished_run(ws.tracking_uri, ds.spec.name)
    assert run_id and C.load(ws.run_dir(run_id) / "last.pt")["epoch"] == 0

    out = _cli(ds, "--resume", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["run_id"] == run_id and summary["main"]["resumed_from_epoch"] == 2
    client = _client(ds)
    run = client.get_run(summary["run_id"])
    assert run.data.params["run.world_size"] == "2" and run.info.status == "FINISHED"
    # rank 0 alone logs: one value per epoch (nothing twice across the kill), one run for the job
    assert [m.step for m in client.get_metric_history(summary["run_id"], "train/loss")] == [1, 2]
    runs = client.search_runs([run.info.experiment_id], filter_string="params.`run.world_size` = '2'")
    assert len(runs) == 1


def test_3d_smoke_on_tiny_nifti(tmp_path) -> None:
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split

    ds = make_nifti3d_dataset(tmp_path / "n3")
    ingest(ds.spec, ds.workspace)
    split(ds.spec, ds.workspace)
    res = train(
        ds.spec,
        ds.workspace,
        overrides=[
            "epochs=2",
            "stages=[{epoch: 0, groups: 0}, {epoch: 1, groups: all}]",
            "data.size=[16, 16, 16]",
            "data.batch_size=8",
            "weights=none",
            "freeze_bn_stats=false",
        ],
    )
    assert res.main.epochs == 2 and len(res.main.history) == 2
    ck = torch.load(res.main.checkpoint, weights_only=True)
    assert ck["model_args"]["spatial_dims"] == 3


@pytest.mark.parametrize("encoder", ["efficientnet_lite0_acs", "efficientnet_lite0_i3d"])
def test_channels_last_3d_converts_what_it_can(encoder) -> None:
    from medxfer.models.factory import create_classifier
    from medxfer.training.distributed import to_memory_format

    model = create_classifier(encoder, num_classes=2, in_chans=1, spatial_dims=3, weights=None)
    x = torch.rand(2, 1, 32, 32, 32)
    ref = model.eval()(x)
    to_memory_format(model, torch.channels_last_3d)  # ACS keeps 2D-shaped weights: must not raise
    five_d = [p for p in model.parameters() if p.dim() == 5]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in five_d)
    assert bool(five_d) == (encoder.endswith("i3d"))
    out = model(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(out, ref, atol=1e-4)


def test_val_metrics_binary_positive_column_and_multiclass() -> None:
    import numpy as np
    from medxfer.training.loop import val_metrics

    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    m = val_metrics(prob, y, positive_index=1)
    assert m["auroc"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert val_metrics(prob, y, positive_index=0)["auroc"] == pytest.approx(0.75)  # same ranking, flipped class
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    assert val_metrics(p3, y3, positive_index=2) == {"auroc": pytest.approx(1.0), "balanced_accuracy": 1.0}


def test_control_recipes_change_only_what_the_control_varies() -> None:
    from medxfer.config.recipe import load_recipe
    from medxfer.training.loop import sampled_counts
    from medxfer.training.stage import control_recipe

    base = load_recipe(None, 2)
    scratch, probe = control_recipe(base, "scratch"), control_recipe(base, "probe")
    assert scratch.weights == "none" and [s.groups for s in scratch.stages] == ["all"] and scratch.optim.lr_decay == 1
    assert probe.weights == base.weights and [s.groups for s in probe.stages] == [0]
    for r in (scratch, probe):
        assert (r.epochs, r.data, r.optim.lr, r.focal, r.seed) == (
            base.epochs,
            base.data,
            base.optim.lr,
            base.focal,
            base.seed,
        )
    with pytest.raises(MedxferError, match="scratch or probe|one of"):
        control_recipe(base, "imagenet")
    # Frozen BatchNorm statistics keep pretrained ones; a scratch network's would stay at their init.
    base3 = load_recipe(None, 3, ["freeze_bn_stats=true"])
    assert control_recipe(base3, "scratch").freeze_bn_stats is False
    assert control_recipe(base3, "probe").freeze_bn_stats is True
    assert sampled_counts([90, 10], balanced=False) == [90, 10]
    assert sampled_counts([90, 10], balanced=True) == [50, 50]


def test_frozen_bn_statistics_without_pretrained_weights_are_refused() -> None:
    """The 3D default freezes BatchNorm statistics; `--set weights=none` alone would freeze them at init."""
    from medxfer.config.recipe import load_recipe
    from medxfer.config.spec import SpecError

    with pytest.raises(SpecError, match="freeze_bn_stats=false"):
        load_recipe(None, 3, ["weights=none"])
    assert load_recipe(None, 3, ["weights=none", "freeze_bn_stats=false"]).weights == "none"


def test_k_fold_split_uses_the_chosen_fold_as_validation(tmp_path) -> None:
    import pandas as pd
    import yaml
    from medxfer.config.spec import load_spec
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.training.stage import _read_tables

    ds = make_dicom2d_dataset(tmp_path / "d")
    raw = yaml.safe_load(ds.spec_path.read_text())
    raw["split"] = {"folds": 3, "fractions": {"train": 0.8, "val": 0.0, "test": 0.2}, "seed": 0}
    ds.spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(ds.spec_path)
    ingest(spec, ds.workspace)
    split(spec, ds.workspace)
    ws = Workspace.for_spec(ds.workspace, spec.name)
    folds = pd.read_csv(ws.splits)
    t1 = _read_tables(spec, ws, fold=1)
    val, trn = t1.part("val"), t1.part("train")
    assert t1.fold == 1 and set(val["study_key"]) == set(folds.loc[folds["fold"] == 1, "study_key"])
    assert not set(trn["study_key"]) & set(val["study_key"])
    assert t1.hashes(spec)["split"] == json.loads(ws.split_report.read_text())["split_hash"]  # evaluate checks it
    assert _read_tables(spec, ws).fold == 0
    with pytest.raises(MedxferError, match="fold 7 does not exist"):
        _read_tables(spec, ws, fold=7)


def test_no_phi_anywhere_in_the_mlflow_store(prepared, baseline) -> None:
    """Last in the module on purpose: by now the store holds the main, resumed, control and DDP runs."""
    ds = prepared
    store = [ds.workspace / "mlflow.db", ds.workspace / "mlartifacts"]
    assert (ds.workspace / "mlartifacts").is_dir()
    # names, IDs, birth and study dates, institution, physician and the patient-named folder planted by helpers
    needles = [*PHI.values(), str(ds.root), str(ds.labels_csv), PHI["name"].replace("^", "_")]
    assert scan_for_phi(store, needles) == []

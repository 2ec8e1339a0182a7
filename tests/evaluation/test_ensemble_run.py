"""A fold ensemble end to end: two tiny fold runs -> create_ensemble_run -> evaluate on the out-of-fold table ->
register -> predict (models:/NAME@candidate), the pyfunc and export with ONNX parity."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import CHEAP_RUN, make_dicom2d_dataset
from medxfer.core.errors import MedxferError, StageError

RACE = {
    "folds": 2,
    "budget_s": 60,
    "planned_s": 50,
    "actual_s": 41,
    "rungs": [1],
    "arms": [{"name": "scratch", "kind": "scratch", "folds": [0, 1], "epochs": 1, "eliminated_at_rung": None}],
    "winner": "scratch",
    "reason": "the only arm",
    "transfer_gain": None,
    "negative_transfer": False,
}
NAME = "tiny-ensemble"


@dataclass
class EnsembleRun:
    spec: Any
    workspace: Path
    dataset: Any
    member_run_ids: list[str]
    oof: pd.DataFrame
    run_id: str
    evaluation: dict[str, Any]
    rows: pd.DataFrame


def out_of_fold(spec: Any, ws_root: Path, run_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each fold model's raw logits on its own validation fold, the way evaluate infers a split."""
    from medxfer.config.recipe import recipe_from_dict
    from medxfer.core.workspace import Workspace
    from medxfer.data.transforms import inference_model
    from medxfer.evaluation.evaluate import _split_rows, infer_split
    from medxfer.training import checkpoint as C

    ws = Workspace.for_spec(ws_root, spec.name)
    parts, rows = [], None
    for rid in run_ids:
        model, ckpt = C.load_for_inference(ws.run_dir(rid) / "best.pt")
        recipe = recipe_from_dict(ckpt["recipe"])
        rows, _, _ = _split_rows(ws, spec, ckpt)
        mine = rows[(rows["split"] == "train") & (rows["fold"] == ckpt["fold"])]
        out, failed = infer_split(inference_model(model, spec, recipe), mine, spec, recipe, "cpu", "oof")
        assert failed == 0
        df = pd.DataFrame({"study_key": out.studies, "fold": int(ckpt["fold"])})
        for i in range(out.logits.shape[1]):
            df[f"logit_{i}"] = out.logits[:, i]
        parts.append(df)
    return pd.concat(parts, ignore_index=True), rows


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory: pytest.TempPathFactory) -> EnsembleRun:
    from medxfer.config.spec import load_spec
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.ingest.ingest import ingest
    from medxfer.ingest.split import split
    from medxfer.training.ensemble import create_ensemble_run
    from medxfer.training.stage import train

    saved = {k: os.environ.pop(k, None) for k in ("MEDXFER_PSEUDONYM_KEY", "MLFLOW_TRACKING_URI")}
    os.environ["MEDXFER_SYSTEM_METRICS"] = "0"
    try:
        ds = make_dicom2d_dataset(tmp_path_factory.mktemp("ensemble") / "d2")
        raw = yaml.safe_load(ds.spec_path.read_text())
        # 2 folds over the non-test 70%; the test 30% is dealt as without folds (ingest/split.py).
        raw["split"] = {"folds": 2, "fractions": {"train": 0.7, "val": 0.0, "test": 0.3}, "seed": 0}
        ds.spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        spec = load_spec(ds.spec_path)
        ingest(spec, ds.workspace)
        split(spec, ds.workspace)
        ids = []
        for fold in (0, 1):
            res = train(spec, ds.workspace, overrides=[*CHEAP_RUN, "epochs=1"], device="cpu", fold=fold)
            ids.append(res.run_id)
        oof, rows = out_of_fold(spec, ds.workspace, ids)
        run_id = create_ensemble_run(spec, ds.workspace, ids, oof, RACE)
        ev = evaluate(run_id, ds.workspace, n_bootstrap=100, device="cpu").evaluation
    finally:
        os.environ.pop("MEDXFER_SYSTEM_METRICS", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    return EnsembleRun(spec, ds.workspace, ds, ids, oof, run_id, ev, rows)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")


def test_the_run_is_tracked_like_a_training_run(ensemble_run: EnsembleRun, env) -> None:
    from medxfer import tracking
    from medxfer.core.workspace import Workspace

    uri = Workspace.for_spec(ensemble_run.workspace, "_").tracking_uri
    run = tracking.get_run(uri, ensemble_run.run_id)
    tags = run["tags"]
    assert tags["medxfer.ensemble"] == "2" and tags["medxfer.auto"] == "1" and tags["medxfer.role"] == "main"
    assert tags["medxfer.spec"] == ensemble_run.spec.name and tags["medxfer.status"] == "finished"
    assert tags["medxfer.member_run_ids"] == ",".join(ensemble_run.member_run_ids)
    assert tags["medxfer.evaluated"] == "true"
    ws = Workspace.for_spec(ensemble_run.workspace, ensemble_run.spec.name)
    for artifact in ("checkpoints/best.pt", "oof/oof_predictions.csv", "auto/race.json"):
        got = tracking.download_run_artifact(uri, ensemble_run.run_id, artifact, ws.root / "dl" / artifact)
        assert got is not None and got.is_file(), artifact
        blob = got.read_bytes()
        for phi in ensemble_run.dataset.phi:  # planted names, IDs, dates, institution, folder names
            assert phi.encode() not in blob and phi.replace("^", "_").encode() not in blob, (artifact, phi)
    assert (ws.run_dir(ensemble_run.run_id) / "best.pt").is_file()


def test_evaluate_fits_calibration_and_threshold_on_the_out_of_fold_table(ensemble_run: EnsembleRun, env) -> None:
    from medxfer.evaluation.evaluate import compute_evaluation, oof_outputs

    ev = ensemble_run.evaluation
    assert ev["validation_source"] == "out_of_fold"
    assert ev["race"] == RACE and ev["ensemble"]["members"] == 2 and ev["ensemble"]["folds"] == [0, 1]
    nontest = ensemble_run.rows[ensemble_run.rows["split"] != "test"]
    assert ev["evaluated"]["val"] == len(nontest) == len(ensemble_run.oof)
    assert sum(ev["counts"]["val"].values()) == len(nontest)
    # The same numbers from the OOF table alone (test outputs play no part in threshold or calibration).
    val, _ = oof_outputs(ensemble_run.oof, ensemble_run.rows, 2)
    spec = ensemble_run.spec
    alone = compute_evaluation(val, val, spec.classes, spec.positive_class, spec.task, n_bootstrap=100).evaluation
    assert ev["threshold"] == pytest.approx(alone["threshold"], abs=1e-8)  # float32 logits via CSV
    assert ev["temperature"] == pytest.approx(alone["temperature"], abs=1e-8)
    assert ev["val"]["auroc"]["value"] == pytest.approx(alone["val"]["auroc"]["value"], abs=1e-12)
    assert ev["ood"]["fit_on"].startswith("the non-test studies")


def test_a_perturbed_oof_table_moves_the_threshold_not_the_test_ranking(ensemble_run: EnsembleRun, env) -> None:
    from medxfer.evaluation.evaluate import evaluate
    from medxfer.training.ensemble import create_ensemble_run

    oof = ensemble_run.oof.copy()
    oof["logit_1"] = oof["logit_1"] + 0.5 + np.linspace(-3, 3, len(oof))  # another ranking, another scale
    rid = create_ensemble_run(ensemble_run.spec, ensemble_run.workspace, ensemble_run.member_run_ids, oof, RACE)
    ev = evaluate(rid, ensemble_run.workspace, n_bootstrap=100, device="cpu").evaluation
    base = ensemble_run.evaluation
    assert ev["threshold"] != pytest.approx(base["threshold"], abs=1e-6)
    assert ev["val"]["auroc"]["value"] != pytest.approx(base["val"]["auroc"]["value"], abs=1e-9)
    # The test split is inferred by the same ensemble: its AUROC (rank-based) is the same.
    assert ev["test"]["auroc"]["value"] == pytest.approx(base["test"]["auroc"]["value"], abs=1e-12)


def test_oof_tables_that_would_evaluate_the_wrong_studies_are_refused(ensemble_run: EnsembleRun) -> None:
    from medxfer.evaluation.evaluate import oof_outputs

    rows, oof = ensemble_run.rows, ensemble_run.oof
    test_key = rows.loc[rows["split"] == "test", "study_key"].iloc[0]
    leaked = pd.concat([oof, oof.iloc[:1].assign(study_key=test_key)], ignore_index=True)
    with pytest.raises(StageError, match="test studies"):
        oof_outputs(leaked, rows, 2)
    with pytest.raises(StageError, match="fold of 1 studies differs"):
        oof_outputs(oof.assign(fold=[1 - f if i == 0 else f for i, f in enumerate(oof["fold"])]), rows, 2)
    with pytest.raises(MedxferError, match="logit_1"):
        oof_outputs(oof.drop(columns=["logit_1"]), rows, 2)
    val, missing = oof_outputs(oof.iloc[1:], rows, 2)
    assert missing == 1 and len(val.studies) == len(oof) - 1


def test_create_ensemble_run_refuses_the_same_fold_twice(ensemble_run: EnsembleRun, env) -> None:
    from medxfer.training.ensemble import create_ensemble_run

    with pytest.raises(MedxferError, match="repeat a fold"):
        create_ensemble_run(
            ensemble_run.spec, ensemble_run.workspace, [ensemble_run.member_run_ids[0]] * 2, ensemble_run.oof, RACE
        )


def test_register_predict_pyfunc_and_export_use_the_ensemble(ensemble_run: EnsembleRun, env, tmp_path: Path) -> None:
    import mlflow
    import onnxruntime as ort
    import torch
    from medxfer.core.workspace import Workspace
    from medxfer.handoff import export as E
    from medxfer.handoff import registry
    from medxfer.handoff.bundle import Predictor
    from medxfer.handoff.predict import predict
    from medxfer.models.ensemble import FoldEnsemble

    ws = ensemble_run.workspace
    reg = registry.register(ensemble_run.run_id, NAME, ws, force=True)
    uri = f"models:/{NAME}@candidate"
    assert reg.alias == "candidate"
    folders = sorted({str(Path(f).parent) for f in ensemble_run.dataset.root.rglob("IM0001")})[:4]
    sal = tmp_path / "saliency"
    res = predict(uri, [Path(f) for f in folders], tmp_path / "preds.csv", sal, workspace=ws, echo_input=True)
    got = pd.read_csv(tmp_path / "preds.csv")
    assert res.n_rows == 4 and res.n_errors == 0
    # Grad-CAM of an ensemble: the mean of its members' maps, one PNG per study.
    assert res.n_saliency == 4 and res.saliency_failed == 0 and len(list(sal.glob("*.png"))) == 4

    # The same numbers from the run's ensemble checkpoint, by hand: mean of the members' logits, then calibration.
    out = E.export(uri, tmp_path / "handoff", workspace=ws)
    p = Predictor.from_dir(tmp_path / "handoff")
    assert isinstance(p.model, FoldEnsemble) and p.model.n_members == 2
    x = torch.stack([p.preprocess(f) for f in folders])
    from medxfer.training import checkpoint as C

    member_logits = []
    for rid in ensemble_run.member_run_ids:
        m, _ = C.load_for_inference(Workspace.for_spec(ws, ensemble_run.spec.name).run_dir(rid) / "best.pt")
        with torch.no_grad():
            member_logits.append(m(x).numpy())
    z = np.mean(member_logits, axis=0)
    np.testing.assert_allclose(p.logits(x), z, atol=1e-5, rtol=0)
    prob = p.probabilities(z)
    by_input = got.set_index("input")
    np.testing.assert_allclose(by_input.loc[folders, "prob_pos"].to_numpy(), prob[:, 1], atol=1e-5)

    mlflow.set_tracking_uri(Workspace.for_spec(ws, "_").tracking_uri)
    try:
        df = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": folders}))
    finally:
        mlflow.set_tracking_uri(None)
    np.testing.assert_allclose(df["prob_pos"].to_numpy(), prob[:, 1], atol=1e-5)

    assert out.program["format"] == "onnx" and out.program["max_abs_diff"] < E.ONNX_ATOL
    sess = ort.InferenceSession(str(tmp_path / "handoff" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = sess.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(onnx, z, atol=E.ONNX_ATOL, rtol=E.ONNX_RTOL)
    cfg = json.loads((tmp_path / "handoff" / "preprocessing.json").read_text())
    assert cfg["model"]["ensemble_members"] == 2 and cfg["ensemble"]["member_run_ids"] == ensemble_run.member_run_ids

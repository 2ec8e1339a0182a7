"""The fold ensemble as one model, without training: mean of logits, checkpoint -> bundle -> Predictor, ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evalfixtures import checkpoint_dict, outputs
from medxfer.core.errors import MedxferError
from medxfer.evaluation.evaluate import compute_evaluation
from medxfer.handoff import bundle as B
from medxfer.handoff import export as E
from medxfer.models.ensemble import FoldEnsemble
from medxfer.models.factory import create_classifier
from medxfer.training import checkpoint as C

ENCODER = "efficientnet_lite0"


def members(k: int, dims: int = 2) -> list[torch.nn.Module]:
    out = []
    for i in range(k):
        torch.manual_seed(100 + i)
        out.append(create_classifier(ENCODER, 2, 1, dims, weights=None).eval())
    return out


def member_ckpts(models: list[torch.nn.Module]) -> list[dict]:
    out = []
    for i, m in enumerate(models):
        c = checkpoint_dict()
        c["model"] = {k: v.clone() for k, v in m.state_dict().items()}
        c["fold"], c["run_id"], c["epoch"], c["best_metric"] = i, f"run{i:029d}", i, 0.5 + i / 10
        c["hashes"] = {"spec": "s", "labelled_content": "l", "split": "k-fold-split"}
        c["optimizer"] = {"state": {}}  # training-only state must not reach the ensemble
        out.append(c)
    return out


def evaluation() -> dict:
    ev = compute_evaluation(
        outputs(60, 1), outputs(80, 2), ["benign", "malignant"], "malignant", "binary", n_bootstrap=50
    ).evaluation
    return {**ev, "run_id": "ens"}


def test_logits_are_the_mean_of_the_members_logits() -> None:
    ms = members(3)
    ens = FoldEnsemble(ms).eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        per = torch.stack([m(x) for m in ms])
        z, f = ens.forward_with_features(x)
        feats = torch.stack([m.features(x) for m in ms])
        assert not torch.allclose(per[0], per[1])  # else the mean shows nothing
        torch.testing.assert_close(ens(x), per.mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(z, ens(x), atol=0, rtol=0)  # forward_with_features' logits are forward's
        torch.testing.assert_close(f, feats.mean(0), atol=1e-6, rtol=0)
    assert set(ens.state_dict()) == {f"members.{i}.{k}" for i in range(3) for k in ms[0].state_dict()}
    assert ens.num_classes == 2 and ens.spatial_dims == 2 and ens.feature_dim == ms[0].feature_dim
    assert ens.cam_target_layers == [f"members.{i}.{ms[0].cam_target_layer}" for i in range(3)]


def test_ensemble_checkpoint_rebuilds_the_ensemble_and_refuses_mixed_members(tmp_path: Path) -> None:
    ms = members(3)
    ckpts = member_ckpts(ms)
    ck = C.ensemble_checkpoint(ckpts, [0, 1, 2], [c["run_id"] for c in ckpts])
    assert ck["ensemble"]["members"] == 3 and ck["ensemble"]["folds"] == [0, 1, 2]
    assert ck["ensemble"]["member_run_ids"] == [c["run_id"] for c in ckpts]
    assert ck["ensemble"]["best_epochs"] == [1, 2, 3]
    assert "optimizer" not in ck and ck["recipe"] == ckpts[0]["recipe"] and ck["hashes"]["split"] == "k-fold-split"
    C.atomic_save(ck, tmp_path / "best.pt")
    model, loaded = C.load_for_inference(tmp_path / "best.pt")  # weights_only load: plain values only
    assert isinstance(model, FoldEnsemble) and model.n_members == 3 and loaded["ensemble"]["members"] == 3
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), FoldEnsemble(ms).eval()(x), atol=1e-6, rtol=0)

    other = member_ckpts(ms)
    other[2]["recipe"] = {**other[2]["recipe"], "optim": {"name": "adamw", "lr": 3e-3}}
    with pytest.raises(MedxferError, match=r"member 2 .* recipe\.optim\.lr \(0\.001 vs 0\.003\)"):
        C.ensemble_checkpoint(other, [0, 1, 2], [c["run_id"] for c in other])
    other = member_ckpts(ms)
    other[1]["hashes"] = {**other[1]["hashes"], "split": "another-split"}
    with pytest.raises(MedxferError, match=r"member 1 .* hashes\.split"):
        C.ensemble_checkpoint(other, [0, 1, 2], [c["run_id"] for c in other])
    with pytest.raises(MedxferError, match="repeat a fold"):
        C.ensemble_checkpoint(ckpts[:2], [0, 0], ["a", "b"])


def ensemble_bundle(tmp_path: Path, k: int = 3, tta: bool = False) -> tuple[Path, FoldEnsemble]:
    ms = members(k)
    ckpts = member_ckpts(ms)
    ck = C.ensemble_checkpoint(ckpts, list(range(k)), [c["run_id"] for c in ckpts])
    ck["run_id"] = "ens"
    ck["recipe"]["evaluation"]["tta"] = tta
    return B.write_bundle(ck, evaluation(), tmp_path / "bundle"), FoldEnsemble(ms).eval()


def test_checkpoint_to_bundle_to_predictor_is_the_fold_ensemble(tmp_path: Path) -> None:
    out, ens = ensemble_bundle(tmp_path)
    cfg = json.loads((out / B.PREPROCESSING).read_text())
    assert cfg["model"]["ensemble_members"] == 3
    assert cfg["ensemble"]["folds"] == [0, 1, 2] and cfg["weights"]["sha256"] == B.sha256_file(out / B.WEIGHTS)
    p = B.Predictor.from_dir(out)
    assert isinstance(p.model, FoldEnsemble)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        ref = ens(x).numpy()
    np.testing.assert_allclose(p.logits(x), ref, atol=1e-6, rtol=0)
    z, f = p.logits_and_features(x)
    assert f is not None and f.shape == (3, ens.feature_dim)
    np.testing.assert_allclose(z, ref, atol=1e-6, rtol=0)


def test_mirrored_ensemble_wraps_the_ensemble(tmp_path: Path) -> None:
    out, ens = ensemble_bundle(tmp_path, k=2, tta=True)
    p = B.Predictor.from_dir(out)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = (ens(x) + ens(torch.flip(x, [3]))) / 2
    np.testing.assert_allclose(p.logits(x), want.numpy(), atol=1e-6, rtol=0)
    assert isinstance(p.inference_model.model, FoldEnsemble)


def test_single_model_bundle_keeps_its_keys(tmp_path: Path) -> None:
    """No new key for one model: its preprocessing.json is what it was before ensembles existed."""
    ck = checkpoint_dict()
    torch.manual_seed(0)
    ck["model"] = create_classifier(ENCODER, 2, 1, 2, weights=None).state_dict()
    out = B.write_bundle(ck, evaluation(), tmp_path / "single")
    cfg = json.loads((out / B.PREPROCESSING).read_text())
    assert list(cfg["model"]) == ["encoder", "num_classes", "in_chans", "spatial_dims"]
    assert "ensemble" not in cfg
    assert not isinstance(B.Predictor.from_dir(out).model, FoldEnsemble)


def test_ensemble_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    import onnxruntime as ort

    out, ens = ensemble_bundle(tmp_path, k=2)
    res = E.export(str(out), tmp_path / "handoff", workspace=tmp_path / "ws")
    assert res.program["format"] == "onnx" and res.program["max_abs_diff"] < E.ONNX_ATOL
    assert "fold ensemble of 2 models" in (tmp_path / "handoff" / "README.md").read_text()
    x = torch.rand(4, 1, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        ref = ens(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "handoff" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"input": x.numpy()})[0], ref, atol=E.ONNX_ATOL, rtol=E.ONNX_RTOL)
    assert E.verify_sums(tmp_path / "handoff") == []


def test_ensemble_torchscript_fallback_reproduces_eager(tmp_path: Path) -> None:
    _, ens = ensemble_bundle(tmp_path, k=2)
    ok, diff = E.export_torchscript(ens, torch.rand(1, 1, 32, 32), tmp_path / "m.pt")
    assert ok and diff < E.ONNX_ATOL


def test_check_oof_orders_the_table_and_refuses_what_cannot_be_one() -> None:
    import pandas as pd
    from medxfer.core.errors import DataError
    from medxfer.training.ensemble import check_oof

    oof = pd.DataFrame({"logit_1": [0.5, -1.0], "fold": [0.0, 1.0], "study_key": [7, 8], "logit_0": [0.0, 0.0]})
    got = check_oof(oof, 2, folds=[0, 1])
    assert list(got.columns) == ["study_key", "fold", "logit_0", "logit_1"]
    assert got["study_key"].tolist() == ["7", "8"] and got["fold"].tolist() == [0, 1]
    for bad, match in (
        (oof.drop(columns=["logit_0"]), "lacks logit_0"),
        (oof.assign(study_key=[7, 7]), "repeats 1 study_key"),
        (oof.assign(fold=[0.0, float("nan")]), "not a whole number"),
        (oof.assign(logit_1=[0.5, float("inf")]), "non-finite logits"),
        (oof.assign(fold=[0, 2]), r"fold\(s\) \[2\]"),
    ):
        with pytest.raises(DataError, match=match):
            check_oof(bad, 2, folds=[0, 1], what="oof.csv")

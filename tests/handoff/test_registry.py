"""register / promote, and the registered pyfunc as a user loads it: mlflow.pyfunc.load_model(...).predict(df)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import PHI, write_image2d, write_nifti
from medxfer import tracking
from medxfer.core.errors import StageError
from medxfer.handoff import registry
from medxfer.io.phi import scan_for_phi
from medxfer.runall import TEST_METRICS


def _blob_image(positive: bool, size: int = 48, seed: int = 7) -> np.ndarray:
    """Like the training data (bright blob = 'pos'), at a size the pipeline has never seen."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 12, (size, size))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        img += 120 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 8) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_version_has_alias_tags_and_description(registered) -> None:
    mv = tracking.get_model_version(registered.tracking_uri, registered.model_name, registered.model_version)
    assert "candidate" in mv["aliases"] and mv["run_id"] == registered.run_id
    tags = mv["tags"]
    ev = json.loads(
        (registered.workspace / "tiny-dicom2d" / "runs" / registered.run_id / "evaluation.json").read_text()
    )
    # Every defined value and CI bound is a tag; an undefined one (e.g. NPV with no predicted negatives) is not.
    # Rounded to 4 significant digits (readable in the UI); a CI bound outward, so the interval still holds it.
    for m in TEST_METRICS:
        for part, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            v = ev["test"][m][part]
            assert (f"test_{m}{suffix}" in tags) == (v is not None), (m, part)
            if v is not None:
                got = float(tags[f"test_{m}{suffix}"])
                assert got == pytest.approx(v, rel=1e-3, abs=1e-9), (m, part)
                assert {"ci_low": got <= v + 1e-12, "ci_high": got >= v - 1e-12}.get(part, True), (m, part, got, v)
    assert {"test_auroc", "test_auroc_ci_low", "test_auroc_ci_high"} <= set(tags)
    assert {
        "spec_hash",
        "labelled_content_hash",
        "split_hash",
        "git_commit",
        "weight_source",
        "threshold",
        "temperature",
        "floor.min_auroc_ci_low",
        "weights_sha256",
    } <= set(tags)
    assert tags["weight_source"] == "package" and tags["run_id"] == registered.run_id
    run = tracking.get_run(registered.tracking_uri, registered.run_id)
    assert tags["git_commit"] == run["params"]["git.commit"]  # the commit it was trained at
    assert tags["split_hash"] == run["params"]["hash.split"]
    assert tags["labelled_content_hash"] == run["params"]["hash.labelled_content"]
    assert float(tags["threshold"]) == pytest.approx(ev["threshold"], rel=1e-3)
    assert len(tags["threshold"].removeprefix("0.")) <= 4


def test_rounding_is_four_significant_digits_ci_bounds_outward() -> None:
    assert registry._fmt(0.934985) == "0.935" and registry._fmt(0.8952220450145424) == "0.8952"
    assert registry._fmt(0.69996, "down") == "0.6999" and registry._fmt(0.69996) == "0.7"
    assert registry._fmt(0.329167, "up") == "0.3292" and registry._fmt(1.0, "up") == "1"
    assert registry._fmt(0.00303648, "down") == "0.003036" and registry._fmt(0.0) == "0" and registry._fmt(3) == "3"


def test_registered_model_has_a_description_tags_and_its_logged_model_knows_it(registered) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(registered.tracking_uri, registry_uri=registered.tracking_uri)
    rm = client.get_registered_model(registered.model_name)
    assert "binary classifier of 2D US images into neg, pos" in rm.description and "Intended use:" in rm.description
    assert rm.tags == {
        "task": "binary",
        "classes": "neg,pos",
        "modality": "US",
        "dims": "2D",
        "spec": "tiny-dicom2d",
        "framework": "medxfer (PyTorch), MLflow pyfunc",
    }
    mv = client.get_model_version(registered.model_name, registered.model_version)
    lm = client.get_logged_model(mv.source.removeprefix("models:/"))
    listed = [(v["name"], str(v["version"])) for v in json.loads(lm.tags["mlflow.modelVersions"])]
    assert listed == [(registered.model_name, registered.model_version)]
    run = client.get_run(registered.run_id)
    got = {m.key: m.value for m in lm.metrics}
    assert {k for k in got} == {k for k in run.data.metrics if k.startswith(registry.LOGGED_MODEL_METRICS)}
    assert got["test/auroc"] == run.data.metrics["test/auroc"] and lm.params["encoder"] == "efficientnet_lite0"
    assert len(client.get_metric_history(registered.run_id, "test/auroc")) == 1  # the run's history unchanged


def test_model_is_code_plus_safetensors_with_a_phi_free_example(registered, tmp_path: Path) -> None:
    local = tracking.download_registered_model(
        registered.tracking_uri, f"models:/{registered.model_name}@candidate", tmp_path / "m"
    )
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    bundle = {
        f"artifacts/bundle/{n}"
        for n in ("weights.safetensors", "preprocessing.json", "evaluation.json", "model_card.md", "model_card.json")
    }
    assert bundle <= files and "pyfunc_model.py" in files
    # Models from code: no pickled PythonModel anywhere in the model's files.
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    mlmodel = (local / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "model_version: '" in mlmodel
    example = json.loads((local / "input_example.json").read_text())
    assert example == {"columns": ["path"], "data": [[registry.INPUT_EXAMPLE_PATH]]}
    card = (local / "artifacts/bundle/model_card.md").read_text()
    assert registered.model_name in card


def test_model_card_is_attached_to_the_run(registered, tmp_path: Path) -> None:
    got = tracking.download_run_artifact(registered.tracking_uri, registered.run_id, "model_card", tmp_path)
    assert got is not None and {p.name for p in got.iterdir()} == {"model_card.md", "model_card.json"}
    run = tracking.get_run(registered.tracking_uri, registered.run_id)
    assert run["tags"]["medxfer.registered"] == f"{registered.model_name}/{registered.model_version}"
    assert run["status"] == "FINISHED"  # registering does not reopen the training run


def test_pyfunc_on_unseen_dicom_and_nifti_with_error_rows(registered, tmp_path: Path) -> None:
    import mlflow

    new = tmp_path / "new"
    # Folder names a user's export might carry: they stay in the user's own output only.
    pos_dir = new / "DOE_JANE" / "study"
    write_image2d(pos_dir / "IM0001", _blob_image(True), patient_name="DOE^JANE", patient_id="NEW-1")
    neg_file = write_image2d(new / "neg.dcm", _blob_image(False), patient_id="NEW-2")
    # NIfTI: the model was trained on DICOM; a 2D NIfTI of the same kind of image must work too.
    pos_nii = write_nifti(new / "pos.nii.gz", _blob_image(True).astype(np.float32), spacing=(0.5, 0.5))
    (new / "corrupt.dcm").write_bytes(b"DICM but not really")
    paths = [str(pos_dir), str(neg_file), str(pos_nii), str(new / "corrupt.dcm"), str(new / "missing")]

    mlflow.set_tracking_uri(registered.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{registered.model_name}@candidate")
        df = model.predict(pd.DataFrame({"path": paths}))
        echoed = mlflow.pyfunc.load_model(
            f"models:/{registered.model_name}@candidate", model_config={"echo_input": True}
        ).predict(pd.DataFrame({"path": paths}))
    finally:
        mlflow.set_tracking_uri(None)
    # By default a row number and a pseudonym of each input, never the input (its folder names a patient).
    assert list(df.columns)[:5] == ["row", "input_key", "prob_neg", "prob_pos", "decision"]
    assert {"model_name", "model_version", "error"} <= set(df.columns) and "input" not in df.columns
    assert list(df["row"]) == [1, 2, 3, 4, 5] and df["input_key"].str.match(r"^in-[0-9a-f]{20}$").all()
    assert "DOE_JANE" not in df.to_csv() and str(new) not in df.to_csv()
    assert list(echoed["input"]) == paths and list(echoed.columns)[:3] == ["row", "input_key", "input"]
    assert list(echoed["input_key"]) == list(df["input_key"])  # one process, one key
    ok, bad = df.iloc[:3], df.iloc[3:]
    assert ok["error"].isna().all(), ok["error"].tolist()
    np.testing.assert_allclose(ok["prob_neg"] + ok["prob_pos"], 1.0, rtol=1e-6)
    assert set(ok["model_name"]) == {registered.model_name} and set(ok["model_version"]) == {registered.model_version}
    assert ok["prob_pos"].iloc[0] > ok["prob_pos"].iloc[1]  # blob vs no blob: the model learned something
    assert bad["error"].str.match(r"^[a-z_]+: ").all() and bad[["prob_neg", "prob_pos"]].isna().all().all()
    assert bad["error"].iloc[1].startswith("not_found")


def test_promote_checks_the_recipe_floor(registered) -> None:
    uri, name, version = registered.tracking_uri, registered.model_name, registered.model_version
    tags = tracking.get_model_version(uri, name, version)["tags"]
    ci_low = float(tags["test_auroc_ci_low"])
    guard = tracking.PHIGuard()
    try:
        # A floor just above the achieved lower bound: refused, and the message says which and by how much.
        tracking.set_model_version_tags(uri, name, version, {"floor.min_auroc_ci_low": f"{ci_low + 0.01:.4f}"}, guard)
        with pytest.raises(registry.PromotionRefused, match=r"test AUROC 95% CI lower bound .* < required"):
            registry.promote(name, version, "champion", registered.workspace)
        assert "champion" not in tracking.get_model_version(uri, name, version)["aliases"]
        # A floor the model meets: promoted.
        tracking.set_model_version_tags(uri, name, version, {"floor.min_auroc_ci_low": f"{ci_low - 0.01:.4f}"}, guard)
        res = registry.promote(name, version, "champion", registered.workspace)
        assert res.summary()["checks"][0]["ok"] is True
        assert "champion" in tracking.get_model_version(uri, name, version)["aliases"]
    finally:
        tracking.set_model_version_tags(
            uri, name, version, {"floor.min_auroc_ci_low": tags["floor.min_auroc_ci_low"]}, guard
        )


def test_promotion_checks_without_metrics_refuse() -> None:
    checks = registry.promotion_checks({"floor.min_auroc_ci_low": "0.7"})
    assert len(checks) == 1 and not checks[0].ok and "missing" in checks[0].text()
    assert registry.promotion_checks({"test_auroc_ci_low": "0.5"}) == []  # no floor in the recipe


def test_register_refuses_unknown_runs_and_bad_names(registered) -> None:
    with pytest.raises(StageError, match="no MLflow run"):
        registry.register("0" * 32, "x", registered.workspace)
    with pytest.raises(registry.MedxferError, match="model name"):
        registry.register(registered.run_id, "bad name/with slash", registered.workspace)


def test_no_phi_in_the_mlflow_store(registered) -> None:
    store = [registered.workspace / "mlflow.db", registered.workspace / "mlartifacts"]
    assert scan_for_phi(store, [*PHI.values(), "DOE^JANE"]) == []


def test_cli_promote_refusal_exits_nonzero_with_the_reason(registered) -> None:
    from medxfer.cli import app
    from typer.testing import CliRunner

    uri, name, version = registered.tracking_uri, registered.model_name, registered.model_version
    floor = tracking.get_model_version(uri, name, version)["tags"]["floor.min_auroc_ci_low"]
    guard = tracking.PHIGuard()
    tracking.set_model_version_tags(uri, name, version, {"floor.min_auroc_ci_low": "1.5"}, guard)
    try:
        res = CliRunner().invoke(
            app, ["promote", name, version, "--alias", "champion", "--workspace", str(registered.workspace), "--json"]
        )
    finally:
        tracking.set_model_version_tags(uri, name, version, {"floor.min_auroc_ci_low": floor}, guard)
    assert res.exit_code == 1 and "refusing to set alias 'champion'" in res.output
    assert "required 1.500" in res.output and res.stdout.strip() == ""


# --------------------------------------------------------------------------- the registration guard


def _evaluation(val_auroc=(0.8, 0.7, 0.9), temperature=1.3, confusion=((5, 1), (2, 6))) -> dict:
    value, lo, hi = val_auroc
    return {
        "classes": ["pos", "neg"],
        "val": {"auroc": {"value": value, "ci_low": lo, "ci_high": hi}},
        "temperature": temperature,
        "confusion_matrix": {"labels": ["pos", "neg"], "test": [list(r) for r in confusion]},
    }


def test_guard_passes_a_sound_model_and_names_each_failed_check() -> None:
    assert registry.registration_warnings(_evaluation()) == []
    (w,) = registry.registration_warnings(_evaluation(val_auroc=(0.62, 0.48, 0.77)))
    assert "includes 0.5" in w and "[0.480, 0.770]" in w
    (w,) = registry.registration_warnings(_evaluation(temperature=20.0))
    assert "bound" in w and "T = 20" in w
    (w,) = registry.registration_warnings(_evaluation(temperature=0.05))
    assert "bound" in w
    (w,) = registry.registration_warnings(_evaluation(confusion=((0, 6), (0, 8))))
    assert "predicted 'neg'" in w and "collapse" in w
    # An evaluation from before validation CIs were recorded: the point value still counts.
    old = _evaluation()
    old["val"]["auroc"] = {"value": 0.45, "ci_low": None, "ci_high": None}
    assert "no better than chance" in registry.registration_warnings(old)[0]
    assert len(registry.registration_warnings(_evaluation((0.125, 0.0, 0.3), 20.0, ((0, 4), (0, 9))))) == 3


def test_the_forced_tiny_fixture_records_why_and_the_override(registered) -> None:
    mv = tracking.get_model_version(registered.tracking_uri, registered.model_name, registered.model_version)
    assert "candidate" in mv["aliases"] and "T = 0.05" in mv["tags"][registry.WARNING_TAG]
    assert mv["tags"][registry.FORCED_TAG].startswith("true") and registered.result.summary()["alias"] == "candidate"


def test_guard_withholds_candidate_from_the_degenerate_demo_run_and_force_records_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run issue #12 reported: `medxfer demo --limit 40`, then `medxfer run` with `--set epochs=2` (25 s here):
    validation AUROC 0.125 [0.000, 0.400] and the temperature on its bound of 20."""
    from medxfer.config.spec import load_spec
    from medxfer.demo import write_demo
    from medxfer.runall import run_all

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDXFER_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("MEDXFER_SYSTEM_METRICS", "0")
    write_demo(tmp_path / "demo-data", limit=40)
    text = (Path(__file__).resolve().parents[2] / "data_specs" / "breastmnist_demo.yaml").read_text()
    (tmp_path / "spec.yaml").write_text(text.replace("../demo-data", "demo-data"))
    ws = tmp_path / "ws"
    res = run_all(load_spec(tmp_path / "spec.yaml"), ws, overrides=["epochs=2"], name="degenerate")
    summary = res.summary()
    assert summary["alias"] is None and any("includes 0.5" in w for w in summary["warnings"])
    uri = res.tracking_uri
    mv = tracking.get_model_version(uri, "degenerate", res.model_version)
    assert mv["aliases"] == [] and "includes 0.5" in mv["tags"][registry.WARNING_TAG]
    assert tracking.run_tags(uri, res.run_id)[registry.WARNING_TAG] == mv["tags"][registry.WARNING_TAG]

    forced = registry.register(res.run_id, "degenerate", ws, force=True)
    assert forced.alias == "candidate" and forced.forced and forced.summary()["warnings"]
    mv = tracking.get_model_version(uri, "degenerate", forced.model_version)
    assert "candidate" in mv["aliases"] and mv["tags"][registry.FORCED_TAG].startswith("true")
    assert registry.FORCED_TAG in tracking.run_tags(uri, res.run_id)

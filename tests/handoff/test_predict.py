"""medxfer predict: every model route, every input kind, error rows, Grad-CAM files on the source grid."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_image2d, write_nifti
from medxfer.core.errors import MedxferError
from medxfer.handoff.predict import predict, saliency_map
from medxfer.io import nifti
from test_bundle import make_bundle
from test_registry import _blob_image


def test_folders_files_csv_and_bad_inputs(registered, tmp_path: Path) -> None:
    studies = tmp_path / "incoming"
    write_image2d(studies / "PATIENT_A" / "s1" / "IM1", _blob_image(True, seed=1), patient_id="A")
    write_image2d(studies / "PATIENT_B" / "s1" / "IM1", _blob_image(False, seed=2), patient_id="B")
    nii = write_nifti(
        tmp_path / "extra" / "vol.nii.gz", _blob_image(True, seed=3).astype(np.float32), spacing=(0.5, 0.5)
    )
    (tmp_path / "extra" / "notes.dcm").write_text("not an image")
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": ["extra/vol.nii.gz", "extra/notes.dcm", "extra/gone.dcm"]}).to_csv(listing, index=False)

    out = tmp_path / "preds.csv"
    res = predict(
        f"models:/{registered.model_name}@candidate",
        [studies, listing],
        out,
        workspace=registered.workspace,
        echo_input=True,
    )
    df = pd.read_csv(out)
    assert len(df) == 5 and res.n_rows == 5 and res.n_errors == 2
    assert list(df.columns)[:3] == ["row", "input_key", "input"] and list(df["row"]) == [1, 2, 3, 4, 5]
    assert set(df["model_name"]) == {registered.model_name}
    assert set(df["model_version"].astype(str)) == {registered.model_version}
    ok = df[df["error"].isna()]
    assert len(ok) == 3 and str(nii) in set(ok["input"])
    assert set(ok["decision"]) <= {"neg", "pos"}
    np.testing.assert_allclose(ok["prob_neg"] + ok["prob_pos"], 1.0, rtol=1e-6)
    assert sorted(df["error"].dropna().str.split(":").str[0]) == ["not_dicom", "not_found"]
    assert res.summary()["errors_by_reason"] == {"not_dicom": 1, "not_found": 1}


def test_run_uri_gives_the_registered_numbers(registered, tmp_path: Path) -> None:
    study = write_image2d(tmp_path / "s" / "IM1", _blob_image(True, seed=4))
    a = predict(
        f"models:/{registered.model_name}/{registered.model_version}",
        [study],
        tmp_path / "a.csv",
        workspace=registered.workspace,
    )
    b = predict(f"runs:/{registered.run_id}", [study], tmp_path / "b.csv", workspace=registered.workspace)
    assert (a.model_version, b.model_version) == (registered.model_version, None)
    pa, pb = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    np.testing.assert_allclose(pa["prob_pos"], pb["prob_pos"], rtol=1e-6)


def test_saliency_2d_png_overlay_named_by_row(registered, tmp_path: Path) -> None:
    study = write_image2d(tmp_path / "DOE_JANE_MRN123" / "IM1", _blob_image(True, size=40, seed=5))
    sal = tmp_path / "cams"
    res = predict(
        f"models:/{registered.model_name}@candidate",
        [study, tmp_path / "missing"],
        tmp_path / "p.csv",
        saliency=sal,
        workspace=registered.workspace,
    )
    assert res.n_saliency == 1 and res.saliency_failed == 0
    names = sorted(p.name for p in sal.iterdir())
    assert names == ["0001.png"]  # a row number, nothing taken from the input's path
    assert (sal / "0001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = pd.read_csv(tmp_path / "p.csv")
    assert df["saliency"].tolist()[0] == "0001.png" and pd.isna(df["saliency"].tolist()[1])


def test_saliency_3d_nifti_on_the_source_grid_with_its_affine(tmp_path: Path) -> None:
    bundle, _, _ = make_bundle(tmp_path, encoder="medicalnet_resnet10", dims=3, size=[16, 16, 16])
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 1, (20, 18, 12)).astype(np.float32)
    vol[8:12, 7:11, 4:8] += 5
    # An oblique, flipped, anisotropic source grid: the map must come back onto exactly this grid.
    affine = np.array([[-0.9, 0.1, 0.0, 40.0], [0.1, 0.9, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])
    src = write_nifti(tmp_path / "in" / "case.nii.gz", vol, affine=affine)
    res = predict(str(bundle), [src], tmp_path / "p.csv", saliency=tmp_path / "cams", workspace=tmp_path / "ws")
    assert res.n_saliency == 1
    cam, cam_affine = nifti.read_volume(tmp_path / "cams" / "0001.nii.gz")
    _, src_affine = nifti.read_volume(src)
    assert cam.shape == vol.shape
    np.testing.assert_allclose(cam_affine, src_affine, atol=1e-4)
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1


def test_saliency_map_matches_the_source_image(registered, tmp_path: Path) -> None:
    from medxfer.handoff.predict import load_predictor
    from medxfer.handoff.registry import load_run, write_run_bundle

    ra = load_run(registered.run_id, registered.workspace, tmp_path)
    p = load_predictor(write_run_bundle(ra, tmp_path / "b"), device="cpu")
    study = write_image2d(tmp_path / "s" / "IM1", _blob_image(True, size=56, seed=6))
    cam, src, affine = saliency_map(p, [str(study)], "dicom", class_idx=1)
    assert cam.shape == src.shape == (56, 56) and affine.shape == (4, 4)
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_bad_model_uris_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MedxferError, match=re.escape("expected models:/NAME@alias")):
        predict("s3://bucket/model", [tmp_path], tmp_path / "p.csv", workspace=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedxferError, match="no medxfer bundle"):
        predict(str(tmp_path / "empty"), [tmp_path], tmp_path / "p.csv", workspace=tmp_path)


def test_cli_predict_json(registered, tmp_path: Path) -> None:
    import json

    from medxfer.cli import app
    from typer.testing import CliRunner

    study = write_image2d(tmp_path / "s" / "IM1", _blob_image(False, seed=8))
    res = CliRunner().invoke(
        app,
        [
            "predict",
            f"models:/{registered.model_name}@candidate",
            str(study),
            "--out",
            str(tmp_path / "p.csv"),
            "--workspace",
            str(registered.workspace),
            "--echo-input",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_predicted"] == 1 and summary["model_version"] == registered.model_version
    assert pd.read_csv(tmp_path / "p.csv")["input"].tolist() == [str(study)]  # asked for: the caller's own string


# --------------------------------------------------------------------------- no input string by default

MARKERS = ["Doe^John", "MRN-0012345", "19650312", "StMungoHospital"]


def _phi_inputs(base: Path) -> list[Path]:
    """A patient-named study tree, a NIfTI named after the patient, a fake DICOM whose text holds the markers
    (its error row must not repeat it), and a missing path named after a birth date."""
    site = base / "StMungoHospital"
    write_image2d(
        site / "Doe^John" / "19650312" / "IM0001",
        _blob_image(True, seed=11),
        patient_id="MRN-0012345",
        patient_name="Doe^John",
        InstitutionName="StMungoHospital",
        PatientBirthDate="19650312",
    )
    write_image2d(site / "MRN-0012345" / "Doe^John.dcm", _blob_image(False, seed=12), patient_name="Doe^John")
    nii = write_nifti(site / "Doe^John.nii.gz", _blob_image(True, seed=13).astype(np.float32), spacing=(0.5, 0.5))
    bad = site / "MRN-0012345.dcm"
    bad.write_bytes(b"DICM Doe^John MRN-0012345 19650312 StMungoHospital")
    return [site / "Doe^John", site / "MRN-0012345", nii, bad, base / "19650312_missing"]


def test_output_has_row_numbers_and_input_keys_never_the_inputs(registered, tmp_path: Path) -> None:
    from medxfer.core.workspace import Workspace
    from medxfer.io.phi import Pseudonymizer, load_key, scan_for_phi

    inputs = _phi_inputs(tmp_path / "in")
    uri = f"models:/{registered.model_name}@candidate"
    res = predict(uri, inputs, tmp_path / "p.csv", saliency=tmp_path / "cams", workspace=registered.workspace)
    df = pd.read_csv(tmp_path / "p.csv")
    assert res.n_rows == len(df) == 5 and res.n_errors == 2 and "input" not in df.columns
    assert list(df.columns)[:2] == ["row", "input_key"] and list(df["row"]) == [1, 2, 3, 4, 5]
    # Nothing from the paths or the files' content: not in the CSV, not in the saliency file names.
    assert not scan_for_phi([tmp_path / "p.csv"], [*MARKERS, str(tmp_path)])
    assert all(re.fullmatch(r"\d{4}\.png", p.name) for p in (tmp_path / "cams").iterdir())
    assert sorted(df["error"].dropna().str.split(":").str[0]) == ["not_dicom", "not_found"]
    # The key is the workspace's pseudonym key: the same input gets the same key in another call (or process).
    key = Pseudonymizer(load_key(Workspace.for_spec(registered.workspace, "_").key_file))
    assert df["input_key"].iloc[2] == key.input_key(str(inputs[2]))
    again = predict(uri, inputs[2:3], tmp_path / "q.csv", workspace=registered.workspace)
    assert again.n_rows == 1 and pd.read_csv(tmp_path / "q.csv")["input_key"].iloc[0] == df["input_key"].iloc[2]


def test_without_a_workspace_key_input_keys_come_from_a_process_key(tmp_path: Path) -> None:
    from medxfer.io.phi import scan_for_phi

    bundle, _, _ = make_bundle(tmp_path, encoder="medicalnet_resnet10", dims=3, size=[16, 16, 16])
    vol = np.random.default_rng(0).normal(0, 1, (16, 16, 16)).astype(np.float32)
    src = write_nifti(tmp_path / "in" / "StMungoHospital" / "Doe^John" / "19650312.nii.gz", vol)
    ws = tmp_path / "ws"  # no key file, and none is created
    predict(str(bundle), [src], tmp_path / "a.csv", workspace=ws)
    predict(str(bundle), [src], tmp_path / "b.csv", workspace=ws)
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert a["error"].isna().all() and not (ws / ".pseudonym_key").exists()
    assert a["input_key"].tolist() == b["input_key"].tolist()  # one process, one key
    assert not scan_for_phi([tmp_path / "a.csv"], [*MARKERS, str(tmp_path)])

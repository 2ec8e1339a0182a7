"""ood_score / ood_flag at predict time: CT given to the 2D ultrasound-like test model is flagged, new studies like
the training ones rarely are, and a bundle without OOD statistics predicts with empty values instead of failing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_dicom2d_dataset, write_nifti
from medxfer.handoff import bundle as B
from medxfer.handoff.predict import load_predictor, predict
from test_bundle import make_bundle

KITS = "dicom/kits_ct_dupe_positions"


def ct_phantom(seed: int, size: int = 96) -> np.ndarray:
    """A CT-like axial slice in HU: air around a soft-tissue body, fat rim, a spine and two kidneys."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    img = np.full((size, size), -1000.0)
    body = (xx / 0.45) ** 2 + (yy / 0.33) ** 2 < 1
    img[body] = -90.0  # fat
    img[(xx / 0.40) ** 2 + (yy / 0.28) ** 2 < 1] = 40.0  # soft tissue
    img[(xx / 0.05) ** 2 + ((yy - 0.18) / 0.05) ** 2 < 1] = 700.0  # vertebra
    for side in (-0.15, 0.15):
        img[((xx - side) / 0.06) ** 2 + ((yy - 0.08) / 0.09) ** 2 < 1] = 150.0  # contrast-enhanced kidneys
    return (img + rng.normal(0, 12, img.shape)).astype(np.float32)


def _real_ct_slices(shared: Path, out: Path, n: int = 4) -> list[Path]:
    """Real CT slices (TCIA C4KC-KiTS, in ../shared) as 2D NIfTI in HU: a DICOM CT would be refused by the model's
    series rules (modality US) before any score, which is right, so the pixels come in another container."""
    import pydicom

    paths = []
    for f in sorted((shared / KITS).glob("*.dcm"))[:n]:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        paths.append(write_nifti(out / f"{f.stem}.nii.gz", hu, spacing=tuple(float(v) for v in ds.PixelSpacing)))
    return paths


def test_registered_bundle_carries_the_validation_statistics(registered, tmp_path: Path) -> None:
    from medxfer.handoff.registry import load_run, write_run_bundle

    ra = load_run(registered.run_id, registered.workspace, tmp_path)
    ood = ra.evaluation["ood"]
    assert ood["fitted"] and ood["n_fit"] >= 8 and ood["fit_on"] == "validation", ood
    bundle = write_run_bundle(ra, tmp_path / "b")
    cfg = B.load_config(bundle)
    assert cfg["ood"]["threshold"] == pytest.approx(ood["threshold"]) and (bundle / B.OOD).is_file()
    # Canonical header: the same statistics give the same file, whatever process writes them.
    again = write_run_bundle(ra, tmp_path / "b2")
    assert B.load_config(again)["ood"]["sha256"] == cfg["ood"]["sha256"]


def test_ct_is_flagged_and_new_ultrasound_studies_rarely(registered, tmp_path: Path) -> None:
    """CT slices (generated phantoms, and real KiTS slices when ../shared is there) all flagged; new studies from
    the training generator flagged at about 1/(n_val + 1).

    Measured on tiny-us (its 8 validation studies fit the statistics): threshold 42.8; 5 of 40 new US studies flagged
    (12.5%, max score 49.7: with 8 validation studies the 99th percentile is about their maximum, so ~1/9 is
    expected); 8 of 8 CT slices flagged, lowest CT score 99.0.
    """
    new = make_dicom2d_dataset(tmp_path / "new", n_studies=40, seed=11, plant_phi=False)
    ct = [write_nifti(tmp_path / "ct" / f"ph{i}.nii.gz", ct_phantom(i), spacing=(0.8, 0.8)) for i in range(4)]
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if (shared / KITS).is_dir():
        ct += _real_ct_slices(shared, tmp_path / "kits")
    out = tmp_path / "p.csv"
    res = predict(f"models:/{registered.model_name}@candidate", [new.root, *ct], out, workspace=registered.workspace)
    df = pd.read_csv(out)
    assert len(df) == 40 + len(ct) and df["error"].isna().all(), df["error"].dropna().tolist()
    ids, cts = df.iloc[:40], df.iloc[40:]
    assert ids["ood_score"].notna().all() and cts["ood_score"].notna().all()
    summary = res.summary()
    rate = float(ids["ood_flag"].astype(bool).mean())
    print(
        f"OOD tiny-us: threshold {summary['ood_threshold']:.2f}; new US flagged {rate:.3f} "
        f"(max {ids['ood_score'].max():.2f}); CT flagged {cts['ood_flag'].astype(bool).mean():.3f} "
        f"(min {cts['ood_score'].min():.2f}, n={len(cts)})"
    )
    assert cts["ood_flag"].astype(bool).all()
    assert cts["ood_score"].min() > 1.5 * summary["ood_threshold"]
    assert rate <= 0.2  # 1/9 expected with 8 validation studies (see above); 1% needs ~100 of them
    assert summary["ood_flagged"] == int(df["ood_flag"].astype(bool).sum())


def test_pyfunc_scores_ood(registered, tmp_path: Path) -> None:
    import mlflow

    ct = write_nifti(tmp_path / "ct.nii.gz", ct_phantom(9), spacing=(0.8, 0.8))
    mlflow.set_tracking_uri(registered.tracking_uri)
    try:
        df = mlflow.pyfunc.load_model(f"models:/{registered.model_name}@candidate").predict(
            pd.DataFrame({"path": [str(ct), str(tmp_path / "missing.dcm")]})
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert bool(df["ood_flag"].iloc[0]) and df["ood_score"].iloc[0] > 0
    assert pd.isna(df["ood_flag"].iloc[1]) and pd.isna(df["ood_score"].iloc[1])  # an error row has no score


def test_bundle_without_statistics_gives_empty_values(tmp_path: Path) -> None:
    bundle, _, _ = make_bundle(tmp_path)  # written without ood_stats
    cfg = json.loads((bundle / B.PREPROCESSING).read_text())
    assert cfg["ood"] is None and not (bundle / B.OOD).exists()
    del cfg["ood"]  # as a bundle written before OOD statistics existed
    (bundle / B.PREPROCESSING).write_text(json.dumps(cfg))
    img = write_nifti(tmp_path / "x.nii.gz", ct_phantom(1, size=32), spacing=(1.0, 1.0))
    df = load_predictor(bundle, device="cpu").predict([img])
    assert df["error"].isna().all() and df["decision"].notna().all()
    assert df["ood_score"].isna().all() and df["ood_flag"].isna().all()
    assert str(df["ood_flag"].dtype) == "boolean"


def test_altered_statistics_are_refused(tmp_path: Path) -> None:
    from medxfer.stats import ood

    bundle, model, _ = make_bundle(tmp_path)
    ckpt = B.load_config(bundle)
    rng = np.random.default_rng(0)
    stats, _ = ood.calibrate(rng.normal(size=(20, model.feature_dim)))
    B._write_ood(stats, bundle)
    ckpt["ood"] = B._write_ood(stats, bundle)
    (bundle / B.PREPROCESSING).write_text(json.dumps(ckpt))
    p = B.Predictor.from_dir(bundle)
    assert p.ood is not None and p.ood.threshold == pytest.approx(stats.threshold)
    data = bytearray((bundle / B.OOD).read_bytes())
    data[-1] ^= 0xFF
    (bundle / B.OOD).write_bytes(bytes(data))
    with pytest.raises(B.BundleError, match="does not match the SHA-256"):
        B.Predictor.from_dir(bundle)

"""Issue 14, one case per finding of the hostile-input pass: each bad input gets its reason code, never a
traceback and never silence, and predict never returns a probability with a decision for what it could not read."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    make_dicom2d_dataset,
    set_dicom_attrs,
    write_image2d,
    write_labels,
    write_nifti,
    write_nifti_raw,
    write_series,
)
from helpers_data import make_spec
from medxfer.data.transforms import read_study
from medxfer.ingest.ingest import ingest, resolve_inputs
from medxfer.io import checks, dicom, nifti
from medxfer.io.phi import Pseudonymizer


def _header_code(path: Path) -> str | None:
    return dicom.read_header(str(path), Pseudonymizer.ephemeral()).error


def _nifti_code(path: Path, dims: int = 3) -> str:
    with pytest.raises(checks.InputError) as exc:
        nifti.inspect(path, dims)
    assert exc.value.code in checks.REASONS
    return exc.value.code


def _resolve_codes(paths: list[Path], dims: int, kind: str) -> set[str | None]:
    return {it.reason_code for it in resolve_inputs(paths, make_spec(dims, kind))}


# ------------------------------------------------------------------------------------------- crashes


def test_nifti_zero_size_dimension_is_too_small_not_a_crash(tmp_path: Path) -> None:
    p = write_nifti_raw(tmp_path / "zero.nii.gz", np.zeros((8, 8, 0), np.float32))
    assert _nifti_code(p) == "too_small"
    assert _resolve_codes([p], 3, "nifti") == {"too_small"}  # predict's input resolution survives it


def test_nifti_rgb24_is_unsupported_dtype_not_a_crash(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = write_nifti_raw(tmp_path / "rgb.nii.gz", rgb)
    assert _nifti_code(p) == "unsupported_dtype"
    with pytest.raises(nifti.NiftiError):  # the read step refuses it too, with the code
        nifti.read_volume(p)


def test_thin_dicom_strip_is_refused_before_decoding(tmp_path: Path) -> None:
    strip = write_image2d(tmp_path / "strip.dcm", np.arange(4096, dtype=np.uint16).reshape(1, 4096) % 251)
    one = write_image2d(tmp_path / "one.dcm", np.array([[7]], np.uint8))
    assert _header_code(strip) == "too_small" and _header_code(one) == "too_small"
    assert _resolve_codes([strip, one], 2, "dicom") == {"too_small"}


def test_decoded_size_cap_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_series(tmp_path / "s", n=4, rows=64, cols=64)
    assert _header_code(files[0]) is None
    monkeypatch.setenv(checks.MAX_DECODED_ENV, "0.01")  # 10 KB < 64*64*4 bytes
    assert _header_code(files[0]) == "too_large"
    vol = write_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).random((64, 64, 8), dtype=np.float32))
    assert _nifti_code(vol) == "too_large"
    monkeypatch.setenv(checks.MAX_DECODED_ENV, "not a number")  # falls back to the default
    assert checks.max_decoded_bytes() == checks.DEFAULT_MAX_DECODED_MB * 2**20


# ------------------------------------------------------------------------------------------- accepted but should not be


def test_rescale_slope_zero_is_a_constant_image(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", n=4, slope=0.0)
    with pytest.raises(dicom.GeometryError) as exc:
        dicom.sample_pixels([str(f) for f in files])
    assert exc.value.code == "constant_image"
    with pytest.raises(checks.InputError, match="every pixel") as exc2:
        read_study([str(f) for f in files], "dicom")
    assert exc2.value.code == "constant_image"


def test_constant_and_complex_nifti(tmp_path: Path) -> None:
    const = write_nifti(tmp_path / "c.nii.gz", np.full((8, 8, 8), 3.0, np.float32))
    cplx = write_nifti_raw(tmp_path / "x.nii.gz", (np.ones((8, 8, 8)) + 1j).astype(np.complex64))
    assert _nifti_code(const) == "constant_image"
    assert _nifti_code(cplx) == "complex_data"
    assert _resolve_codes([const, cplx], 3, "nifti") == {"constant_image", "complex_data"}


@pytest.mark.parametrize("slope", ["NaN", "1e38"])
def test_one_bad_slope_slice_is_found_at_ingest_and_at_read(tmp_path: Path, slope: str) -> None:
    files = write_series(tmp_path / "s", n=7, names="ordered")
    set_dicom_attrs(files[1], RescaleSlope=slope)  # not first, middle or last: the old sampling missed it
    geom_files = [str(f) for f in files]
    with pytest.raises(dicom.GeometryError) as exc:
        dicom.sample_pixels(geom_files)
    assert exc.value.code == "nonfinite_pixels" and "1 of 7" in exc.value.message
    with pytest.raises(checks.InputError) as exc2:  # the training cache's read step quarantines it too
        read_study(geom_files, "dicom")
    assert exc2.value.code == "nonfinite_pixels"


def test_nan_float_nifti_is_nonfinite(tmp_path: Path) -> None:
    v = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    v[2, 3, 4] = np.nan
    p = write_nifti(tmp_path / "n.nii.gz", v)
    assert _nifti_code(p) == "nonfinite_pixels"


# ----------------------------------------------------------------------------- predict: no NaN with a decision


def _bundle(tmp_path: Path):
    from handoff.test_bundle import make_bundle
    from medxfer.handoff.predict import load_predictor

    out, _, _ = make_bundle(tmp_path)
    return load_predictor(out, device="cpu")


def _no_nan_decisions(df: pd.DataFrame) -> None:
    probs = df[[c for c in df.columns if c.startswith("prob_")]]
    for (_, row), (_, p) in zip(df.iterrows(), probs.iterrows(), strict=True):
        if not pd.isna(row["decision"]):
            assert p.notna().all() and pd.isna(row["error"])
        else:
            assert isinstance(row["error"], str) and row["error"].split(":")[0] in checks.REASONS


def test_predict_reports_nonfinite_inputs_and_outputs(tmp_path: Path) -> None:
    pred = _bundle(tmp_path)
    good = write_image2d(tmp_path / "in" / "good.dcm")
    huge = write_image2d(tmp_path / "in" / "huge.dcm", RescaleSlope="1e38")
    nan_nii = tmp_path / "in" / "nan.nii.gz"
    v = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    v[3, 3] = np.nan
    write_nifti(nan_nii, v, spacing=(1.0, 1.0))
    df = pred.predict([good, huge, nan_nii])
    assert list(df["error"].isna()) == [True, False, False]
    assert df["error"].iloc[1].startswith("nonfinite_pixels:") and df["error"].iloc[2].startswith("nonfinite_pixels:")
    assert pd.isna(df["decision"].iloc[1]) and math.isnan(df["prob_malignant"].iloc[1])
    _no_nan_decisions(df)
    # Weights gone NaN: the logits check catches what the input check cannot.
    with torch.no_grad():
        for prm in pred.model.parameters():
            prm.fill_(float("nan"))
    df = pred.predict([good])
    assert df["error"].iloc[0].startswith("nonfinite_pixels:") and pd.isna(df["decision"].iloc[0])
    assert math.isnan(df["prob_malignant"].iloc[0])


def test_nifti_given_to_a_dicom_model_says_so(tmp_path: Path) -> None:
    p = write_nifti_raw(tmp_path / "x.nii.gz", (np.ones((16, 16)) + 1j).astype(np.complex64))
    [it] = resolve_inputs([p], make_spec(2, "dicom"))
    assert it.reason_code == "not_dicom" and "NIfTI" in it.message
    pred = _bundle(tmp_path)
    [it] = pred.resolve([p])  # the any-format predictor keeps the real reason
    assert it.reason_code == "complex_data" and "NIfTI file" in it.message


# ------------------------------------------------------------------------------------------- silent or misleading


def test_truncated_header_and_big_endian_claim_get_their_own_codes(tmp_path: Path) -> None:
    p = write_image2d(tmp_path / "ok.dcm")
    data = p.read_bytes()
    for cut in (140, 300, 600):
        q = tmp_path / f"cut{cut}.dcm"
        q.write_bytes(data[:cut])
        assert _header_code(q) == "truncated", cut
    raw = bytearray(data)
    i = data.find(b"1.2.840.10008.1.2.1\0")
    raw[i : i + 20] = b"1.2.840.10008.1.2.2\0"
    be = tmp_path / "be.dcm"
    be.write_bytes(bytes(raw))
    assert _header_code(be) == "wrong_transfer_syntax"


def test_dangling_link_and_blank_key_get_reject_rows(tmp_path: Path) -> None:
    ds = make_dicom2d_dataset(tmp_path, n_studies=8, plant_phi=False)
    os.symlink(tmp_path / "nowhere.dcm", ds.root / "dangling.dcm")
    lines = ds.labels_csv.read_text().splitlines()
    header = lines[0].split(",")
    rows = [ln.split(",") for ln in lines[1:]] + [["" if h == "StudyInstanceUID" else "pos" for h in header]]
    write_labels(ds.labels_csv, header, rows)
    res = ingest(ds.spec, ds.workspace, workers=1)
    rej = pd.read_csv(res.rejects_path, dtype=str, keep_default_na=False)
    assert set(rej["reason_code"]) == {"dangling_link", "blank_key"}
    assert rej.loc[rej["reason_code"] == "blank_key", "input"].iloc[0].endswith(f":{len(rows) + 1}")
    assert set(rej["reason_code"]) <= set(checks.REASONS)


def test_a_predict_csv_without_a_path_column_is_one_error_row_not_a_failed_batch(tmp_path: Path) -> None:
    good = write_image2d(tmp_path / "good.dcm")
    csv = tmp_path / "list.csv"
    csv.write_text("file,who\nx.dcm,someone\n")
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b'path\n"unclosed\n')
    items = resolve_inputs([good, csv, broken], make_spec(2, "dicom"))
    assert [it.reason_code for it in items] == [None, "no_path_column", "unreadable"]
    assert "someone" not in items[1].message and str(tmp_path) not in items[1].message


def test_a_nifti_gzip_cut_inside_its_header_is_truncated(tmp_path: Path) -> None:
    p = write_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).random((16, 16), dtype=np.float32), (1.0, 1.0))
    p.write_bytes(p.read_bytes()[:200])
    assert _nifti_code(p, dims=2) == "truncated"
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not an image"))
    assert _nifti_code(fake, dims=2) == "not_nifti"

"""Export: ONNX matches eager in onnxruntime, SHA256SUMS verifies, the card is complete and PHI-free."""

from __future__ import annotations

import base64
import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evalfixtures import PHI
from medxfer.evaluation import report as R
from medxfer.handoff import export as E
from test_bundle import make_bundle


class _Page(html.parser.HTMLParser):
    """Section ids, <img> sources and text of the report (tests/evaluation/test_report.py checks it in full)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.ids += [str(a["id"])] if a.get("id") else []
        self.srcs += [str(a.get("src"))] if tag == "img" else []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_self_contained(page: _Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(s.startswith(prefix) for s in page.srcs)
    pngs = [base64.b64decode(s.removeprefix(prefix), validate=True) for s in page.srcs]
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    return pngs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, E.ExportResult, torch.nn.Module]:
    tmp = tmp_path_factory.mktemp("export")
    bundle, model, _ = make_bundle(tmp)
    res = E.export(str(bundle), tmp / "handoff", workspace=tmp / "ws")
    return tmp / "handoff", res, model


def test_handoff_folder_contents(exported) -> None:
    out, res, _ = exported
    names = {p.name for p in out.iterdir()}
    assert names == {
        "weights.safetensors",
        "model.onnx",
        "preprocessing.json",
        "evaluation.json",
        "model_card.md",
        "model_card.json",
        "README.md",
        "report.html",
        "SHA256SUMS",
    }
    assert res.program["format"] == "onnx" and res.program["max_abs_diff"] < E.ONNX_ATOL
    assert "random input" in res.program["verified_on"]  # no workspace data in this test
    readme = (out / "README.md").read_text()
    assert "Predictor.from_dir" in readme and "sha256sum -c SHA256SUMS" in readme
    assert json.dumps(res.summary())


def test_report_is_in_the_handoff_and_its_sums(exported) -> None:
    """From a bundle folder alone (no store): the page renders, says what it lacks, and SHA256SUMS lists it."""
    out, res, _ = exported
    assert "report.html" in res.files and "report.html" in (out / E.SUMS).read_text()
    page = parse(out / "report.html")
    assert page.ids == list(R.SECTIONS)
    assert len(check_self_contained(page)) >= 1  # confusion matrix from evaluation.json
    text = " ".join(page.text)
    assert "not available" in text and "Limitations" in text
    assert "report.html" in (out / "README.md").read_text()
    for phi in PHI:
        assert phi not in (out / "report.html").read_text()


def test_onnx_matches_eager_in_onnxruntime(exported) -> None:
    import onnxruntime as ort

    out, _, model = exported
    x = torch.rand(4, 1, 32, 32)  # a batch size the export never saw: the batch axis is dynamic
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=E.ONNX_ATOL, rtol=E.ONNX_RTOL)


def test_sha256sums_verify_and_catch_tampering(exported, tmp_path: Path) -> None:
    import shutil

    out, res, _ = exported
    assert E.verify_sums(out) == []
    lines = (out / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == 8 and all(len(line.split("  ")[0]) == 64 for line in lines)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model_card.md").write_text("edited")
    assert E.verify_sums(copy) == ["model_card.md"]


def test_card_in_handoff_has_sections_and_no_phi(exported) -> None:
    out, _, _ = exported
    md = (out / "model_card.md").read_text()
    for section in (
        "## Intended use",
        "## Out-of-scope use",
        "## Data and de-identification",
        "## Split",
        "## Series selection and preprocessing",
        "## Performance (test split)",
        "## Calibration and threshold",
        "## Limitations",
        "### TRIPOD+AI (2024)",
        "### CLAIM (2020)",
    ):
        assert section in md
    for f in out.iterdir():
        blob = f.read_bytes().lower()
        for needle in PHI + ["doe_jane"]:
            assert needle.lower().encode() not in blob, (f.name, needle)


def test_reexport_replaces_only_an_earlier_export(exported, tmp_path: Path) -> None:
    import shutil

    out, res, _ = exported
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    (earlier / "model.onnx").write_bytes(b"stale")
    again = E.export(str(out), earlier, workspace=tmp_path)  # an export folder is a bundle too
    assert again.files["model_card.md"] == res.files["model_card.md"] and E.verify_sums(earlier) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(E.MedxferError, match="holds other files"):
        E.export(str(out), foreign, workspace=tmp_path)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unexportable_network_falls_back_to_torchscript(tmp_path: Path) -> None:
    class FFTNet(torch.nn.Module):  # rfft has no ONNX export in the TorchScript-based exporter
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(x.flatten(1)).abs()[:, :2]

    x = torch.rand(1, 1, 8, 8)
    ok, _, reason = E.export_onnx(FFTNet().eval(), x, tmp_path / "m.onnx")
    assert not ok and "ONNX export failed" in reason and not (tmp_path / "m.onnx").exists()
    ok, diff = E.export_torchscript(FFTNet().eval(), x, tmp_path / "m.pt")
    assert ok and diff == 0.0


def test_3d_encoder_exports(tmp_path: Path) -> None:
    bundle, model, _ = make_bundle(tmp_path, encoder="efficientnet_lite0_i3d", dims=3, size=[16, 16, 16])
    res = E.export(str(bundle), tmp_path / "h3d", workspace=tmp_path)
    assert res.program["format"] == "onnx" and res.program["max_abs_diff"] < E.ONNX_ATOL


def test_mirrored_bundle_exports_the_mirrored_program(tmp_path: Path) -> None:
    """The program is what evaluate scored and the threshold was fitted on: with the mirrored view averaged in."""
    import onnxruntime as ort

    bundle, model, _ = make_bundle(tmp_path, tta=True)
    res = E.export(str(bundle), tmp_path / "h", workspace=tmp_path / "ws")
    assert res.program["format"] == "onnx" and res.program["tta_flip_dims"] == [[3]]
    assert "mirror image" in (tmp_path / "h" / "README.md").read_text()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ref = ((model(x) + model(torch.flip(x, [3]))) / 2).numpy()
    got = ort.InferenceSession(str(tmp_path / "h" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, ref, atol=E.ONNX_ATOL, rtol=E.ONNX_RTOL)


def test_unknown_uri_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(E.MedxferError, match="expected models:/NAME@alias"):
        E.export("s3://nope", tmp_path / "x", workspace=tmp_path)


@pytest.mark.slow
def test_export_of_a_trained_run_verifies_on_a_real_study(evaluated_run, tmp_path: Path) -> None:
    from medxfer.io.phi import scan_for_phi

    res = E.export(f"runs:/{evaluated_run.run_id}", tmp_path / "handoff", workspace=evaluated_run.workspace)
    assert res.run_id == evaluated_run.run_id
    assert res.program["format"] == "onnx" and res.program["verified_on"] == "a preprocessed test-split study"
    assert res.program["max_abs_diff"] < E.ONNX_ATOL
    assert E.verify_sums(tmp_path / "handoff") == []
    card = json.loads((tmp_path / "handoff" / "model_card.json").read_text())
    assert card["transfer"]["control_kind"] == "scratch"
    assert card["split"]["counts"]["test"] == {"neg": 4, "pos": 4}
    assert scan_for_phi(tmp_path / "handoff", evaluated_run.dataset.phi) == []
    # The report carries every figure: the curves come from the run's store, not the bundle.
    assert len(check_self_contained(parse(tmp_path / "handoff" / "report.html"))) == len(R.FIGURES)
    # The hand-off predicts on DICOM studies without MLflow, with the evaluated temperature and threshold.
    from medxfer.handoff.bundle import Predictor

    p = Predictor.from_dir(tmp_path / "handoff")
    ev = evaluated_run.result.evaluation
    assert p.temperature == ev["temperature"] and p.threshold == ev["threshold"]
    studies = sorted(evaluated_run.dataset.root.glob("PAT*/ST*"))[:4]
    df = p.predict([*studies, evaluated_run.dataset.root / "no-such-study"])
    assert len(df) == 5 and df["error"][:4].isna().all() and df["error"][4].startswith("not_found")
    assert set(df["decision"][:4]) <= {"neg", "pos"} and df["decision"].isna()[4]
    np.testing.assert_allclose((df["prob_neg"] + df["prob_pos"])[:4], 1.0, rtol=1e-6)


@pytest.mark.slow
def test_export_of_a_registered_model(evaluated_run, tmp_path: Path) -> None:
    from medxfer.handoff.registry import register

    # A one-epoch toy run trips the registration guard (tested in test_registry.py); force the alias exported here.
    reg = register(evaluated_run.run_id, "tiny-export", evaluated_run.workspace, force=True).summary()
    res = E.export("models:/tiny-export@candidate", tmp_path / "handoff", workspace=evaluated_run.workspace)
    assert (res.model_name, res.model_version) == ("tiny-export", str(reg["model_version"]))
    assert res.run_id == evaluated_run.run_id and E.verify_sums(tmp_path / "handoff") == []
    card = json.loads((tmp_path / "handoff" / "model_card.json").read_text())
    assert card["model"]["name"] == "tiny-export" and card["model"]["version"] == str(reg["model_version"])
    assert "tiny-export v" in (tmp_path / "handoff" / "README.md").read_text()


@pytest.mark.slow
def test_unevaluated_run_is_refused(evaluated_run, tmp_path: Path) -> None:
    from medxfer.core.errors import StageError

    with pytest.raises(StageError, match="evaluate"):
        E.export(f"runs:/{evaluated_run.control_run_id}", tmp_path / "x", workspace=evaluated_run.workspace)

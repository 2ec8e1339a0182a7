"""The model bundle: written from a checkpoint of a real encoder, reloaded without pickle, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evalfixtures import PHI, checkpoint_dict, outputs
from medxfer.evaluation.evaluate import compute_evaluation
from medxfer.handoff import bundle as B
from medxfer.models.factory import create_classifier


def make_bundle(
    tmp_path: Path, encoder: str = "efficientnet_lite0", dims: int = 2, size: list[int] | None = None, tta: bool = False
) -> tuple[Path, torch.nn.Module, dict]:
    ckpt = checkpoint_dict()
    ckpt["recipe"]["evaluation"]["tta"] = tta
    size = size or [32] * dims
    torch.manual_seed(0)
    model = create_classifier(encoder, 2, 1, dims, weights=None).eval()
    ckpt["model"] = model.state_dict()
    ckpt["model_args"] = {"name": encoder, "num_classes": 2, "in_chans": 1, "spatial_dims": dims}
    ckpt["spec"]["dims"] = dims
    ckpt["spec"]["preprocess"]["size"] = size
    ckpt["recipe"]["encoder"] = encoder
    ckpt["recipe"]["data"]["size"] = size
    ev = compute_evaluation(
        outputs(60, 1), outputs(80, 2), ["benign", "malignant"], "malignant", "binary", n_bootstrap=50
    ).evaluation
    ev["run_id"] = ckpt["run_id"]
    return B.write_bundle(ckpt, ev, tmp_path / "bundle"), model, ev


def test_round_trip_reproduces_eager_logits(tmp_path: Path) -> None:
    out, model, ev = make_bundle(tmp_path)
    assert {p.name for p in out.iterdir()} == {B.WEIGHTS, B.PREPROCESSING, B.EVALUATION, B.CARD_MD, B.CARD_JSON}
    p = B.Predictor.from_dir(out)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_array_equal(p.logits(x), ref)
    # Calibrated probabilities and the binary decision follow preprocessing.json.
    prob = p.probabilities(ref)
    z = ref / ev["temperature"]
    np.testing.assert_allclose(prob, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-6)
    assert p.threshold == ev["threshold"] and p.temperature == ev["temperature"]
    t = p.threshold
    at, below = np.array([[1 - t, t]]), np.array([[1 - t + 1e-6, t - 1e-6]])
    assert p.decide(at) == ["malignant"] and p.decide(below) == ["benign"]


def test_mirrored_bundle_predicts_the_mean_over_the_flip(tmp_path: Path) -> None:
    out, model, _ = make_bundle(tmp_path, tta=True)
    p = B.Predictor.from_dir(out)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        plain, flipped = model(x).numpy(), model(torch.flip(x, [3])).numpy()
    assert not np.allclose(plain, flipped)  # else the test below shows nothing
    np.testing.assert_allclose(p.logits(x), (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
    # The mirroring wraps the raw network, which stays what saliency and the safetensors use.
    assert p.inference_model.model is p.model and not hasattr(p.model, "views")


def test_preprocessing_json_is_complete_and_path_free(tmp_path: Path) -> None:
    out, _, _ = make_bundle(tmp_path)
    cfg = json.loads((out / B.PREPROCESSING).read_text())
    assert cfg["model"] == {"encoder": "efficientnet_lite0", "num_classes": 2, "in_chans": 1, "spatial_dims": 2}
    assert cfg["weights"]["sha256"] == B.sha256_file(out / B.WEIGHTS)
    assert cfg["classes"] == ["benign", "malignant"] and cfg["positive_index"] == 1
    assert cfg["input"]["shape"] == [1, 32, 32]
    assert cfg["spec"]["series"]["modality"] == ["US"] and cfg["recipe"]["data"]["size"] == [32, 32]
    assert "split" not in cfg["spec"]
    assert cfg["recipe"]["weights"] == "default"
    for f in out.iterdir():
        if f.suffix in (".json", ".md"):
            text = f.read_text().lower()
            for needle in PHI + ["doe_jane", "/home/"]:
                assert needle.lower() not in text, (f.name, needle)
    # The stored spec and recipe still validate (the Predictor rebuilds them for preprocessing).
    p = B.Predictor.from_dir(out)
    assert p.spec.dims == 2 and p.recipe.data.size == [32, 32]


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    out, _, _ = make_bundle(tmp_path)
    blob = bytearray((out / B.WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (out / B.WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(B.BundleError, match="SHA-256"):
        B.Predictor.from_dir(out)


def test_weights_are_safetensors_not_pickle(tmp_path: Path) -> None:
    out, model, _ = make_bundle(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(out / B.WEIGHTS))
    assert set(state) == set(model.state_dict())
    assert not (out / B.WEIGHTS).read_bytes().startswith(b"PK")  # not a torch.save zip


def test_find_bundle_inside_a_model_folder(tmp_path: Path) -> None:
    out, _, _ = make_bundle(tmp_path)
    nested = tmp_path / "model" / "artifacts"
    nested.mkdir(parents=True)
    out.rename(nested / "bundle")
    assert B.find_bundle(tmp_path / "model") == nested / "bundle"
    assert B.find_bundle(tmp_path / "nothing-here") is None


def test_same_weights_give_the_same_file_sha256_in_every_process(tmp_path: Path) -> None:
    # safetensors' own header order (a Rust HashMap) changes per process: the registered weights_sha256 of
    # bit-identical weights differed between two demo runs before the header was canonicalised.
    import subprocess
    import sys

    code = (
        "import sys, torch; from pathlib import Path; from medxfer.handoff.bundle import save_safetensors; "
        "save_safetensors({'w': torch.arange(6.0).view(2, 3), 'b': torch.ones(2)}, Path(sys.argv[1]), "
        "{'format': 'pt', 'encoder': 'efficientnet_lite0', 'medxfer': 'medxfer-bundle/1'})"
    )
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=120)
    assert len({B.sha256_file(p) for p in paths}) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(paths[0])["w"], torch.arange(6.0).view(2, 3))

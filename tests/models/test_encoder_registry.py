"""The registry: every encoder builds, runs, partitions its parameters, explains itself, and exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from medxfer.core.errors import MedxferError
from medxfer.models.catalog import models_command
from medxfer.models.factory import create_classifier
from medxfer.models.registry import DEFAULT_ENCODERS, get_entry, list_encoders

ENCODERS = list_encoders()


def input_for(model, batch: int = 2) -> torch.Tensor:
    side = 64 if model.spatial_dims == 2 else 28  # small, but large enough for 32x-downsampling 2D nets
    return torch.rand(batch, 1, *([side] * model.spatial_dims))


def offline_weights(name: str) -> str | None:
    """Real weights where this machine has them (a package), random init where only the hub has them."""
    return "default" if any(w.kind == "package" and w.path() for w in get_entry(name).weights) else None


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_runs_and_partitions_its_parameters(name):
    torch.manual_seed(0)
    model = create_classifier(name, 3, in_chans=1, weights=offline_weights(name)).eval()
    assert model.encoder_name == name and model.spatial_dims == get_entry(name).spatial_dims
    x = input_for(model)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert feats.shape == (2, model.feature_dim) and torch.isfinite(feats).all()
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == model.feature_dim

    groups = model.layer_groups
    assert groups[0].name == "stem" and groups[-1].name == "head" and len(groups) >= 3
    seen = [id(p) for g in groups for p in g.parameters()]
    assert len(seen) == len(set(seen)), "a parameter is in two layer groups"
    assert set(seen) == {id(p) for p in model.parameters()}, "a parameter is in no layer group"

    # Grad-CAM target: a module inside the model whose output is a spatial feature map
    captured = []
    target = model.get_submodule(model.cam_target_layer)
    handle = target.register_forward_hook(lambda _m, _i, o: captured.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert captured[0].ndim == 2 + model.spatial_dims and captured[0].shape[1] == model.feature_dim


def test_defaults_exist_in_their_dims_and_load_offline():
    for dims, name in DEFAULT_ENCODERS.items():
        assert get_entry(name).spatial_dims == dims
        assert create_classifier(name, 2, spatial_dims=dims).weight_report.source == "package"


def test_registry_imports_no_encoder_and_the_package_registers_them():
    """timm's layout: registry.py is the table only; `medxfer.models` imports the encoder modules."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import medxfer.models.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {m for m in imported if m and m.startswith("medxfer.models")}, imported
    # A fresh process that imports only the registry module still sees every encoder (the parent package ran).
    code = "import medxfer.models.registry as r; print(len(r.list_encoders()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) == len(ENCODERS) >= 16


def test_unknown_name_and_wrong_dims_say_what_to_do():
    with pytest.raises(MedxferError, match="Did you mean .*efficientnet_lite0"):
        create_classifier("efficientnet_lite", 2)
    with pytest.raises(MedxferError, match=r"'medicalnet_resnet18' is 3D but the data is 2D; choose a 2D encoder"):
        create_classifier("medicalnet_resnet18", 2, spatial_dims=2, weights=None)


def test_init_head_bias_sets_log_priors():
    model = create_classifier("efficientnet_lite0", 3, weights=None)
    model.init_head_bias([10, 30, 60])
    torch.testing.assert_close(model.head.bias.softmax(0), torch.tensor([0.1, 0.3, 0.6]))
    with pytest.raises(ValueError):
        model.init_head_bias([1, 2])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite0_i3d", "medicalnet_resnet10"])
def test_grad_cam_through_monai(name):
    from monai.visualize import GradCAM

    model = create_classifier(name, 2, weights=offline_weights(name)).eval()
    x = input_for(model, batch=1) if model.spatial_dims == 3 else torch.rand(1, 1, 96, 96)
    cam = GradCAM(nn_module=model, target_layers=model.cam_target_layer)(x, class_idx=1)
    assert cam.shape == (1, 1, *x.shape[2:]) and torch.isfinite(cam).all()


def onnx_roundtrip(module: torch.nn.Module, x: torch.Tensor, path) -> tuple[np.ndarray, np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        want = module(x).numpy()
    # dynamo=False: the TorchScript-based exporter, which needs no onnxscript
    torch.onnx.export(
        module,
        (x,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0], want


def test_our_layers_export_to_onnx_and_trace(tmp_path):
    """Every layer models/ adds to timm/MONAI (norms, I3D, ACS, shortcut A) in one small stack."""
    from medxfer.models.base import ForegroundZScore, MeanStdNorm
    from medxfer.models.encoders_3d import ACSConv3d, BatchNormAct3d, InflatedConv3d, ShortcutA

    torch.manual_seed(0)
    bn = BatchNormAct3d(6, act_layer=torch.nn.ReLU6)
    bn.running_mean.uniform_(-0.1, 0.1)
    stack = torch.nn.Sequential(
        ForegroundZScore(),
        MeanStdNorm([0.5], [0.25], 3),
        InflatedConv3d(torch.nn.Conv2d(1, 6, 3, stride=2, padding=1)),
        bn,
        ACSConv3d(torch.nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False)),  # depthwise, whole groups split
        ACSConv3d(torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)),
        ShortcutA(16, 2),
    ).eval()
    x = torch.rand(2, 1, 16, 16, 16) * (torch.rand(2, 1, 16, 16, 16) > 0.2)
    got, want = onnx_roundtrip(stack, x, tmp_path / "stack.onnx")
    assert want.shape == (2, 16, 2, 2, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.trace(stack, x)(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_default_3d_model_traces():
    model = create_classifier(DEFAULT_ENCODERS[3], 2).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), want, rtol=1e-4, atol=1e-5)


def test_models_command_lists_2d_and_3d_with_real_sources():
    result = models_command()
    summary = json.loads(json.dumps(result.summary()))
    by_name = {e["name"]: e for e in summary["encoders"]}
    assert set(by_name) == set(ENCODERS)
    assert {e["spatial_dims"] for e in summary["encoders"]} == {2, 3}
    lite = by_name["efficientnet_lite0"]
    package = next(w for w in lite["weights"] if w["kind"] == "package")
    assert package["available"] and package["offline"] and lite["default"]
    assert [g["name"] for g in lite["layer_groups"]] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert lite["parameters"] == sum(
        p.numel() for p in create_classifier("efficientnet_lite0", 2, weights=None).encoder.parameters()
    )
    mednet = by_name["medicalnet_resnet50"]
    assert any(
        w["kind"] == "hub" and "TencentMedicalNet/MedicalNet-Resnet50" in w["location"] for w in mednet["weights"]
    )
    assert "I3D" in summary["transfer_2d_to_3d"]
    title, rows = result.table()
    assert "weights: file > package > hub" in title
    assert any(k.startswith("efficientnet_lite0_i3d") for k, _ in rows)


def test_cli_models_json(monkeypatch):
    from medxfer.cli import app
    from typer.testing import CliRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["online"] is False
    assert data["defaults"] == {"2d": DEFAULT_ENCODERS[2], "3d": DEFAULT_ENCODERS[3]}

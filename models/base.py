"""What every encoder is: input normalisation, a backbone, pooled features, ordered layer groups.

An encoder takes intensity scaled to about [0, 1] and normalises it itself (buffers,
so a checkpoint carries the statistics its weights were trained with), then returns
pooled features (B, feature_dim). Layer groups are declared as ordered regular
expressions over parameter names and turned into the largest modules that hold
only that group's parameters, so progressive unfreezing can freeze modules whole.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from medxfer.core.errors import MedxferError
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """The input statistics a set of weights expects, for input already scaled to [0, 1].

    kind "meanstd": (x - mean) / std per channel, with the RGB statistics of the
    weights; a different channel count uses the mean of the RGB statistics (the
    stem's RGB kernels are summed for one channel, so one grey channel plays the
    role of R, G and B at once).
    kind "foreground_zscore": per-sample z-score over voxels > 0, as MedicalNet
    normalised its training volumes.
    """

    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    label: str = ""

    def for_channels(self, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if len(self.mean) == in_chans:
            return self.mean, self.std
        m = sum(self.mean) / len(self.mean)
        s = sum(self.std) / len(self.std)
        return (m,) * in_chans, (s,) * in_chans

    def describe(self) -> str:
        if self.kind == "foreground_zscore":
            return f"{self.label}: per-volume z-score over voxels > 0"
        mean = ", ".join(f"{v:.3f}" for v in self.mean)
        std = ", ".join(f"{v:.3f}" for v in self.std)
        return f"{self.label}: mean ({mean}), std ({std})"

    def module(self, in_chans: int, spatial_dims: int) -> nn.Module:
        if self.kind == "meanstd":
            mean, std = self.for_channels(in_chans)
            return MeanStdNorm(mean, std, spatial_dims)
        if self.kind == "foreground_zscore":
            return ForegroundZScore()
        raise ValueError(f"unknown normalisation kind {self.kind!r}")


IMAGENET = Normalization("meanstd", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "ImageNet")
# TF EfficientNet-Lite trained on (pixel - 127) / 128 with pixels in 0..255.
TF_LITE = Normalization("meanstd", (127 / 255,) * 3, (128 / 255,) * 3, "TF-Lite (x*255-127)/128")
MEDICALNET = Normalization("foreground_zscore", label="MedicalNet")


class MeanStdNorm(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float], spatial_dims: int) -> None:
        super().__init__()
        shape = (1, len(mean)) + (1,) * spatial_dims
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ForegroundZScore(nn.Module):
    """MedicalNet's normalisation without its random background.

    MedicalNet z-scored each volume over voxels > 0 and filled the background with
    N(0, 1) noise; we put the noise's mean (0) there so inference is deterministic.
    A volume whose foreground is (nearly) constant, e.g. a binary mask as in
    AdrenalMNIST3D, would become all zeros that way, so it is z-scored over all voxels
    instead. Written with masks, sums and where only, so it traces and exports to ONNX.
    """

    min_std = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        fg = (x > 0).to(x.dtype)
        n = fg.sum(dim=dims, keepdim=True).clamp_min(1.0)
        mean = (x * fg).sum(dim=dims, keepdim=True) / n
        std = torch.sqrt((((x - mean) * fg) ** 2).sum(dim=dims, keepdim=True) / n)
        foreground = (x - mean) / std.clamp_min(self.min_std) * fg
        g_mean = x.mean(dim=dims, keepdim=True)
        g_std = x.std(dim=dims, keepdim=True, unbiased=False)
        whole = (x - g_mean) / g_std.clamp_min(self.min_std)
        return torch.where(std > self.min_std, foreground, whole)


@dataclass
class LayerGroup:
    """A named set of modules trained together; groups are ordered stem -> stages -> head."""

    name: str
    modules: list[nn.Module] = field(default_factory=list)

    def parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _DirectParams(nn.Module):
    """Holds references to a module's own parameters when its children belong to other groups.

    It is never attached to the model, so the model's state dict is unchanged; freezing
    through it flips requires_grad on the very same Parameter objects.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


def group_by_rules(root: nn.Module, rules: Sequence[tuple[str, str]]) -> list[LayerGroup]:
    """Assign every parameter to the first rule whose regex matches its name; return module groups.

    Raises if a parameter matches no rule, so a new architecture cannot silently leave
    weights out of progressive unfreezing.
    """
    compiled = [(name, re.compile(rx)) for name, rx in rules]
    owner: dict[str, int] = {}
    for pname, _ in root.named_parameters():
        for i, (_, rx) in enumerate(compiled):
            if rx.search(pname):
                owner[pname] = i
                break
        else:
            raise ValueError(f"parameter {pname!r} matches no layer-group rule")
    return modules_for_groups(root, owner, [name for name, _ in rules])


def modules_for_groups(root: nn.Module, owner: Mapping[str, int], names: Sequence[str]) -> list[LayerGroup]:
    found: dict[int, list[nn.Module]] = defaultdict(list)

    def visit(prefix: str, mod: nn.Module) -> None:
        pnames = [prefix + n for n, _ in mod.named_parameters()]
        if not pnames:
            return
        groups = {owner[n] for n in pnames}
        if len(groups) == 1:
            found[groups.pop()].append(mod)
            return
        direct = dict(mod.named_parameters(recurse=False))
        by_group: dict[int, dict[str, nn.Parameter]] = defaultdict(dict)
        for n, p in direct.items():
            by_group[owner[prefix + n]][n] = p
        for g, params in by_group.items():
            found[g].append(_DirectParams(params))
        for cname, child in mod.named_children():
            visit(f"{prefix}{cname}.", child)

    visit("", root)
    return [LayerGroup(names[i], found[i]) for i in range(len(names)) if found.get(i)]


class Encoder(nn.Module):
    """Base class: `norm` (input normalisation) then `net` (backbone) then global average pooling.

    Subclasses set `net`, `feature_dim`, `spatial_dims`, `group_rules` (regexes over
    `net` parameter names, in order) and `cam_target` (dotted module name inside the
    encoder whose output is the last spatial feature map).
    """

    spatial_dims: int = 2
    feature_dim: int = 0
    cam_target: str = "net"
    group_rules: Sequence[tuple[str, str]] = ()

    def __init__(self, normalization: Normalization, in_chans: int, spatial_dims: int) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.spatial_dims = spatial_dims
        self.normalization = normalization
        self.norm = normalization.module(in_chans, spatial_dims)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> last spatial feature map (B, feature_dim, *spatial)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_map(self.norm(x))
        # flatten + mean rather than adaptive pooling: one code path for 2D and 3D that
        # traces, scripts and exports to ONNX with any input size.
        return fmap.flatten(2).mean(-1)

    def layer_groups(self) -> list[LayerGroup]:
        return group_by_rules(self.net, self.group_rules)

    # --- weight loading hooks -------------------------------------------------------------
    def convert_state_dict(self, state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """Source layout -> this encoder's `net` key names (head keys kept, split off later)."""
        if layout != "native":
            raise MedxferError(
                f"this weights file is in the {layout} layout, which encoder {self.registry_name!r} cannot read"
            )
        return state

    def head_keys(self) -> tuple[str, ...]:
        """Prefixes of the source model's classifier, dropped from the backbone load."""
        return ()

    def prepare_backbone_state(self, state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
        """Last changes before a strict load: adapt the stem's input channels, 2D -> 3D, ..."""
        return state

    registry_name: str = ""


def adapt_stem_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv kernel (O, I, *k) to in_chans input channels, as timm's adapt_input_conv.

    One channel: sum the kernels over input channels, so a grey image x gives exactly the
    response the RGB weights give to (x, x, x). Other counts: repeat and rescale so the
    expected activation magnitude stays the same. Works for 2D and 3D kernels.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // src)
        w = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_chans] * (src / in_chans)
    return w.to(dtype)

"""Classifier = encoder (normalisation + backbone + pooling) -> dropout -> linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from medxfer.models.base import Encoder, LayerGroup
from medxfer.models.heads import init_head_bias, make_head
from medxfer.models.weights import WeightReport
from torch import nn


class Classifier(nn.Module):
    """What every stage gets from `create_classifier`.

    Input: intensity scaled to about [0, 1], (B, C, H, W) or (B, C, D, H, W); the
    encoder normalises it. forward -> logits (B, num_classes); forward_features ->
    pooled features (B, feature_dim). `cam_target_layer` names the module whose output
    is the last spatial feature map, for monai.visualize.GradCAM(target_layers=...).
    """

    def __init__(self, encoder: Encoder, num_classes: int, encoder_name: str, drop_rate: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.encoder = encoder
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = make_head(encoder.feature_dim, num_classes)
        self.encoder_name = encoder_name
        self.spatial_dims = encoder.spatial_dims
        self.in_chans = encoder.in_chans
        self.num_classes = num_classes
        self.feature_dim = encoder.feature_dim
        self.weight_report = WeightReport(source="none", num_classes=num_classes)

    @property
    def cam_target_layer(self) -> str:
        return f"encoder.{self.encoder.cam_target}"

    @property
    def layer_groups(self) -> list[LayerGroup]:
        return [*self.encoder.layer_groups(), LayerGroup("head", [self.head])]

    @property
    def normalization(self) -> str:
        return self.encoder.normalization.describe()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): the pooled encoder output the head reads (OOD scores use it)."""
        return self.encoder(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) from one pass; the logits are exactly forward's."""
        f = self.encoder(x)
        return self.head(self.dropout(f)), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))

    def init_head_bias(self, priors: Sequence[float] | torch.Tensor) -> None:
        """Set the head bias to the log class priors (counts or probabilities)."""
        init_head_bias(self.head, priors)


class MirrorAverage(nn.Module):
    """Test-time mirroring (nnU-Net's default at inference): the mean of the logits over the input and its flips.

    ``views``: one tuple of batch-tensor dims per extra view, e.g. ``[(3,)]`` for a 2D horizontal
    flip. Averaging logits is averaging log-probabilities, so the softmax of the output is the
    normalised geometric mean of the views' probabilities; temperature scaling applies to it as
    to a single view's logits. The wrapped model's state dict is unchanged (``.model``).
    """

    def __init__(self, model: nn.Module, views: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if not views:
            raise ValueError("MirrorAverage needs at least one flipped view")
        self.model = model
        self.views = [tuple(int(d) for d in v) for v in views]
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        for dims in self.views:
            out = out + self.model(torch.flip(x, dims))
        return out / (1 + len(self.views))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits as forward, features averaged over the same views): what predict scores for OOD is what the
        logits were computed from. Summed in forward's order, so the logits are bitwise forward's."""
        if not hasattr(self.model, "forward_with_features"):
            return self(x), None
        out, feat = self.model.forward_with_features(x)
        for dims in self.views:
            o, f = self.model.forward_with_features(torch.flip(x, dims))
            out, feat = out + o, feat + f
        n = 1 + len(self.views)
        return out / n, feat / n

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.forward_with_features(x)[1]


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, penultimate features or None for a model without them, e.g. a test's tiny net)."""
    if hasattr(model, "forward_with_features"):
        return model.forward_with_features(x)
    return model(x), None

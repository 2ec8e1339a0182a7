"""Small models with the models/ contract (encoder, head, layer_groups, init_head_bias) for training unit tests."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LayerGroup(NamedTuple):
    name: str
    modules: list[nn.Module]


class GradProbe(nn.Module):
    """Records whether autograd was recording when the encoder's body ran."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        return x


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 2, in_chans: int = 1, width: int = 8):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.encoder = nn.Sequential()
        self.encoder.add_module("stem", block(in_chans, width))
        self.encoder.add_module("block1", block(width, width))
        self.encoder.add_module("block2", block(width, 2 * width))
        self.encoder.add_module("probe", GradProbe())
        self.encoder.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.encoder.add_module("flat", nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)
        self.feature_dim = 2 * width
        self.layer_groups = [
            LayerGroup("stem", [self.encoder.stem]),
            LayerGroup("block1", [self.encoder.block1]),
            LayerGroup("block2", [self.encoder.block2]),
            LayerGroup("head", [self.head]),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def init_head_bias(self, priors: list[float]) -> None:
        with torch.no_grad():
            self.head.bias.copy_(torch.log(torch.tensor(priors)))

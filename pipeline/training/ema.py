"""An exponential moving average of the model's weights, validated and shipped instead of the raw weights.

With a few hundred training studies the raw weights move a lot from one step to the next, and a
validation set of ~80 studies picks among them almost at random. The average of the last few hundred
steps is smoother, and its validation score says more about its test score. Floating-point
parameters and buffers (BatchNorm statistics included) are averaged; integer buffers are copied.

The decay warms up as ``min(decay, (1 + t) / (10 + t))`` so that the first steps, when the average
still holds the pretrained weights, do not dominate it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        mine, theirs = self.module.state_dict(), model.state_dict()
        avg_dst, avg_src = [], []
        for k, v in mine.items():
            src = theirs[k].detach()
            if v.is_floating_point():
                avg_dst.append(v)
                avg_src.append(src.to(v.dtype))
            else:
                v.copy_(src)
        if avg_dst:
            torch._foreach_lerp_(avg_dst, avg_src, 1.0 - d)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        self.module.load_state_dict(weights)

"""The classification head: a linear layer on pooled encoder features, with prior-aware bias init."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def make_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """A fresh linear head; small weights so the first steps do not swamp pretrained features."""
    head = nn.Linear(feature_dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def log_prior_bias(priors: Sequence[float] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Log class priors from counts or probabilities.

    With this bias an untrained head predicts the class frequencies, so an imbalanced
    set does not start with a large, misleading loss (Lin et al., focal loss, sec. 4.1).
    """
    p = torch.as_tensor(priors, dtype=torch.float64).flatten()
    if p.numel() != num_classes:
        raise ValueError(f"{p.numel()} priors given for a {num_classes}-class head")
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("class priors must be non-negative counts or probabilities with a positive sum")
    p = (p / p.sum()).clamp_min(1e-6)
    return torch.log(p / p.sum()).float()


def init_head_bias(head: nn.Linear, priors: Sequence[float] | torch.Tensor) -> None:
    with torch.no_grad():
        head.bias.copy_(log_prior_bias(priors, head.out_features).to(head.bias))


def head_matches(head: nn.Linear, state: dict[str, torch.Tensor]) -> bool:
    w, b = state.get("weight"), state.get("bias")
    return (
        w is not None
        and b is not None
        and w.ndim == 2
        and tuple(w.shape) == tuple(head.weight.shape)
        and tuple(b.shape) == tuple(head.bias.shape)
    )

"""The fold ensemble: K classifiers, one per cross-validation fold, used as one model.

``FoldEnsemble(members)`` returns the mean of the members' logits. Logits, not probabilities: averaging logits
is averaging log-probabilities (the normalised geometric mean of the members' probabilities), so temperature
scaling and the bias fitted on out-of-fold logits apply to the output exactly as to one model's logits, and the
exported ONNX graph stays a plain network (one add per member, one divide). Test-time mirroring
(:class:`medxfer.models.classifier.MirrorAverage`) wraps the ensemble like any classifier.

State-dict keys are ``members.{i}.<the single classifier's key>``, so a bundle's safetensors file holds K copies of
the single model's keys under their prefix and ``load_state_dict(strict=True)`` catches a missing member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class FoldEnsemble(nn.Module):
    """forward -> mean of the members' logits (B, num_classes); features -> mean of their pooled features."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("FoldEnsemble needs at least one member")
        self.members = nn.ModuleList(members)
        first = members[0]
        for name in ("num_classes", "spatial_dims", "in_chans", "feature_dim", "encoder_name"):
            values = {getattr(m, name, None) for m in members}
            if len(values) > 1:
                raise ValueError(f"FoldEnsemble members differ in {name}: {sorted(map(str, values))}")
        self.num_classes = getattr(first, "num_classes", None)
        self.spatial_dims = getattr(first, "spatial_dims", None)
        self.in_chans = getattr(first, "in_chans", None)
        self.feature_dim = getattr(first, "feature_dim", None)
        self.encoder_name = getattr(first, "encoder_name", None)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def cam_target_layers(self) -> list[str]:
        """Each member's last spatial feature map, named from the ensemble."""
        return [f"members.{i}.{m.cam_target_layer}" for i, m in enumerate(self.members)]

    @property
    def cam_target_layer(self) -> str:
        # One name for callers that take one: member 0's, so a CAM on it shows member 0 only. predict's saliency
        # runs GradCAM on each member (its own cam_target_layer) and averages the maps.
        return self.cam_target_layers[0]

    @property
    def normalization(self) -> str:
        return getattr(self.members[0], "normalization", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Summed in member order, then divided: the same arithmetic in eager, TorchScript and ONNX.
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits exactly as forward, mean of the members' pooled features; None when a member has none)."""
        if not all(hasattr(m, "forward_with_features") for m in self.members):
            return self(x), None
        out, feat = self.members[0].forward_with_features(x)
        for m in self.members[1:]:
            o, f = m.forward_with_features(x)
            out, feat = out + o, feat + f
        n = len(self.members)
        return out / n, feat / n

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.forward_with_features(x)[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.features(x)


def one_or_ensemble(make: Callable[[], nn.Module], members: int | None) -> nn.Module:
    """``make()``, or a :class:`FoldEnsemble` of `members` fresh ``make()`` models when `members` is set (the one
    rule by which a checkpoint and a bundle rebuild their architecture)."""
    return FoldEnsemble([make() for _ in range(int(members))]) if members else make()

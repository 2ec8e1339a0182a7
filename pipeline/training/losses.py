"""Losses for small, imbalanced medical datasets: softmax focal loss and plain cross-entropy.

Models always emit one logit per class (binary included), so one softmax focal
loss covers both tasks; for two classes it equals the sigmoid focal loss on the
logit difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from medxfer.config.recipe import check_focal_alpha
from medxfer.config.spec import SpecError
from torch import nn


def class_alpha(counts: Sequence[int], alpha: str | Sequence[float] | None) -> list[float] | None:
    """Per-class weights: inverse training frequency (`"auto"`), the user's list, or None.

    "auto" weights are scaled so that their mean over the training samples is 1: the
    loss keeps the scale of an unweighted loss and the learning rate needs no retuning.
    """
    k = len(counts)
    # The rule is medxfer.config.recipe's; load_recipe runs it only when given the class count, and a recipe
    # rebuilt from a checkpoint is not re-checked, while a list one short would index past its end in the loss.
    check_focal_alpha(alpha, k)
    if alpha is None:
        return None
    if isinstance(alpha, str):  # "auto"
        if any(c <= 0 for c in counts):
            # About the data, not the recipe: the counts come from the split's training studies.
            empty = [i for i, c in enumerate(counts) if c <= 0]
            raise SpecError(
                f"focal.alpha auto: class index(es) {empty} have no training samples; "
                "check the split or give focal.alpha as a list"
            )
        n = float(sum(counts))
        return [n / (k * c) for c in counts]
    return [float(a) for a in alpha]


def log_priors(counts: Sequence[int]) -> torch.Tensor:
    """log(class frequency), the bias that makes an untrained head predict the training prior."""
    c = torch.tensor([max(int(x), 1) for x in counts], dtype=torch.float64)
    return torch.log(c / c.sum()).float()


def init_head_bias(model: nn.Module, counts: Sequence[int]) -> list[float]:
    """Set the classifier bias to the log class priors; returns the priors used."""
    priors = log_priors(counts).exp()
    if hasattr(model, "init_head_bias"):
        model.init_head_bias(priors.tolist())
    else:
        head = model.head
        with torch.no_grad():
            head.bias.copy_(torch.log(priors).to(head.bias))
    return priors.tolist()


class FocalLoss(nn.Module):
    """Softmax focal loss, -alpha_y (1 - p_y)^gamma log p_y, averaged over the batch.

    gamma=0 and alpha=None is exactly cross-entropy. The log-probabilities are
    computed in float32 even under autocast: (1 - p)^gamma underflows in fp16.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None):
        super().__init__()
        self.gamma = float(gamma)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32) if alpha is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target.long()[:, None]).squeeze(1)
        loss = -logp
        if self.gamma:
            loss = loss * (1.0 - logp.exp()).clamp(min=0).pow(self.gamma)
        if self.alpha is not None:
            loss = loss * self.alpha[target.long()]
        return loss

    def extra_repr(self) -> str:
        a = None if self.alpha is None else [round(v, 4) for v in self.alpha.tolist()]
        return f"gamma={self.gamma}, alpha={a}"


def build_loss(
    kind: str, gamma: float, alpha: str | Sequence[float] | None, counts: Sequence[int]
) -> tuple[FocalLoss, list[float] | None]:
    """The training loss and its effective class weights (logged to MLflow).

    "ce" is cross-entropy with the same class weighting rule, expressed as a focal
    loss with gamma=0 so both paths share one implementation.
    """
    if kind not in ("focal", "ce"):
        # Recipe.loss (a Literal) is the rule users meet; only code that bypasses the Recipe gets here.
        raise ValueError(f"loss {kind!r}: use focal or ce")
    weights = class_alpha(counts, alpha)
    # A guard on the data, not the recipe: "auto" weights are n / (k * c) from the training counts (a recipe's
    # own list is checked finite by recipe.py); a NaN weight would turn every loss, and then the weights, NaN.
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise SpecError("focal.alpha: class weights must be finite")
    return FocalLoss(gamma=0.0 if kind == "ce" else gamma, alpha=weights), weights

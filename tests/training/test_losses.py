"""Focal loss math, class weights from training frequencies, log-prior bias init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from medxfer.config.spec import SpecError
from medxfer.training.losses import FocalLoss, build_loss, class_alpha, init_head_bias, log_priors
from tinynets import TinyNet


def _batch(k: int = 3, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("k", [2, 4])
def test_gamma_zero_is_cross_entropy(k: int) -> None:
    logits, y = _batch(k)
    assert FocalLoss(gamma=0.0)(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_alpha_weights_each_sample_by_its_class() -> None:
    logits, y = _batch(3)
    alpha = [0.2, 1.0, 3.0]
    got = FocalLoss(gamma=0.0, alpha=alpha)(logits, y)
    per = F.cross_entropy(logits, y, reduction="none") * torch.tensor(alpha)[y]
    assert got.item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_focal_term_by_hand_and_down_weights_easy_examples() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])  # an easy and a hard example of class 0
    y = torch.tensor([0, 0])
    p = torch.softmax(logits, 1)[:, 0]
    per = FocalLoss(gamma=2.0).per_sample(logits, y)
    expected = -((1 - p) ** 2) * torch.log(p)
    assert torch.allclose(per, expected, rtol=1e-6)
    ce = F.cross_entropy(logits, y, reduction="none")
    ratio = per / ce
    assert ratio[0] < 0.001 and 0.2 < ratio[1] < 0.3  # easy example nearly ignored, hard one kept


def test_binary_softmax_focal_equals_sigmoid_focal_on_logit_difference() -> None:
    logits, y = _batch(2)
    z = logits[:, 1] - logits[:, 0]
    p = torch.sigmoid(z)
    pt = torch.where(y == 1, p, 1 - p)
    sigmoid_focal = (-((1 - pt) ** 2) * torch.log(pt)).mean()
    assert FocalLoss(gamma=2.0)(logits, y).item() == pytest.approx(sigmoid_focal.item(), rel=1e-5)


def test_focal_gradient_is_finite_under_fp16_logits() -> None:
    logits = (torch.tensor([[30.0, -30.0], [0.1, 0.0]]).half()).requires_grad_()
    loss = FocalLoss(gamma=2.0, alpha=[1.0, 2.0])(logits, torch.tensor([0, 1]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_auto_alpha_is_inverse_frequency_with_unit_mean_over_samples() -> None:
    counts = [90, 10]
    a = class_alpha(counts, "auto")
    assert a[1] / a[0] == pytest.approx(9.0)
    assert sum(w * c for w, c in zip(a, counts, strict=True)) / sum(counts) == pytest.approx(1.0)
    assert class_alpha(counts, [0.25, 0.75]) == [0.25, 0.75]
    assert class_alpha(counts, None) is None


def test_alpha_errors_say_how_to_fix() -> None:
    with pytest.raises(SpecError, match="one per class"):
        class_alpha([5, 5, 5], [0.5, 0.5])
    with pytest.raises(SpecError, match="no training samples"):
        class_alpha([5, 0], "auto")
    with pytest.raises(SpecError, match=">= 0"):  # the rule is medxfer.config.recipe's, run by class_alpha
        class_alpha([5, 5], [1.0, -0.5])


def test_build_loss_ce_and_focal() -> None:
    ce, w = build_loss("ce", 2.0, "auto", [30, 10])
    assert ce.gamma == 0.0 and w == pytest.approx([40 / 60, 40 / 20])
    focal, _ = build_loss("focal", 1.5, None, [30, 10])
    assert focal.gamma == 1.5 and focal.alpha is None
    with pytest.raises(ValueError, match="use focal or ce"):  # Recipe.loss refuses it first: a caller's bug
        build_loss("mse", 2.0, None, [30, 10])


def test_bias_init_makes_the_untrained_head_predict_the_prior() -> None:
    counts = [70, 20, 10]
    assert log_priors(counts).exp().tolist() == pytest.approx([0.7, 0.2, 0.1], rel=1e-6)
    model = TinyNet(num_classes=3)
    with torch.no_grad():
        model.head.weight.zero_()
    init_head_bias(model, counts)
    probs = torch.softmax(model(torch.randn(4, 1, 8, 8)), 1)
    assert torch.allclose(probs, torch.tensor([0.7, 0.2, 0.1]).expand(4, 3), atol=1e-6)

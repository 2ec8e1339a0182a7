"""WeightEMA: the warm-up decay, floats averaged (buffers too), integers copied, and its resume state."""

from __future__ import annotations

import pytest
import torch
from medxfer.training.ema import WeightEMA
from torch import nn


def test_average_follows_the_warmed_up_decay_and_copies_integer_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = WeightEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 2))  # moves BN running stats and num_batches_tracked
    d = ema.current_decay()
    assert d == pytest.approx(1 / 10)  # first step: mostly the new weights, not the pretrained start
    ema.update(model)
    now = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, d * start[k] + (1 - d) * now[k]), k
        else:
            assert torch.equal(v, now[k]), k  # num_batches_tracked is copied, not averaged
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == 0.9


def test_state_round_trip_and_bad_decay() -> None:
    model = nn.Linear(3, 2)
    a = WeightEMA(model, 0.99)
    for _ in range(5):
        a.update(model)
    b = WeightEMA(nn.Linear(3, 2), 0.99)
    b.load_state_dict(a.state_dict(), a.module.state_dict())
    assert b.steps == 5 and b.current_decay() == a.current_decay()
    pairs = zip(a.module.state_dict().values(), b.module.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, 1.0)

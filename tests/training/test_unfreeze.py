"""Progressive unfreezing: stages, no encoder gradient in stage 0, BN modes, optimizer groups and LRs."""

from __future__ import annotations

import copy

import pytest
import torch
from medxfer.config.recipe import OptimCfg, StageCfg
from medxfer.config.spec import SpecError
from medxfer.training.unfreeze import Unfreezer
from tinynets import TinyNet

STAGES = [StageCfg(epoch=0, groups=0), StageCfg(epoch=1, groups=1), StageCfg(epoch=2, groups="all")]


def _setup(stages=STAGES, epochs=4, steps=3, **optim):
    torch.manual_seed(0)
    model = TinyNet()
    cfg = OptimCfg(**{"lr": 1e-2, "lr_decay": 0.5, "warmup_epochs": 0, "schedule": "constant", **optim})
    return model, Unfreezer(model, stages, cfg, epochs=epochs, steps_per_epoch=steps)


def _step(model, unf, n=1):
    for _ in range(n):
        model.train()
        unf.set_train_mode()
        x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
        unf.step_lr()
        unf.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        unf.optimizer.step()


def test_stage0_trains_head_only_without_encoder_graph() -> None:
    model, unf = _setup()
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _step(model, unf)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.encoder.probe.grad_enabled == [False]  # the encoder body ran under no_grad
    assert torch.is_grad_enabled()  # and grad mode came back for the head and the rest of the program
    # BN in frozen groups is in eval mode: running statistics did not move
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert [pg["name"] for pg in unf.optimizer.param_groups] == ["head"]


def test_stages_add_groups_from_the_top_and_keep_optimizer_state() -> None:
    model, unf = _setup()
    _step(model, unf, 2)
    head_state = {k: v.clone() for k, v in unf.optimizer.state[model.head.weight].items()}
    assert unf.begin_epoch(1)
    assert [pg["name"] for pg in unf.optimizer.param_groups] == ["head", "block2"]
    # adding a group kept the head's Adam moments untouched
    for k, v in unf.optimizer.state[model.head.weight].items():
        assert torch.equal(v, head_state[k]), k
    assert all(not p.requires_grad for m in (model.encoder.stem, model.encoder.block1) for p in m.parameters())
    _step(model, unf)
    assert model.encoder.probe.grad_enabled[-1] is True  # partial stage: normal autograd
    assert all(p.grad is None for p in model.encoder.stem.parameters())  # frozen bottom: no grad
    assert all(p.grad is not None for p in model.encoder.block2.parameters())
    assert int(unf.optimizer.state[model.head.weight]["step"]) == 3  # Adam step count continued
    model.train()
    unf.set_train_mode()
    assert not model.encoder.stem[1].training and model.encoder.block2[1].training
    assert not unf.begin_epoch(1)  # same epoch: no change
    assert unf.begin_epoch(2)
    assert [pg["name"] for pg in unf.optimizer.param_groups] == ["head", "block2", "block1", "stem"]
    assert [e["trigger"] for e in unf.transitions] == ["epoch", "epoch"]


def test_discriminative_lrs_follow_decay_per_depth_with_warmup_for_new_groups() -> None:
    model, unf = _setup(warmup_epochs=1.0, steps=4, epochs=3)
    unf.begin_epoch(0)
    unf.step_lr()
    assert unf.lrs() == pytest.approx({"head": 1e-2 / 4})  # first of 4 warm-up steps
    for _ in range(3):
        unf.step_lr()
    assert unf.lrs()["head"] == pytest.approx(1e-2)
    unf.begin_epoch(1)
    unf.step_lr()
    assert unf.lrs() == pytest.approx({"head": 1e-2, "block2": 0.5 * 1e-2 / 4})  # new group warms up alone
    unf.begin_epoch(2)
    for _ in range(4):
        unf.step_lr()
    assert unf.lrs() == pytest.approx({"head": 1e-2, "block2": 5e-3, "block1": 2.5e-3, "stem": 1.25e-3})


def test_cosine_schedule_reaches_zero_at_the_end() -> None:
    model, unf = _setup(stages=[StageCfg(epoch=0, groups="all")], schedule="cosine", epochs=2, steps=5)
    seen = []
    for _ in range(10):
        unf.step_lr()
        seen.append(unf.lrs()["head"])
    assert seen[0] == pytest.approx(1e-2)
    assert seen == sorted(seen, reverse=True) and seen[-1] < 1e-3
    assert unf.lrs()["stem"] == pytest.approx(seen[-1] * 0.5**3)


def test_plateau_trigger() -> None:
    stages = [StageCfg(epoch=0, groups=0), StageCfg(plateau_patience=2, groups="all")]
    model, unf = _setup(stages=stages)
    for epoch, score in enumerate([0.6, 0.7, 0.69]):
        assert not unf.begin_epoch(epoch)
        unf.record(score)
    assert not unf.begin_epoch(3)  # one bad epoch so far
    unf.record(float("nan"))  # a NaN metric counts as no improvement
    assert unf.begin_epoch(4)
    assert unf.transitions == [{"stage": 1, "epoch": 4, "trigger": "plateau"}]


def test_frozen_bn_stats_option() -> None:
    model, unf = _setup(stages=[StageCfg(epoch=0, groups="all")])
    unf.freeze_bn_stats = True
    before = model.encoder.block2[1].running_mean.clone()
    _step(model, unf)
    assert torch.equal(model.encoder.block2[1].running_mean, before)
    assert model.encoder.block2[0].weight.grad is not None  # weights still train


def test_state_round_trip_restores_stage_and_groups() -> None:
    model, unf = _setup()
    _step(model, unf)
    unf.begin_epoch(1)
    _step(model, unf, 2)
    # deep copies, as a checkpoint round trip gives: a live state_dict shares tensors with the optimizer
    state, opt_state = copy.deepcopy(unf.state_dict()), copy.deepcopy(unf.optimizer.state_dict())
    assert [g["name"] for g in state["layout"]] == ["head", "block2"]

    model2 = TinyNet()
    model2.load_state_dict(model.state_dict())
    unf2 = Unfreezer(model2, STAGES, unf.cfg, epochs=4, steps_per_epoch=3)
    unf2.load_state_dict(state)
    unf2.optimizer.load_state_dict(opt_state)
    assert unf2.stage == 1 and unf2.layout() == unf.layout()
    assert [p.requires_grad for p in model2.parameters()] == [p.requires_grad for p in model.parameters()]
    torch.manual_seed(5)
    _step(model, unf)
    torch.manual_seed(5)
    _step(model2, unf2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_schedule_description_and_errors() -> None:
    model, unf = _setup()
    lines = unf.describe()
    assert lines[0].startswith("stage 0 from epoch 1: +head") and "no_grad" in lines[0]
    assert "block2" in lines[1] and "stem" in lines[2]
    with pytest.raises(SpecError, match="plateau_patience"):
        _setup(stages=[StageCfg(epoch=0, groups=0), StageCfg(groups="all")])


def test_the_model_layer_groups_are_checked_by_the_recipe_rules() -> None:
    """The Unfreezer hands its stages and the model's group names to medxfer.config.recipe.check_stages."""
    model = TinyNet()
    cfg = OptimCfg()
    model.layer_groups[1] = model.layer_groups[1]._replace(name="block2")
    with pytest.raises(SpecError, match=r"field 'encoder': layer group names must be unique; \['block2'\]"):
        Unfreezer(model, STAGES, cfg, epochs=2, steps_per_epoch=1)
    model.layer_groups = []
    with pytest.raises(SpecError, match="declares no layer_groups"):
        Unfreezer(model, STAGES, cfg, epochs=2, steps_per_epoch=1)

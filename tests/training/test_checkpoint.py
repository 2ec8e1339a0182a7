"""Checkpoints: atomic writes, weights_only loads, RNG round trip, corrupt-`last` fallback, tracking copy."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from medxfer.config.recipe import OptimCfg, StageCfg
from medxfer.training import checkpoint as C
from medxfer.training.unfreeze import Unfreezer
from tinynets import TinyNet


def _ckpt(epoch: int = 0) -> dict:
    model = TinyNet()
    unf = Unfreezer(model, [StageCfg(epoch=0, groups=0)], OptimCfg(), epochs=2, steps_per_epoch=1)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    unf.step_lr()
    unf.optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": unf.optimizer.state_dict(),
        "scheduler": unf.state_dict(),
        "scaler": {},
        "epoch": epoch,
        "rng": C.rng_state(),
        "stage": unf.stage,
        "param_groups": unf.layout(),
        "recipe": {"encoder": "tiny", "optim": {"lr": 1e-3}},
        "classes": ["a", "b"],
        "spec": {
            "name": "s",
            "source": {"kind": "dicom", "root": "/data/DOE_JANE"},
            "labels": {"csv": "/data/labels.csv"},
            "split": {"pinned_test": None},
            "spec_path": "/specs/s.yaml",
        },
        "hashes": {"spec": "a", "manifest": "b", "split": "c"},
        "run_id": "r1",
        "best_metric": 0.5,
    }


def test_everything_loads_with_weights_only(tmp_path) -> None:
    C.save_epoch(tmp_path, _ckpt(), is_best=True)
    for name in ("last.pt", "best.pt"):
        got = torch.load(tmp_path / name, weights_only=True)
        assert got["format"] == C.FORMAT and got["param_groups"][0]["name"] == "head"
        assert isinstance(got["rng"]["numpy"]["keys"], torch.Tensor)
    assert not list(tmp_path.glob("*.tmp"))


def test_plain_refuses_what_weights_only_cannot_load() -> None:
    assert C.plain({"a": np.float32(1.5), "b": (1, 2), "c": np.arange(3)})["b"] == [1, 2]
    with pytest.raises(TypeError, match="weights_only"):
        C.plain({"x": object()})


def test_optimizer_state_survives_a_checkpoint_round_trip(tmp_path) -> None:
    ck = _ckpt()
    C.save_epoch(tmp_path, C.plain(ck), is_best=False)
    got = C.load(tmp_path / "last.pt")["optimizer"]
    assert set(got["state"]) == set(ck["optimizer"]["state"]) == {0, 1}  # int keys, or Adam state is lost
    model = TinyNet()
    unf = Unfreezer(model, [StageCfg(epoch=0, groups=0)], OptimCfg(), epochs=2, steps_per_epoch=1)
    unf.load_state_dict(C.load(tmp_path / "last.pt")["scheduler"])
    unf.optimizer.load_state_dict(got)
    assert torch.equal(unf.optimizer.state[model.head.weight]["exp_avg"], ck["optimizer"]["state"][0]["exp_avg"])


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = C.rng_state()
    a = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    C.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_last_rotates_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    C.save_epoch(tmp_path, _ckpt(0), is_best=True)
    C.save_epoch(tmp_path, _ckpt(1), is_best=False)
    assert C.load(tmp_path / "last.pt")["epoch"] == 1 and C.load(tmp_path / "last.prev.pt")["epoch"] == 0
    assert C.load(tmp_path / "best.pt")["epoch"] == 0

    real_save = torch.save

    def dying_save(obj, fh):  # a kill in the middle of writing
        real_save(obj, fh)
        fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        C.save_epoch(tmp_path, _ckpt(2), is_best=True)
    monkeypatch.undo()
    assert C.load(tmp_path / "last.pt")["epoch"] == 1 and C.load(tmp_path / "best.pt")["epoch"] == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_last_falls_back_to_previous_with_a_message(tmp_path) -> None:
    C.save_epoch(tmp_path, _ckpt(0), is_best=False)
    C.save_epoch(tmp_path, _ckpt(1), is_best=False)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:500])
    messages: list[str] = []
    ckpt, path = C.load_resume(tmp_path, warn=messages.append)
    assert path.name == "last.prev.pt" and ckpt["epoch"] == 0
    assert "last.pt: unreadable" in messages[0] and "epoch 1" in messages[0]
    (tmp_path / "last.prev.pt").write_bytes(b"junk")
    with pytest.raises(C.CheckpointError, match="no usable checkpoint"):
        C.load_resume(tmp_path)


def test_tracking_copy_has_no_training_state_or_local_paths(tmp_path) -> None:
    out = C.for_tracking(C.plain(_ckpt()))
    assert not set(C.TRAINING_ONLY) & set(out)
    assert out["spec"]["source"]["root"] == "<local path>" and out["spec"]["labels"]["csv"] == "<local path>"
    assert "spec_path" not in out["spec"] and "model" in out
    C.atomic_save(out, tmp_path / "x.pt")
    assert b"DOE_JANE" not in (tmp_path / "x.pt").read_bytes()

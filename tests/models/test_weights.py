"""Weight resolution: fixed order, offline failure at once, safe and strict loading, honest reports."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from medxfer.core.errors import MedxferError
from medxfer.models import weights as W
from medxfer.models.factory import create_classifier


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    W.reset_online_cache()
    yield
    W.reset_online_cache()


def closed_port() -> int:
    with socket.socket() as s:  # bind then close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["resnet18", "medicalnet_resnet10", "efficientnet_lite0_acs"])
def test_offline_hub_only_choice_fails_at_once_naming_model_and_fix(offline_env, name):
    # efficientnet_lite0_acs has package weights, so only an explicit "hub" makes it hub-only
    choice = "hub" if name == "efficientnet_lite0_acs" else "default"
    with pytest.raises(MedxferError) as err:
        create_classifier(name, 2, weights=choice)
    msg = str(err.value)
    assert f"'{name}'" in msg and "offline" in msg
    assert "`weights: PATH` in the recipe" in msg and "--weights PATH" in msg


def test_probe_detects_an_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MEDXFER_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    W.reset_online_cache()
    try:
        assert W.is_online() is False
        with pytest.raises(MedxferError, match=r"'resnet50'.*offline.*--weights PATH"):
            create_classifier("resnet50", 2)
    finally:
        W.reset_online_cache()


def test_probe_sees_a_reachable_endpoint(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("MEDXFER_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        W.reset_online_cache()
        try:
            assert W.is_online() is True
        finally:
            W.reset_online_cache()


def test_order_is_file_then_package(tmp_path):
    assert create_classifier("efficientnet_lite0", 2).weight_report.source == "package"
    state = create_classifier("efficientnet_lite0", 2, weights=None).encoder.net.state_dict()
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    m = create_classifier("efficientnet_lite0", 2, weights=path)
    rep = m.weight_report
    assert rep.source == "file" and rep.location == "file:mine.pth"
    assert rep.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(m.encoder.net.blocks[3][0].conv_pw.weight, state["blocks.3.0.conv_pw.weight"])


def test_none_means_random_init():
    rep = create_classifier("efficientnet_lite0", 2, weights="none").weight_report
    assert rep.source == "none" and rep.sha256 is None
    assert rep.as_dict()["source"] == "none"


def test_missing_file_and_unsafe_pickle_are_clear_errors(tmp_path):
    with pytest.raises(MedxferError, match="does not exist"):
        create_classifier("resnet18", 2, weights=tmp_path / "nope.pth")
    evil = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Exotic()}, evil)
    with pytest.raises(MedxferError, match="weights_only=True"):
        create_classifier("resnet18", 2, weights=evil)


class Exotic:
    """Not on torch's weights_only allow-list."""


def test_backbone_load_is_strict(tmp_path):
    state = create_classifier("resnet18", 2, weights=None).encoder.net.state_dict()
    extra = dict(state, **{"layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(MedxferError, match=r"1 unexpected \(layer5\.0\.conv1\.weight\)"):
        create_classifier("resnet18", 2, weights=tmp_path / "extra.pth")
    fewer = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save(fewer, tmp_path / "fewer.pth")
    with pytest.raises(MedxferError, match=r"missing \(layer4\.1\."):
        create_classifier("resnet18", 2, weights=tmp_path / "fewer.pth")


def test_a_medxfer_checkpoint_is_accepted_with_its_head(tmp_path):
    trained = create_classifier("efficientnet_lite0", 3, weights=None)
    torch.nn.init.normal_(trained.head.weight)
    path = tmp_path / "best.pt"
    torch.save({"format": 1, "model": trained.state_dict(), "epoch": 3}, path)
    again = create_classifier("efficientnet_lite0", 3, weights=path, pretrained_head=True)
    assert again.weight_report.head_reinitialized is False
    torch.testing.assert_close(again.head.weight, trained.head.weight)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), trained.eval()(x))


def test_hub_source_uses_the_local_hf_cache_offline(offline_env, tmp_path):
    """A file already in the Hugging Face cache is usable offline and reported as the hub."""
    from safetensors.torch import save_file

    snap = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    state = create_classifier("resnet18", 2, weights=None, in_chans=1).encoder.net.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    m = create_classifier("resnet18", 2)
    assert m.weight_report.source == "hub"
    assert m.weight_report.location == "hf://timm/resnet18.a1_in1k/model.safetensors"

"""Checkpoints and frozen BN layers. save_checkpoint(..., freeze=...): the named BN layers are
written in the frozen-BN layout (weight, bias, running_mean, running_var; no
num_batches_tracked), the rest of the checkpoint as the structure-preserving saver keeps it, in
every writable format. load_into_model: a BatchNorm checkpoint loads into a model whose layers
are frozen (their num_batches_tracked entries ignored, as the layers themselves do)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from bnscope.errors import CheckpointError, ModelError
from bnscope.io.checkpoint import load_checkpoint
from bnscope.io.fitting import load_into_model
from bnscope.io.saving import save_checkpoint
from bnscope.nn import FrozenBatchNorm2d, freeze_bn

from ..standins import BatchNormAct2d
from ..standins import FrozenBatchNorm2d as StandinFrozen


def make_net() -> nn.Sequential:
    """conv -> BN (affine=False) -> ReLU -> conv -> BN, with moved statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    )  # fmt: skip
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 2, 2) + 1)
    return net.eval()


def frozen_net() -> nn.Module:
    return freeze_bn(make_net())


NEW_MEAN = torch.full((4,), 0.25)


def test_dict_checkpoint_gets_the_frozen_layout_and_keeps_the_rest(tmp_path: Path) -> None:
    net = make_net()
    sd = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
    meta = {"": {"version": 1}, "module.1": {"version": 2}, "module.4": {"version": 2}}
    sd._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
    path = tmp_path / "ck.pt"
    optim = {"lr": torch.tensor(0.1)}
    torch.save({"model": sd, "epoch": 3, "optimizer": optim}, path)
    ckpt = load_checkpoint(path)
    out = save_checkpoint(
        ckpt, {"module.4.running_mean": NEW_MEAN}, tmp_path / "o.pt",
        freeze=["module.1.", "module.4."],
    )  # fmt: skip
    raw = torch.load(out, weights_only=True)
    assert raw["epoch"] == 3 and torch.equal(raw["optimizer"]["lr"], optim["lr"])
    written = raw["model"]
    assert list(written) == [
        "module.0.weight", "module.0.bias",
        "module.1.weight", "module.1.bias", "module.1.running_mean", "module.1.running_var",
        "module.3.weight", "module.3.bias",
        "module.4.weight", "module.4.bias", "module.4.running_mean", "module.4.running_var",
    ]  # fmt: skip
    assert isinstance(written, OrderedDict)
    # a frozen layer's module version is FrozenBatchNorm's (3: detectron2 would otherwise take
    # eps off running_var); the input's metadata is untouched
    assert written._metadata == {**meta, "module.1": {"version": 3}, "module.4": {"version": 3}}
    assert ckpt.raw["model"]._metadata == meta
    assert torch.equal(written["module.1.weight"], torch.ones(4))
    assert torch.equal(written["module.1.bias"], torch.zeros(4))
    assert written["module.1.weight"].dtype == sd["module.1.running_mean"].dtype
    assert torch.equal(written["module.4.running_mean"], NEW_MEAN)
    for key, value in written.items():
        if key in sd and key != "module.4.running_mean":
            assert torch.equal(value, sd[key]), key
    model = frozen_net()  # the user's frozen model loads it strictly
    model.load_state_dict({k.removeprefix("module."): v for k, v in written.items()})
    assert torch.equal(model[4].running_mean, NEW_MEAN)


def test_safetensors_and_a_prefix_selection(tmp_path: Path) -> None:
    raw_net, ema_net = make_net(), make_net()
    tensors = {f"model.{k}": v for k, v in raw_net.state_dict().items()}
    tensors.update({f"ema_model.module.{k}": v for k, v in ema_net.state_dict().items()})
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"note": "kept"})
    ckpt = load_checkpoint(path, key=":ema_model.module")
    out = save_checkpoint(ckpt, {}, tmp_path / "w.frozen.safetensors", freeze=["1.", "4."])
    written = safetensors.torch.load_file(out)
    with safetensors.safe_open(out, "pt") as f:
        assert f.metadata() == {"note": "kept"}
    ema = {k.removeprefix("ema_model.module."): v for k, v in written.items()
           if k.startswith("ema_model.")}  # fmt: skip
    frozen_net().load_state_dict(ema)  # strict
    raw = {k: v for k, v in written.items() if k.startswith("model.")}
    assert raw.keys() == {k for k in tensors if k.startswith("model.")}  # the other network
    for key, value in raw.items():
        assert torch.equal(value, tensors[key]), key


def test_pickled_whole_module_is_written_with_frozen_layers(tmp_path: Path) -> None:
    net = make_net()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    ckpt = load_checkpoint(path, trust=True)
    out = save_checkpoint(ckpt, {"4.running_mean": NEW_MEAN}, tmp_path / "o.pt",
                          freeze=["1.", "4."])  # fmt: skip
    model = torch.load(out, weights_only=False)
    assert type(model[1]) is FrozenBatchNorm2d and type(model[4]) is FrozenBatchNorm2d
    assert not any("_frozen_original" in m.__dict__ for m in model.modules())
    assert torch.equal(model[4].running_mean, NEW_MEAN)
    assert list(model.state_dict()) == list(frozen_net().state_dict())
    assert type(net[1]) is nn.BatchNorm2d  # the loaded module itself is not converted
    x = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        net[4].running_mean.copy_(NEW_MEAN)
        torch.testing.assert_close(model(x), net(x), rtol=1e-6, atol=1e-6)


def test_a_whole_module_whose_layer_cannot_be_frozen_is_refused(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    path = tmp_path / "act.pt"
    torch.save(net, path)
    ckpt = load_checkpoint(path, trust=True)
    with pytest.raises(CheckpointError, match=r"1 \(BatchNormAct2d\) has a forward of its own"):
        save_checkpoint(ckpt, {}, tmp_path / "o.pt", freeze=["1."])
    assert not (tmp_path / "o.pt").exists()


def test_freezing_what_has_no_running_statistics_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    torch.save(make_net().state_dict(), path)
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot write 0 as a frozen BN layer"):
        save_checkpoint(ckpt, {}, tmp_path / "o.pt", freeze=["0."])
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("frozen_cls", [FrozenBatchNorm2d, StandinFrozen])
def test_a_batchnorm_checkpoint_loads_into_a_model_with_frozen_layers(frozen_cls) -> None:
    """Its num_batches_tracked entries are not loaded (the stand-in, like other frozen
    layers without torchvision's drop, would refuse them); every other key stays strict."""
    net = make_net()
    sd = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
    sd._metadata = OrderedDict({"module.4": {"version": 2}})  # type: ignore[attr-defined]
    model = make_net()
    model[4] = frozen_cls(4)
    assert load_into_model(model, sd) == "module."
    assert torch.equal(model[4].running_var, net[4].running_var)
    assert "module.4.num_batches_tracked" in sd and sd._metadata == {"module.4": {"version": 2}}
    del sd["module.4.running_var"]
    with pytest.raises(ModelError, match=r"missing key \(4.running_var\)"):
        load_into_model(model, sd)
    extra = dict(net.state_dict())
    extra["3.num_batches_tracked"] = torch.tensor(1)  # no layer 3 statistics: unexpected
    with pytest.raises(ModelError, match="unexpected key"):
        load_into_model(make_net(), extra)

"""bnscope's own FrozenBatchNorm layers are found and named as frozen BN (DESIGN section 5),
as torchvision's FrozenBatchNorm2d is: static inspection marks them, precise measures and keeps
them, and with include_frozen re-estimates them against a float64 reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

import bnscope
from bnscope.engine.capture import is_frozen_batchnorm
from bnscope.nn import FrozenBatchNorm, FrozenBatchNorm2d, freeze_bn, unfreeze_bn

F64 = torch.float64


def frozen_net() -> nn.Sequential:
    """conv -> FrozenBatchNorm2d -> ReLU, twice, with stored statistics off the data's."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return freeze_bn(net.eval())


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 3, (8,), generator=g))
        for _ in range(4)
    ]


def batch_stats_reference(net: nn.Module, data) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 population statistics of each frozen layer's input, every frozen layer
    normalizing with batch statistics (the model unfrozen, BN in training mode, momentum 0)."""
    m = unfreeze_bn(copy.deepcopy(net))
    inputs: dict[int, list[torch.Tensor]] = {1: [], 4: []}
    for i in inputs:
        m[i].train()
        m[i].momentum = 0.0
        m[i].register_forward_pre_hook(lambda mod, a, i=i: inputs[i].append(a[0].to(F64)))
    with torch.no_grad():
        for x, _ in data:
            m(x)
    return {
        i: tuple(reversed(torch.var_mean(torch.cat(xs), dim=(0, 2, 3), correction=0)))
        for i, xs in inputs.items()
    }


def test_bnscope_frozen_layers_are_frozen_batchnorm():
    net = frozen_net()
    assert isinstance(net[1], FrozenBatchNorm2d) and isinstance(net[1], FrozenBatchNorm)
    assert is_frozen_batchnorm(net[1]) and not is_frozen_batchnorm(nn.BatchNorm2d(4))
    static = bnscope.static_inspect(net)
    assert [(r.name, r.frozen) for r in static.layers] == [("1", True), ("4", True)]
    assert not any(f.code == "no-batchnorm" for f in static.findings)

    kept = copy.deepcopy(net)
    before = {k: v.clone() for k, v in kept.state_dict().items()}
    rep = bnscope.precise_bn(kept, batches())
    assert [(r.name, r.status) for r in rep.layers] == [("1", "frozen"), ("4", "frozen")]
    assert "frozen BN (FrozenBatchNorm2d)" in (rep.layers[0].reason or "")
    for key, value in kept.state_dict().items():
        assert torch.equal(value, before[key]), key  # measured, not written


def test_include_frozen_re_estimates_bnscope_frozen_layers():
    net = frozen_net()
    data = batches()
    ref = batch_stats_reference(net, data)
    updated = copy.deepcopy(net)
    rep = bnscope.precise_bn(updated, data, include_frozen=True)
    assert [r.status for r in rep.layers] == ["updated", "updated"]
    for i, (mean, var) in ref.items():
        torch.testing.assert_close(updated[i].running_mean.to(F64), mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(updated[i].running_var.to(F64), var, rtol=1e-6, atol=0)
    assert torch.equal(updated[1].weight, net[1].weight)  # only the statistics change
    assert "num_batches_tracked" not in updated.state_dict()

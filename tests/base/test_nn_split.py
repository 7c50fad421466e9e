"""SplitBatchNorm / convert_to_split_bn / load_domain_statistics: each domain is BatchNorm with
that domain's statistics (float64 references), training moves only the selected domain's rows,
and conversions keep parameters, modes, device and dtype."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bnscope.nn import (
    PriorBatchNorm2d,
    SplitBatchNorm,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    SplitBatchNorm3d,
    convert_to_split_bn,
    load_domain_statistics,
    revert_split_bn,
    set_domain,
    use_domain,
)

C = 3
SPATIAL = {"NC": (), "NCL": (5,), "NCHW": (3, 4), "NCDHW": (2, 3, 2)}
CLASSES = {
    "NC": (nn.BatchNorm1d, SplitBatchNorm1d),
    "NCL": (nn.BatchNorm1d, SplitBatchNorm1d),
    "NCHW": (nn.BatchNorm2d, SplitBatchNorm2d),
    "NCDHW": (nn.BatchNorm3d, SplitBatchNorm3d),
}


def make_x(layout: str, shift: float, scale: float, batch: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, C, *SPATIAL[layout]), generator=gen, dtype=torch.float64)
    return x * scale + shift


def split_with_rows(cls, domains: int = 3, momentum: float | None = 0.1) -> SplitBatchNorm:
    """A float64 split layer whose domains hold different made-up statistics."""
    gen = torch.Generator().manual_seed(5)
    layer = cls(C, domains, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(domains, C, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(domains, C, generator=gen, dtype=torch.float64) + 0.5)
        layer.weight.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.num_batches_tracked.copy_(torch.tensor([10, 20, 30][:domains]))
    return layer


def plain_copy(layer: SplitBatchNorm, d: int, bn_cls) -> nn.Module:
    """nn.BatchNorm*d with domain d's statistics and the shared affine parameters."""
    bn = bn_cls(C, momentum=layer.momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(layer.running_mean[d])
        bn.running_var.copy_(layer.running_var[d])
        bn.num_batches_tracked.copy_(layer.num_batches_tracked[d])
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    return bn


def reference_eval(x, mean, var, weight, bias, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(
        shape
    ) + bias.view(shape)


@pytest.mark.parametrize("layout", list(SPATIAL))
def test_eval_normalizes_with_the_selected_domain(layout):
    bn_cls, split_cls = CLASSES[layout]
    layer = split_with_rows(split_cls).eval()
    x = make_x(layout, 2.0, 3.0)
    for d in range(3):
        layer.domain = d
        expected = reference_eval(
            x, layer.running_mean[d], layer.running_var[d], layer.weight, layer.bias
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), plain_copy(layer, d, bn_cls).eval()(x), rtol=0, atol=0)
    # the forward argument overrides the attribute
    torch.testing.assert_close(layer(x, domain=0), plain_copy(layer, 0, bn_cls).eval()(x))
    # different domains give different outputs (the rows differ)
    assert not torch.allclose(layer(x, domain=0), layer(x, domain=1))


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_is_batchnorm_on_the_selected_domain_and_moves_only_its_rows(layout, momentum):
    bn_cls, split_cls = CLASSES[layout]
    layer = split_with_rows(split_cls, momentum=momentum).train()
    plain = plain_copy(layer, 1, bn_cls).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for step in range(3):
        x = make_x(layout, 1.0 + step, 2.0, seed=step)
        out = layer(x, domain=1)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
        # float64 reference: batch statistics (biased variance)
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        torch.testing.assert_close(
            out, reference_eval(x, mean, var, layer.weight, layer.bias), rtol=1e-10, atol=1e-10
        )
    torch.testing.assert_close(layer.running_mean[1], plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var[1], plain.running_var, rtol=0, atol=0)
    assert int(layer.num_batches_tracked[1]) == int(plain.num_batches_tracked) == 23
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        for d in (0, 2):  # the other domains are untouched, bit for bit
            assert torch.equal(layer.state_dict()[key][d], before[key][d]), (key, d)


def test_gradients_reach_the_shared_affine_parameters():
    layer = SplitBatchNorm2d(C, 2).train()
    x = torch.randn(4, C, 3, 3)
    layer(x, domain=1).square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert layer.weight.grad.abs().sum() > 0


def test_domain_and_dims_are_checked():
    layer = SplitBatchNorm2d(C, 2)
    for bad in (2, -1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="domain must be an integer index"):
            layer.domain = bad
        with pytest.raises(ValueError, match="domain must be an integer index"):
            layer(torch.randn(2, C, 2, 2), domain=bad)
    with pytest.raises(ValueError, match="num_domains must be an integer >= 1"):
        SplitBatchNorm(C, 0)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, C))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        SplitBatchNorm1d(C, 2)(torch.randn(2, C, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SplitBatchNorm1d(C, 2).train()(torch.randn(1, C))
    assert SplitBatchNorm(C, 2)(torch.randn(4, C, 2, 2, 2)).shape == (4, C, 2, 2, 2)
    assert "num_domains=2" in repr(layer) and "domain=0" in repr(layer)


def test_buffer_layout_and_state_dict_round_trip():
    layer = split_with_rows(SplitBatchNorm2d)
    state = layer.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "weight": (C,), "bias": (C,), "running_mean": (3, C), "running_var": (3, C),
        "num_batches_tracked": (3,),
    }  # fmt: skip
    other = SplitBatchNorm2d(C, 3, dtype=torch.float64)
    other.load_state_dict(state)  # strict
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.BatchNorm2d(C).load_state_dict(state)  # never silently into a plain layer


def tiny(bn=nn.BatchNorm2d, **bn_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), bn(C, **bn_kwargs), nn.ReLU(), nn.Conv2d(C, 2, 1))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 4, 4) * 2 + 1)
    return model


def test_convert_keeps_parameters_modes_device_dtype_and_statistics():
    model = tiny().double()
    bn = model[1]
    model[0].eval()  # per-module modes are kept
    weight, bias = bn.weight, bn.bias
    mean, var, tracked = (
        bn.running_mean.clone(),
        bn.running_var.clone(),
        int(bn.num_batches_tracked),
    )
    out = convert_to_split_bn(model, 2)
    assert out is model and isinstance(model[1], SplitBatchNorm2d)
    split = model[1]
    assert split.weight is weight and split.bias is bias  # optimizers keep working
    assert split.running_mean.dtype == torch.float64 and split.running_mean.shape == (2, C)
    assert torch.equal(split.running_mean, mean.expand(2, C))
    assert torch.equal(split.running_var, var.expand(2, C))
    assert split.num_batches_tracked.tolist() == [tracked, tracked]
    assert split.training and not model[0].training
    assert (split.eps, split.momentum, split.affine) == (bn.eps, bn.momentum, bn.affine)
    # a converted model in eval mode is the original on every domain until rows differ
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    model.eval()
    reference = copy.deepcopy(model)
    reference[1] = bn.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_shared_modules_convert_once_and_others_are_left_alone():
    shared = nn.BatchNorm2d(C)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm2d(C, track_running_stats=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_split_bn(model, 2)
    assert model[0] is model[2] and isinstance(model[0], SplitBatchNorm2d)
    assert isinstance(model[3], nn.BatchNorm2d)  # nothing to split
    fused = nn.Sequential(PriorBatchNorm2d(C, 16.0))
    with pytest.warns(UserWarning, match="overrides forward"):
        convert_to_split_bn(fused, 2)
    assert isinstance(fused[0], PriorBatchNorm2d)
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialized lazy parameters"):
        convert_to_split_bn(lazy, 2)
    with pytest.raises(ValueError, match="num_domains"):
        convert_to_split_bn(nn.Sequential(nn.BatchNorm2d(C)), 0)
    root = convert_to_split_bn(nn.BatchNorm1d(C), 2)  # the root itself is replaced
    assert isinstance(root, SplitBatchNorm1d)
    sync = convert_to_split_bn(nn.Sequential(nn.SyncBatchNorm(C)), 2)
    assert type(sync[0]) is SplitBatchNorm
    back = revert_split_bn(sync, 1)
    assert type(back[0]) is nn.SyncBatchNorm


def test_revert_takes_one_domain_back_to_the_original_module():
    model = tiny()
    original = model[1]
    convert_to_split_bn(model, 2)
    with torch.no_grad():
        model[1].running_mean[1].fill_(3.0)
        model[1].running_var[1].fill_(4.0)
        model[1].num_batches_tracked[1] = 99
    model.eval()
    model = revert_split_bn(model, 1)
    assert model[1] is original and not original.training
    assert original.running_mean.tolist() == [3.0] * C
    assert original.running_var.tolist() == [4.0] * C and int(original.num_batches_tracked) == 99
    direct = revert_split_bn(nn.Sequential(split_with_rows(SplitBatchNorm3d)), 2)
    assert type(direct[0]) is nn.BatchNorm3d
    assert int(direct[0].num_batches_tracked) == 30
    generic = nn.Sequential(SplitBatchNorm(C, 2))
    assert isinstance(revert_split_bn(generic, 0)[0], SplitBatchNorm)  # no BN class to go to
    with pytest.raises(ValueError, match="domain must be an integer index"):
        revert_split_bn(convert_to_split_bn(tiny(), 2), 2)


def test_use_domain_sets_every_layer_and_restores_each_one():
    model = nn.Sequential(SplitBatchNorm2d(C, 3), SplitBatchNorm2d(C, 3), SplitBatchNorm2d(C, 2))
    model[1].domain = 2
    with use_domain(model, 1):
        assert [m.domain for m in model] == [1, 1, 1]
    assert [m.domain for m in model] == [0, 2, 0]
    with pytest.raises(RuntimeError, match="boom"), use_domain(model, 1):
        raise RuntimeError("boom")
    assert [m.domain for m in model] == [0, 2, 0]
    with pytest.raises(ValueError, match="domain must be an integer index"):
        set_domain(model, 2)  # the third layer has 2 domains: nothing changed
    assert [m.domain for m in model] == [0, 2, 0]
    set_domain(model, 1)
    assert [m.domain for m in model] == [1, 1, 1]


def test_load_domain_statistics_from_plain_state_dicts():
    plain = [tiny(), tiny()]
    with torch.no_grad():
        plain[1][1].running_mean.add_(5.0)
        plain[1][1].num_batches_tracked.fill_(7)
    split = convert_to_split_bn(copy.deepcopy(plain[0]), 2)
    load_domain_statistics(split, {1: plain[1].state_dict()})  # domain 0 keeps its rows
    assert torch.equal(split[1].running_mean[0], plain[0][1].running_mean)
    assert torch.equal(split[1].running_mean[1], plain[1][1].running_mean)
    assert split[1].num_batches_tracked.tolist()[1] == 7
    load_domain_statistics(split, [p.state_dict() for p in reversed(plain)])  # a sequence
    assert torch.equal(split[1].running_mean[0], plain[1][1].running_mean)
    split.eval()
    x = torch.randn(4, 3, 4, 4)
    with use_domain(split, 1):
        torch.testing.assert_close(split(x), plain[0].eval()(x), rtol=0, atol=0)
    before = split[1].running_mean.clone()
    partial = {k: v for k, v in plain[1].state_dict().items() if k != "1.running_var"}
    with pytest.raises(ValueError, match=r"lack the statistics of split layers: 1\.running_var"):
        load_domain_statistics(split, {0: plain[0].state_dict(), 1: partial})
    wrong = dict(plain[1].state_dict(), **{"1.running_mean": torch.zeros(C + 1)})
    with pytest.raises(ValueError, match="has shape"):
        load_domain_statistics(split, [wrong])
    with pytest.raises(ValueError, match="domain must be an integer index"):
        load_domain_statistics(split, {2: plain[0].state_dict()})
    assert torch.equal(split[1].running_mean, before)  # nothing written on an error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_update_like_batchnorm_under_autocast_and_channels_last():
    """On the GPU (cuDNN's kernel writes the running statistics through the row views) under
    fp16 autocast with channels-last input: domain 1 moves as BatchNorm2d does, the others
    stay; a converted model stays on its device."""
    cpu = split_with_rows(SplitBatchNorm2d)
    plain = plain_copy(cpu, 1, nn.BatchNorm2d).float().cuda().train()
    layer = cpu.float().cuda().train()
    before = layer.running_mean.clone()
    x = make_x("NCHW", 1.0, 2.0).float().cuda().to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        y, expected = layer(x.half(), domain=1), plain(x.half())
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.running_mean[1], plain.running_mean)
    torch.testing.assert_close(layer.running_var[1], plain.running_var)
    assert torch.equal(layer.running_mean[[0, 2]], before[[0, 2]])
    model = convert_to_split_bn(tiny().cuda(), 2)
    assert model[1].running_mean.device.type == "cuda"

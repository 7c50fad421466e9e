"""FrozenBatchNorm / freeze_bn / unfreeze_bn against a float64 closed form of the frozen affine
(Wu & Johnson 2021, "FrozenBN"), BatchNorm in eval mode, torchvision's FrozenBatchNorm2d (when
it imports), and state-dict and conversion round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bnscope.nn import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm2d,
    PriorBatchNorm2d,
    can_freeze,
    freeze_bn,
    unfreeze_bn,
)

from ..reallibs import real_libraries
from ..standins import BatchNormAct2d

C = 3
SPATIAL = {"NC": (), "NCL": (5,), "NCHW": (3, 4), "NCDHW": (2, 3, 2)}
BN_FOR = {"NC": nn.BatchNorm1d, "NCL": nn.BatchNorm1d, "NCHW": nn.BatchNorm2d}
BN_FOR["NCDHW"] = nn.BatchNorm3d
FROZEN_FOR = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d}
FROZEN_FOR[nn.BatchNorm3d] = FrozenBatchNorm3d


def make_x(batch: int, layout: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Inputs shifted and scaled per channel, away from the layer's statistics."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, C, *SPATIAL[layout]), generator=gen, dtype=torch.float64)
    cshape = (1, C) + (1,) * len(SPATIAL[layout])
    x = x * torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).view(cshape)
    return (x + torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64).view(cshape)).to(dtype)


def trained_bn(cls: type[nn.Module], dtype=torch.float64, seed: int = 1, **kw) -> nn.Module:
    """A BN layer with made-up statistics and affine parameters, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    bn = cls(C, dtype=dtype, **kw)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.num_batches_tracked.fill_(37)
    return bn.eval()


def reference(x: torch.Tensor, mean, var, weight, bias, eps: float) -> torch.Tensor:
    """(x - mean) * weight / sqrt(var + eps) + bias, in float64."""
    shape = (1, C) + (1,) * (x.ndim - 2)
    xd = x.double()
    y = (xd - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
    return y * weight.double().view(shape) + bias.double().view(shape)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_equals_batchnorm_in_eval_mode(layout, affine):
    bn = trained_bn(BN_FOR[layout], affine=affine)
    frozen = freeze_bn(copy.deepcopy(bn))
    assert type(frozen) is FROZEN_FOR[BN_FOR[layout]]
    x = make_x(6, layout)
    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    weight = bn.weight if affine else ones
    bias = bn.bias if affine else zeros
    ref = reference(x, bn.running_mean, bn.running_var, weight, bias, bn.eps)
    with torch.no_grad():
        out, bn_out = frozen(x), bn(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, bn_out, rtol=1e-13, atol=1e-13)
    # float32: the same function up to float32 rounding
    bn32, frozen32 = bn.float(), frozen.float()
    with torch.no_grad():
        out32 = frozen32(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out32, bn32(x.float()), rtol=1e-5, atol=1e-5)


def test_state_dict_layout_and_batchnorm_state_dicts_load_strictly():
    bn = trained_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d(C, dtype=torch.float64)
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(frozen.parameters()) == [] and frozen.eps == 1e-5
    assert repr(frozen) == "FrozenBatchNorm2d(3, eps=1e-05)"
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    result = frozen.load_state_dict(sd, strict=True)  # the count is accepted and ignored
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert "num_batches_tracked" in sd  # the caller's dict is left alone
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(frozen.state_dict()[key], sd[key]), key
    with pytest.raises(RuntimeError, match="Missing key"):
        FrozenBatchNorm2d(C).load_state_dict({"running_mean": torch.zeros(C)}, strict=True)
    # its version is detectron2's (3: running_var used with eps added), so BatchNorm does not
    # fill in the count it lacks: back into BatchNorm it loads with strict=False only
    assert frozen.state_dict()._metadata[""]["version"] == 3
    back = nn.BatchNorm2d(C, dtype=torch.float64)
    back.num_batches_tracked.fill_(5)
    result = back.load_state_dict(frozen.state_dict(), strict=False)
    assert result.missing_keys == ["num_batches_tracked"] and result.unexpected_keys == []
    assert int(back.num_batches_tracked) == 5 and torch.equal(back.running_var, bn.running_var)


def test_no_parameters_gradients_reach_the_input_and_train_mode_changes_nothing():
    frozen = freeze_bn(trained_bn(nn.BatchNorm2d))
    before = state(frozen)
    x = make_x(4, "NCHW").requires_grad_(True)
    frozen.train()
    y = frozen(x)
    y.sum().backward()
    # dy/dx = weight / sqrt(running_var + eps), per channel
    scale = frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)
    torch.testing.assert_close(x.grad, scale.view(1, C, 1, 1).expand_as(x), rtol=1e-13, atol=0)
    assert all(not b.requires_grad for b in frozen.buffers())
    with torch.no_grad():
        eval_out = frozen.eval()(x)
    assert torch.equal(y.detach(), eval_out)  # the same function in either mode
    assert_bit_identical(state(frozen), before)


def test_channels_last_input_gives_the_same_values_in_channels_last():
    frozen = freeze_bn(trained_bn(nn.BatchNorm2d, dtype=torch.float32))
    x = make_x(4, "NCHW", torch.float32)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, out_cl = frozen(x), frozen(xc)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_cl)


def test_low_precision_input_follows_type_promotion_like_torchvision():
    """float16/bfloat16 input with float32 buffers: float32 output, computed as
    x * scale + shift with scale and shift in float32 (torchvision's behaviour)."""
    frozen = freeze_bn(trained_bn(nn.BatchNorm2d, dtype=torch.float32))
    scale, shift = frozen.scale_shift()
    for dtype in (torch.float16, torch.bfloat16):
        x = make_x(2, "NCHW", dtype)
        with torch.no_grad():
            out = frozen(x)
        assert out.dtype == torch.float32
        expected = x.float() * scale.view(1, C, 1, 1) + shift.view(1, C, 1, 1)
        assert torch.equal(out, expected)
    half = freeze_bn(trained_bn(nn.BatchNorm2d, dtype=torch.float32)).half()
    with torch.no_grad():
        assert half(make_x(2, "NCHW", torch.float16)).dtype == torch.float16


def test_same_bits_as_torchvision_frozen_batchnorm():
    libs = real_libraries()
    if libs is None:
        pytest.skip("torchvision does not import here")
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    bn = trained_bn(nn.BatchNorm2d, dtype=torch.float32)
    theirs = TorchvisionFrozen(C)
    theirs.load_state_dict(bn.state_dict())
    ours = FrozenBatchNorm2d(C)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = make_x(3, "NCHW", dtype)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert a.dtype == b.dtype and torch.equal(a, b), dtype


def test_dims_are_checked_like_batchnorm():
    with pytest.raises(ValueError, match="expected 4D input"):
        FrozenBatchNorm2d(C)(torch.zeros(2, C))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        FrozenBatchNorm1d(C)(torch.zeros(2, C, 2, 2))
    with pytest.raises(ValueError, match="expected 5D input"):
        FrozenBatchNorm3d(C)(torch.zeros(2, C, 2, 2))
    with pytest.raises(ValueError, match="expected 3 channels"):
        FrozenBatchNorm(C)(torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm(0)
    for shape in ((2, C), (2, C, 4), (2, C, 2, 2), (2, C, 2, 2, 2)):  # the generic class
        assert FrozenBatchNorm(C)(torch.ones(shape)).shape == shape


# --------------------------------------------------------------------------- conversion


class Net(nn.Module):
    """BN1d, BN2d (used twice), BN3d and an affine=False BN2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.shared = nn.BatchNorm2d(C)
        self.plain = nn.BatchNorm2d(C, affine=False)
        self.vol = nn.BatchNorm3d(C)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(C * 4, C), nn.BatchNorm1d(C))
        self.again = self.shared  # the same module at a second place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(self.conv(x))
        h = self.plain(h) + self.again(h)
        h = self.vol(h.unsqueeze(2)).squeeze(2)
        return self.head(h)


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().double().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, C, 2, 2, dtype=torch.float64) * 2 + 1)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


def test_freeze_then_unfreeze_round_trips_modules_buffers_and_outputs():
    net = trained_net()
    x = torch.randn(5, C, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
    bn_types = nn.modules.batchnorm._BatchNorm
    originals = {n: m for n, m in net.named_modules() if isinstance(m, bn_types)}
    params = {id(p) for p in net.parameters()}
    before = state(net)

    out = freeze_bn(net)
    assert out is net
    assert type(net.shared) is FrozenBatchNorm2d and net.again is net.shared  # converted once
    assert type(net.plain) is FrozenBatchNorm2d and type(net.vol) is FrozenBatchNorm3d
    assert type(net.head[2]) is FrozenBatchNorm1d
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net.shared.running_mean is originals["shared"].running_mean  # the very tensors
    assert torch.equal(net.plain.weight, torch.ones(C, dtype=torch.float64))
    assert torch.equal(net.plain.bias, torch.zeros(C, dtype=torch.float64))
    assert net.plain.weight.dtype == torch.float64
    frozen_state = net.state_dict()
    assert "shared.num_batches_tracked" not in frozen_state and "plain.weight" in frozen_state
    assert "again.running_mean" in frozen_state  # a shared layer under each of its names
    net.train()  # a frozen model computes its eval-mode function in train mode too
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)

    back = unfreeze_bn(net)
    assert back is net
    for name, module in originals.items():
        assert net.get_submodule(name) is module, name  # the very objects again
    assert net.again is net.shared
    assert {id(p) for p in net.parameters()} == params  # an optimizer's parameters still work
    assert_bit_identical(state(net), before)
    assert all(m.training for m in net.modules())  # the mode the frozen model was in
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), expected, rtol=0, atol=0)


def test_modes_and_only_select_layers():
    net = trained_net()
    net.head.train()
    freeze_bn(net, only=["again", "head.2"])  # a shared module may be named by any name
    assert type(net.shared) is FrozenBatchNorm2d and type(net.head[2]) is FrozenBatchNorm1d
    assert net.head[2].training and not net.shared.training  # modes kept
    assert type(net.vol) is nn.BatchNorm3d and type(net.plain) is nn.BatchNorm2d
    freeze_bn(net, only=lambda name, module: isinstance(module, nn.BatchNorm3d))
    assert type(net.vol) is FrozenBatchNorm3d and type(net.plain) is nn.BatchNorm2d
    assert freeze_bn(net) is net and type(net.plain) is FrozenBatchNorm2d  # frozen ones kept


def test_only_names_that_are_no_batchnorm_layer_are_errors():
    net = trained_net()
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match="no module of the model: 'nope'"):
        freeze_bn(net, only=["shared", "nope"])
    with pytest.raises(ValueError, match=r"conv \(Conv2d\), which is not a BatchNorm layer"):
        freeze_bn(net, only="conv")
    assert [type(m) for m in net.modules()] == [type(m) for m in before.modules()]


def test_root_batchnorm_becomes_the_returned_module():
    bn = trained_bn(nn.BatchNorm1d)
    frozen = freeze_bn(bn)
    assert type(frozen) is FrozenBatchNorm1d and frozen is not bn
    assert unfreeze_bn(frozen) is bn


def test_sync_batchnorm_and_ghost_batchnorm_are_frozen():
    sync = trained_bn(nn.SyncBatchNorm)
    frozen = freeze_bn(sync)
    assert type(frozen) is FrozenBatchNorm  # any rank, no synchronization
    x = make_x(4, "NCHW")
    ref = reference(x, sync.running_mean, sync.running_var, sync.weight, sync.bias, sync.eps)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), ref, rtol=1e-13, atol=1e-13)
    assert unfreeze_bn(frozen) is sync
    ghost = GhostBatchNorm2d(C, ghost_size=2, dtype=torch.float64)
    ghost.load_state_dict(trained_bn(nn.BatchNorm2d).state_dict())
    frozen_ghost = freeze_bn(ghost)
    assert type(frozen_ghost) is FrozenBatchNorm2d  # Ghost BN is plain BN in eval mode
    with torch.no_grad():
        torch.testing.assert_close(frozen_ghost(x), ghost.eval()(x), rtol=1e-13, atol=1e-13)


def test_batchnorm_with_a_forward_of_its_own_is_refused_and_only_freezes_the_rest():
    net = nn.Sequential(nn.Conv2d(C, C, 1), BatchNormAct2d(C), nn.BatchNorm2d(C))
    assert not can_freeze(net[1]) and can_freeze(net[2])
    with pytest.raises(ValueError, match=r"1 \(BatchNormAct2d\) has a forward of its own"):
        freeze_bn(net)
    assert type(net[2]) is nn.BatchNorm2d  # nothing was changed
    freeze_bn(net, only=["2"])
    assert type(net[1]) is BatchNormAct2d and type(net[2]) is FrozenBatchNorm2d
    prior = nn.Sequential(PriorBatchNorm2d(C, prior=16))
    with pytest.raises(ValueError, match="PriorBatchNorm2d"):
        freeze_bn(prior)


def test_layers_without_running_statistics_are_left_with_a_warning_or_refused_when_named():
    net = nn.Sequential(nn.BatchNorm2d(C, track_running_stats=False), nn.BatchNorm2d(C))
    with pytest.warns(UserWarning, match=r"0 \(BatchNorm2d\) has no running statistics"):
        freeze_bn(net)
    assert type(net[0]) is nn.BatchNorm2d and type(net[1]) is FrozenBatchNorm2d
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze_bn(net, only=["0"])


def test_uninitialized_lazy_batchnorm_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lazy modules warn that they are experimental
        lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialized lazy parameters"):
        freeze_bn(lazy)


def test_unfreeze_directly_built_layers():
    frozen = FrozenBatchNorm2d(C, eps=1e-3, dtype=torch.float64)
    frozen.load_state_dict(trained_bn(nn.BatchNorm2d).state_dict())
    bn = unfreeze_bn(frozen)
    assert type(bn) is nn.BatchNorm2d
    assert bn.affine and bn.track_running_stats and bn.momentum == 0.1 and bn.eps == 1e-3
    assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
    assert bn.weight.dtype == torch.float64 and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_var, frozen.running_var) and bn.training == frozen.training
    x = make_x(3, "NCHW")
    with torch.no_grad():
        torch.testing.assert_close(bn.eval()(x), frozen(x), rtol=1e-13, atol=1e-13)
    generic = FrozenBatchNorm(C)
    assert unfreeze_bn(generic) is generic  # no dimensionality to give back


def test_unfreeze_refuses_an_affine_false_layer_whose_frozen_affine_changed():
    net = nn.Sequential(nn.BatchNorm2d(C, affine=False), nn.BatchNorm2d(C))
    freeze_bn(net)
    with torch.no_grad():
        net[0].weight.fill_(2.0)
    with pytest.raises(ValueError, match="affine=False"):
        unfreeze_bn(net)
    assert type(net[1]) is FrozenBatchNorm2d  # nothing was changed
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    unfreeze_bn(net)
    assert type(net[0]) is nn.BatchNorm2d and net[0].weight is None


def test_unfreeze_after_moving_the_frozen_model_takes_the_moved_tensors():
    net = nn.Sequential(nn.BatchNorm2d(C))
    param = net[0].weight
    freeze_bn(net).double()  # buffers of the frozen layer are replaced by float64 copies
    bn = unfreeze_bn(net)[0]
    assert bn.weight is param and bn.weight.dtype == torch.float64
    assert bn.running_mean.dtype == torch.float64

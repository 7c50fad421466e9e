"""PriorBatchNorm / convert_to_prior_bn against a direct float64 computation of the mixed
statistics (Schneider et al. 2020), plain BN in train mode, and state-dict round trips."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnscope.nn import (
    PriorBatchNorm,
    PriorBatchNorm1d,
    PriorBatchNorm2d,
    PriorBatchNorm3d,
    PriorSyncBatchNorm,
    convert_to_prior_bn,
    revert_prior_bn,
)
from bnscope.nn_prior import prior_weight

C = 3
SPATIAL = {"NC": (), "NCL": (5,), "NCHW": (3, 4), "NCDHW": (2, 3, 2)}
BN_FOR = {"NC": nn.BatchNorm1d, "NCL": nn.BatchNorm1d, "NCHW": nn.BatchNorm2d}
BN_FOR["NCDHW"] = nn.BatchNorm3d
PRIOR_FOR = {nn.BatchNorm1d: PriorBatchNorm1d, nn.BatchNorm2d: PriorBatchNorm2d}
PRIOR_FOR[nn.BatchNorm3d] = PriorBatchNorm3d
PRIORS = [0.0, 1.0, 16.0, 1000.0, math.inf]


def make_x(batch: int, layout: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Data far from the source statistics: shifted and scaled per channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, C, *SPATIAL[layout]), generator=gen, dtype=torch.float64)
    cshape = (1, C) + (1,) * len(SPATIAL[layout])
    x = x * torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).view(cshape)
    return (x + torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64).view(cshape)).to(dtype)


def source_bn(cls: type[nn.Module], dtype=torch.float64, seed: int = 1) -> nn.Module:
    """A BN layer with made-up source statistics and affine parameters, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    bn = cls(C, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.num_batches_tracked.fill_(37)
    return bn.eval()


def reference(x: torch.Tensor, bn: nn.Module, prior: float) -> torch.Tensor:
    """The mixed statistics and the normalization, written out in float64."""
    xd = x.double()
    dims = [0, *range(2, x.ndim)]
    n = x.shape[0]
    lam = 1.0 if math.isinf(prior) else prior / (prior + n)
    mu_s, var_s = bn.running_mean.double(), bn.running_var.double()
    mu = lam * mu_s + (1 - lam) * xd.mean(dims)
    var = lam * var_s + (1 - lam) * xd.var(dims, unbiased=False)
    shape = (1, C) + (1,) * (x.ndim - 2)
    y = (xd - mu.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return y * bn.weight.double().view(shape) + bn.bias.double().view(shape)


def state(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bn.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize("prior", PRIORS)
def test_eval_matches_float64_mixture(layout, prior):
    x = make_x(6, layout)
    plain = source_bn(BN_FOR[layout])
    bn = convert_to_prior_bn(copy.deepcopy(plain), prior)
    assert isinstance(bn, PRIOR_FOR[BN_FOR[layout]]) and bn.prior == prior
    before = state(bn)
    y = bn(x)
    torch.testing.assert_close(y, reference(x, plain, prior), rtol=1e-12, atol=1e-12)
    assert_bit_identical(state(bn), before)  # the stored statistics are only read


@pytest.mark.parametrize("layout", ["NC", "NCHW"])
@pytest.mark.parametrize("prior", PRIORS)
def test_float32_module_against_float64(layout, prior):
    x = make_x(8, layout, torch.float32, seed=3)
    bn = convert_to_prior_bn(source_bn(BN_FOR[layout], torch.float32), prior)
    y = bn(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, bn, prior), rtol=1e-5, atol=1e-5)


def test_the_two_ends_are_batch_statistics_and_the_source_model():
    x = make_x(5, "NCHW")
    plain = source_bn(nn.BatchNorm2d)
    zero = PriorBatchNorm2d(C, 0, dtype=torch.float64)
    zero.load_state_dict(plain.state_dict())
    zero.eval()
    batch = F.batch_norm(x, None, None, plain.weight, plain.bias, True, 0.0, plain.eps)
    torch.testing.assert_close(zero(x), batch, rtol=1e-12, atol=1e-12)
    source = convert_to_prior_bn(copy.deepcopy(plain), math.inf)
    assert torch.equal(source(x), plain(x))  # the very same computation as the source model


def test_prior_weight_is_lambda_of_sample_count():
    assert prior_weight(16, 16) == 0.5 and prior_weight(0, 8) == 0.0
    assert prior_weight(math.inf, 8) == 1.0 and prior_weight(0, 0) == 1.0
    # n is the sample count, not samples x positions: the same lambda for every image size
    bn = convert_to_prior_bn(source_bn(nn.BatchNorm2d), 12.0)
    for hw in (1, 4, 9):
        x = torch.randn(4, C, hw, hw, dtype=torch.float64)
        torch.testing.assert_close(bn(x), reference(x, bn, 12.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NCDHW"])
def test_train_mode_is_plain_batchnorm(layout):
    plain = source_bn(BN_FOR[layout]).train()
    bn = convert_to_prior_bn(copy.deepcopy(plain), 16).train()
    for seed in range(3):
        x = make_x(6, layout, seed=seed)
        assert torch.equal(bn(x), plain(x))
    assert_bit_identical(state(bn), state(plain))  # EMA updates and counts as BatchNorm's


def test_gradients_flow_through_the_batch_statistics():
    x = make_x(4, "NCHW", seed=5).requires_grad_(True)
    bn = convert_to_prior_bn(source_bn(nn.BatchNorm2d), 8.0)
    (bn(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (reference(x2, bn, 8.0) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    assert bn.weight.grad is not None


def test_one_value_per_channel_and_empty_batches():
    bn = convert_to_prior_bn(source_bn(nn.BatchNorm1d), 0)
    one = torch.randn(1, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="one value per channel"):
        bn(one)
    bn.prior = 4
    torch.testing.assert_close(bn(one), reference(one, bn, 4), rtol=1e-12, atol=1e-12)
    assert bn(torch.empty(0, C, dtype=torch.float64)).shape == (0, C)
    # one sample with spatial positions has a batch variance: fine with N = 0
    img = torch.randn(1, C, 4, 4, dtype=torch.float64)
    bn2 = convert_to_prior_bn(source_bn(nn.BatchNorm2d), 0)
    torch.testing.assert_close(bn2(img), reference(img, bn2, 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_normalized_in_float32(dtype):
    bn = convert_to_prior_bn(source_bn(nn.BatchNorm2d, torch.float32), 16)
    x = make_x(8, "NCHW", torch.float32).to(dtype)
    y = bn(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(x, bn, 16), rtol=2e-2, atol=2e-2)


def test_without_running_stats_eval_uses_batch_statistics():
    bn = nn.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64).eval()
    pbn = convert_to_prior_bn(copy.deepcopy(bn), 16)
    x = make_x(4, "NCHW")
    assert torch.equal(pbn(x), bn(x))


# ----------------------------------------------------------------------------- conversion


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=None, eps=1e-3),
        nn.SyncBatchNorm(5),
    )


def test_state_dict_round_trips_and_same_objects():
    net = small_net()
    net(torch.randn(8, 3, 8, 8))  # some running statistics
    original = {k: v.clone() for k, v in net.state_dict().items()}
    modules = {name: m for name, m in net.named_modules()}
    params = {id(p) for p in net.parameters()}
    buffers = {id(b) for b in net.buffers()}
    net = convert_to_prior_bn(net, 32)
    assert type(net[1]) is PriorBatchNorm2d and type(net[5]) is PriorBatchNorm1d
    assert type(net[6]) is PriorSyncBatchNorm and isinstance(net[6], nn.SyncBatchNorm)
    assert net[5].momentum is None and net[5].eps == 1e-3 and net[1].training
    assert {id(p) for p in net.parameters()} == params and {id(b) for b in net.buffers()} == buffers
    assert_bit_identical(net.state_dict(), original)  # same keys, same values
    net.load_state_dict(original)  # the converted model loads the original checkpoint
    fresh = small_net()
    fresh.load_state_dict(net.state_dict())  # and its state dict loads into the original model
    net = revert_prior_bn(net)
    assert net[1] is modules["1"] and net[5] is modules["5"] and net[6] is modules["6"]
    assert type(net[6]) is nn.SyncBatchNorm
    assert_bit_identical(net.state_dict(), original)


def test_converted_model_predicts_with_the_prior_and_reverts_to_the_source():
    net = small_net()
    net(torch.randn(16, 3, 8, 8))
    net.eval()
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    source_out = net(x)
    conv = convert_to_prior_bn(copy.deepcopy(net), 0)
    with torch.no_grad():
        batch_out = conv(x)
    assert not torch.allclose(batch_out, source_out, atol=1e-3)
    conv = convert_to_prior_bn(conv, math.inf)  # an earlier conversion takes the new prior
    assert conv[1].prior == math.inf
    assert torch.equal(conv(x), source_out)
    assert torch.equal(revert_prior_bn(conv)(x), source_out)


def test_directly_built_modules_revert_to_plain_classes():
    for cls, plain in [
        (PriorBatchNorm1d, nn.BatchNorm1d),
        (PriorBatchNorm2d, nn.BatchNorm2d),
        (PriorBatchNorm3d, nn.BatchNorm3d),
        (PriorSyncBatchNorm, nn.SyncBatchNorm),
    ]:
        m = cls(4, 8, momentum=0.3)
        back = revert_prior_bn(m)
        assert type(back) is plain and back.momentum == 0.3 and back.weight is m.weight
    generic = PriorBatchNorm(4, 8)
    assert revert_prior_bn(generic) is generic  # no BatchNorm class to go to
    assert generic(torch.randn(3, 4, 2, 2, 2, 2)).shape == (3, 4, 2, 2, 2, 2)


def test_sync_batchnorm_train_mode_is_sync_batchnorm_forward():
    sync = nn.SyncBatchNorm(C, dtype=torch.float64)
    prior = convert_to_prior_bn(copy.deepcopy(sync), 4)
    x = make_x(6, "NCHW")
    assert torch.equal(prior(x), sync(x))
    assert_bit_identical(state(prior), state(sync))


def test_left_alone_and_bad_input():
    class Fused(nn.BatchNorm2d):
        def forward(self, input):
            return torch.relu(super().forward(input))

    net = nn.Sequential(Fused(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="overrides forward"):
        net = convert_to_prior_bn(net, 1)
    assert type(net[0]) is Fused and type(net[1]) is PriorBatchNorm2d
    shared = nn.BatchNorm1d(3)
    twice = convert_to_prior_bn(nn.Sequential(shared, shared), 2)
    assert twice[0] is twice[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialized lazy"):
        convert_to_prior_bn(lazy, 1)
    for bad in (-1, float("nan"), True, "16", None):
        with pytest.raises(ValueError, match="prior must be a number >= 0"):
            convert_to_prior_bn(nn.BatchNorm1d(3), bad)
        with pytest.raises(ValueError, match="prior must be a number >= 0"):
            PriorBatchNorm2d(3, bad)
    bn = PriorBatchNorm2d(3, 1)
    with pytest.raises(ValueError, match="prior must be"):
        bn.prior = -0.5
    with pytest.raises(ValueError, match="expected 4D input"):
        bn.eval()(torch.randn(2, 3))
    assert "prior=1" in repr(bn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_channels_last_matches_the_cpu_reference():
    """On the GPU under fp16 autocast with channels-last input: normalized in float32, output
    in the input's dtype and memory format, the stored statistics untouched."""
    cpu = convert_to_prior_bn(source_bn(nn.BatchNorm2d, torch.float32), 16)
    bn = copy.deepcopy(cpu).cuda()
    before = state(bn)
    x = make_x(8, "NCHW", torch.float32)
    xc = x.cuda().to(memory_format=torch.channels_last).half()
    with torch.autocast("cuda", dtype=torch.float16):
        y = bn(xc)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double().cpu(), reference(xc.float().cpu(), cpu, 16),
                               rtol=1e-2, atol=1e-2)  # fmt: skip
    assert_bit_identical(state(bn), before)

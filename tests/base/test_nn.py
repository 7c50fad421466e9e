"""GhostBatchNorm / SeqNorm / convert_to_ghost against hand-written references and plain BN."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnscope.nn import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SeqNorm,
    convert_to_ghost,
    ghost_chunk_sizes,
    revert_ghost,
)

C = 3
SPATIAL = {"NC": (), "NCL": (5,), "NCHW": (3, 4), "NCDHW": (2, 3, 2)}
GHOST_FOR = {"NC": GhostBatchNorm1d, "NCL": GhostBatchNorm1d, "NCHW": GhostBatchNorm2d}
GHOST_FOR["NCDHW"] = GhostBatchNorm3d
BN_FOR = {"NC": nn.BatchNorm1d, "NCL": nn.BatchNorm1d, "NCHW": nn.BatchNorm2d}
BN_FOR["NCDHW"] = nn.BatchNorm3d


def make_x(batch: int, layout: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Data whose statistics differ from sample to sample and channel to channel."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, C, *SPATIAL[layout])
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    bshape = (batch, C) + (1,) * len(SPATIAL[layout])
    scale = torch.rand(bshape, generator=gen, dtype=torch.float64) * 3 + 0.5
    shift = torch.randn(bshape, generator=gen, dtype=torch.float64) * 4
    return (x * scale + shift).to(dtype)


def chunk_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(y.ndim) if d != 1]
    return y.mean(dims), y.var(dims, unbiased=False)


def ref_ghost(x, sizes, weight=None, bias=None, eps=1e-5):
    """Chunk by chunk with F.batch_norm (no running statistics)."""
    outs, start = [], 0
    for n in sizes:
        outs.append(F.batch_norm(x[start : start + n], None, None, weight, bias, True, 0.0, eps))
        start += n
    assert start == x.shape[0]
    return torch.cat(outs)


def randomize_affine(m: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# (layout, batch, ghost_size, expected chunk sizes in samples)
CHUNK_CASES = [
    ("NC", 12, 4, [4, 4, 4]),  # g divides B
    ("NC", 10, 4, [4, 4, 2]),  # remainder of 2 on its own
    ("NC", 9, 4, [4, 5]),  # one-sample remainder without spatial dims joins previous chunk
    ("NC", 7, 2, [2, 2, 3]),
    ("NC", 5, 8, [5]),  # g > B: one chunk
    ("NC", 6, 6, [6]),  # g == B
    ("NCL", 9, 4, [4, 4, 1]),  # one sample but L=5 values: on its own
    ("NCL", 8, 3, [3, 3, 2]),
    ("NCHW", 12, 3, [3, 3, 3, 3]),
    ("NCHW", 10, 3, [3, 3, 3, 1]),  # one sample, H*W > 1: on its own
    ("NCHW", 4, 16, [4]),
    ("NCHW", 8, 1, [1] * 8),  # g=1 is fine with spatial dims
    ("NCDHW", 7, 3, [3, 3, 1]),
    ("NCDHW", 6, 2, [2, 2, 2]),
]


@pytest.mark.parametrize(("layout", "batch", "g", "sizes"), CHUNK_CASES)
def test_each_chunk_is_standardized(layout, batch, g, sizes):
    values = math.prod(SPATIAL[layout])
    assert ghost_chunk_sizes(batch, g, values) == sizes
    x = make_x(batch, layout)
    m = GhostBatchNorm(C, g, eps=0.0, dtype=torch.float64).train()
    assert torch.equal(m.weight, torch.ones(C, dtype=torch.float64))
    assert torch.equal(m.bias, torch.zeros(C, dtype=torch.float64))
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    start = 0
    for n in sizes:
        mean, var = chunk_moments(y[start : start + n])
        torch.testing.assert_close(mean, torch.zeros(C, dtype=mean.dtype), atol=1e-10, rtol=0)
        torch.testing.assert_close(var, torch.ones(C, dtype=var.dtype), atol=1e-10, rtol=0)
        start += n
    # the aliases give the same result
    ya = GHOST_FOR[layout](C, g, eps=0.0, dtype=torch.float64).train()(x)
    torch.testing.assert_close(ya, y, atol=0, rtol=0)


@pytest.mark.parametrize("layout", list(SPATIAL))
def test_float32_chunks_and_affine_match_reference(layout):
    x = make_x(11, layout, torch.float32, seed=3)
    values = math.prod(SPATIAL[layout])
    m = GhostBatchNorm(C, 4, eps=1e-3)
    randomize_affine(m)
    sizes = ghost_chunk_sizes(11, 4, values)
    want = ref_ghost(x, sizes, m.weight, m.bias, eps=1e-3)
    torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(list(SPATIAL)),
    batch=st.integers(2, 19),
    g=st.integers(1, 22),
    momentum=st.sampled_from([0.1, 0.5, None]),
    seed=st.integers(0, 2**16),
)
def test_matches_chunkwise_reference_and_plain_bn_buffers(layout, batch, g, momentum, seed):
    x = make_x(batch, layout, seed=seed)
    values = math.prod(SPATIAL[layout])
    m = GhostBatchNorm(C, g, momentum=momentum, dtype=torch.float64)
    bn = BN_FOR[layout](C, momentum=momentum, dtype=torch.float64)
    randomize_affine(m, seed)
    bn.load_state_dict(m.state_dict())
    if g * values == 1:
        with pytest.raises(ValueError, match="one value per channel"):
            m(x)
        return
    sizes = ghost_chunk_sizes(batch, g, values)
    assert sum(sizes) == batch
    assert all(n * values > 1 for n in sizes)
    torch.testing.assert_close(m(x), ref_ghost(x, sizes, m.weight, m.bias), atol=1e-10, rtol=1e-10)
    bn(x)
    for key, value in bn.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_equal_plain_bn_over_steps(layout, momentum):
    torch.manual_seed(0)
    m = GHOST_FOR[layout](C, 3, momentum=momentum)
    bn = BN_FOR[layout](C, momentum=momentum)
    randomize_affine(m)
    bn.load_state_dict(m.state_dict())
    # batch sizes cover: g divides, remainder, one-sample remainder, g > B
    for step, batch in enumerate([9, 10, 7, 2, 13]):
        x = make_x(batch, layout, torch.float32, seed=10 + step)
        m(x)
        bn(x)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked) == 5
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(m, key), getattr(bn, key), atol=1e-7, rtol=1e-7)
    # they moved away from init, so this is not a trivial comparison
    assert not torch.allclose(m.running_var, torch.ones(C))


def test_cumulative_average_is_mean_of_batch_statistics():
    """momentum=None: the running mean is the plain average of the 4 whole-batch means."""
    m = GhostBatchNorm2d(C, 2, momentum=None, dtype=torch.float64)
    xs = [make_x(n, "NCHW", seed=n) for n in (5, 6, 7, 8)]
    for x in xs:
        m(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(m.running_mean, means.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.running_var, variances.mean(0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", list(SPATIAL))
def test_one_chunk_is_exactly_batchnorm(layout):
    m = GhostBatchNorm(C, 64)
    bn = BN_FOR[layout](C)
    randomize_affine(m)
    bn.load_state_dict(m.state_dict())
    x = make_x(9, layout, torch.float32)
    assert torch.equal(m(x), bn(x))
    assert torch.equal(m.running_var, bn.running_var)


@pytest.mark.parametrize("layout", list(SPATIAL))
def test_eval_is_plain_batchnorm_any_batch(layout):
    m = GHOST_FOR[layout](C, 2)
    bn = BN_FOR[layout](C)
    randomize_affine(m)
    for step in range(3):
        m(make_x(8, layout, torch.float32, seed=step))
    bn.load_state_dict(m.state_dict())
    m.eval()
    bn.eval()
    before = copy.deepcopy(m.state_dict())
    for batch in (1, 2, 5, 17):
        x = make_x(batch, layout, torch.float32, seed=batch)
        assert torch.equal(m(x), bn(x))
    for key, value in before.items():
        assert torch.equal(m.state_dict()[key], value)


def test_without_running_stats():
    m = GhostBatchNorm2d(C, 2, track_running_stats=False)
    bn = nn.BatchNorm2d(C, track_running_stats=False)
    assert m.running_mean is None and m.num_batches_tracked is None
    assert set(m.state_dict()) == set(bn.state_dict()) == {"weight", "bias"}
    x = make_x(6, "NCHW", torch.float32)
    # training: ghost chunks
    torch.testing.assert_close(m(x), ref_ghost(x, [2, 2, 2]), atol=1e-5, rtol=1e-5)
    # evaluation: statistics of the whole batch, as BatchNorm does
    m.eval()
    bn.eval()
    torch.testing.assert_close(m(x), bn(x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(m(x), ref_ghost(x, [2, 2, 2]), atol=1e-3)


@pytest.mark.parametrize(
    ("shape", "g"),
    [((7, 2, 3), 3), ((5, 2), 2), ((6, 2, 2, 2), 4), ((4, 2, 2, 1, 2), 1), ((3, 2), 8)],
)
def test_gradcheck_training(shape, g):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    x.requires_grad_(True)
    m = GhostBatchNorm(2, g, dtype=torch.float64)
    w = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_(True)

    def f(inp, weight, bias):
        return torch.func.functional_call(m, {"weight": weight, "bias": bias}, (inp,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eps_zero_buffers_equal_plain_bn():
    """eps only enters the output; the buffer update equals BN's (which refuses eps=0)."""
    m = GhostBatchNorm2d(C, 3, eps=0.0, dtype=torch.float64)
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    for batch in (7, 2):  # ghost chunks, then a single chunk (g > B)
        x = make_x(batch, "NCHW", seed=batch)
        m(x)
        bn(x)
    for key, value in bn.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key
    with pytest.raises(ValueError, match="one value per channel"):
        GhostBatchNorm(C, 3, eps=0.0)(torch.randn(1, C))


def test_gradients_match_chunkwise_reference():
    x = make_x(11, "NCHW", seed=5).requires_grad_(True)
    m = GhostBatchNorm2d(C, 4, dtype=torch.float64)
    randomize_affine(m)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (m(x) * upstream).sum().backward()
    got = (x.grad.clone(), m.weight.grad.clone(), m.bias.grad.clone())
    x.grad = None
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    (ref_ghost(x, [4, 4, 3], w, b) * upstream).sum().backward()
    for a, e in zip(got, (x.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_low_precision_keeps_dtype():
    x = make_x(10, "NCHW", torch.float32)
    m = GhostBatchNorm2d(C, 4)
    want = m(x)
    got = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------- SeqNorm


@pytest.mark.parametrize("layout", ["NC", "NCL", "NCHW", "NCDHW"])
def test_seqnorm_is_groupnorm_then_ghost_bn(layout):
    x = make_x(10, layout, seed=2).repeat(1, 2, *([1] * len(SPATIAL[layout])))  # 6 channels
    x = x + torch.arange(6, dtype=x.dtype).view(1, 6, *([1] * len(SPATIAL[layout])))
    s = SeqNorm(6, 3, 4, eps=1e-4, dtype=torch.float64)
    randomize_affine(s)
    assert list(s.gn.parameters()) == [] and list(s.gn.buffers()) == []
    assert set(s.state_dict()) == {
        "gbn.weight",
        "gbn.bias",
        "gbn.running_mean",
        "gbn.running_var",
        "gbn.num_batches_tracked",
    }
    # GroupNorm by hand: per sample, per group of 2 channels, biased variance
    grouped = x.reshape(10, 3, -1)
    var, mean = torch.var_mean(grouped, dim=2, correction=0, keepdim=True)
    h = ((grouped - mean) / torch.sqrt(var + 1e-4)).reshape(x.shape)
    sizes = ghost_chunk_sizes(10, 4, math.prod(SPATIAL[layout]))
    want = ref_ghost(h, sizes, s.gbn.weight, s.gbn.bias, eps=1e-4)
    torch.testing.assert_close(s(x), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        s.gbn.running_mean, 0.1 * h.mean([d for d in range(h.ndim) if d != 1])
    )
    s.eval()
    bn_eval = F.batch_norm(
        h, s.gbn.running_mean, s.gbn.running_var, s.gbn.weight, s.gbn.bias, False, 0.0, 1e-4
    )
    torch.testing.assert_close(s(x[:1]), bn_eval[:1], atol=1e-10, rtol=1e-10)


def test_seqnorm_bad_groups():
    with pytest.raises(ValueError, match="num_groups"):
        SeqNorm(6, 4, 2)
    with pytest.raises(ValueError, match="num_groups"):
        SeqNorm(6, 0, 2)


# --------------------------------------------------------------------------- conversion


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.block = nn.Sequential(nn.BatchNorm2d(4, affine=False), nn.ReLU())
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 5)
        self.bn1 = nn.BatchNorm1d(5, eps=1e-3)
        self.bn3 = nn.BatchNorm3d(2, dtype=torch.float64)

    def forward(self, x):
        h = self.bn_nostats(self.block(self.bn2(self.conv(x))))
        return self.bn1(self.fc(h.mean((2, 3))))


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    randomize_affine(net, seed)
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, 3, 4, 4) * 2 + 1)
        net.bn3(torch.randn(4, 2, 2, 2, 2, dtype=torch.float64))
    net.bn1.weight.requires_grad_(False)
    net.block.eval()  # mixed training flags
    return net


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = (t.detach().clone(), t.requires_grad)
    return out


def test_convert_and_revert_round_trip():
    net = trained_net()
    before = snapshot(net)
    keys = list(net.state_dict())
    originals = {
        n: m for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    params = {n: p for n, p in net.named_parameters()}
    flags = {n: m.training for n, m in net.named_modules()}

    out = convert_to_ghost(net, 2)
    assert out is net
    kinds = {n: type(m) for n, m in net.named_modules()}
    assert kinds["bn2"] is GhostBatchNorm2d and kinds["block.0"] is GhostBatchNorm2d
    assert kinds["bn1"] is GhostBatchNorm1d and kinds["bn3"] is GhostBatchNorm3d
    assert kinds["bn_nostats"] is GhostBatchNorm2d and kinds["conv"] is nn.Conv2d
    assert all(m.ghost_size == 2 for m in net.modules() if isinstance(m, GhostBatchNorm))
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert list(net.state_dict()) == keys
    for (
        name,
        p,
    ) in net.named_parameters():  # the very same Parameter objects: optimizers keep working
        assert p is params[name]
    for name, (value, req) in snapshot(net).items():
        assert torch.equal(value, before[name][0]) and value.dtype == before[name][0].dtype
        assert req == before[name][1]
    assert net.bn2.momentum is None and net.bn1.eps == 1e-3
    assert net.block[0].weight is None and not net.bn_nostats.track_running_stats
    assert net.bn3.running_mean.dtype == torch.float64

    net.train()
    with torch.no_grad():
        net(torch.randn(9, 3, 4, 4))  # ghost training step changes the buffers
    net.block.eval()
    after_step = snapshot(net)

    back = revert_ghost(net)
    assert back is net
    for name, module in net.named_modules():
        if name in originals:
            assert module is originals[name]
    assert type(net.bn2) is nn.BatchNorm2d and type(net.bn1) is nn.BatchNorm1d
    assert type(net.bn3) is nn.BatchNorm3d
    assert not any(isinstance(m, GhostBatchNorm) for m in net.modules())
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert list(net.state_dict()) == keys
    for name, (value, req) in snapshot(net).items():
        assert torch.equal(value, after_step[name][0]) and req == after_step[name][1]
    assert int(net.bn2.num_batches_tracked) == int(before["bn2.num_batches_tracked"][0]) + 1


def test_state_dicts_load_strictly_both_ways():
    ghost = convert_to_ghost(trained_net(0), 3)
    plain = Net()
    plain.load_state_dict(ghost.state_dict(), strict=True)
    for key, value in ghost.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    other = trained_net(7)
    ghost.load_state_dict(other.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value)


def test_root_is_batchnorm_and_device_dtype_moves():
    bn = nn.BatchNorm2d(4).double()
    bn.eval()
    g = convert_to_ghost(bn, 5)
    assert type(g) is GhostBatchNorm2d and g is not bn and not g.training
    assert g.weight is bn.weight and g.running_mean is bn.running_mean
    g = g.float()  # buffers are replaced by .float(); revert must pick up the new ones
    back = revert_ghost(g)
    assert back is bn and type(back) is nn.BatchNorm2d and not back.training
    assert back.running_mean.dtype == torch.float32 and back.weight.dtype == torch.float32


def test_sync_batchnorm_and_shared_modules():
    sync = nn.SyncBatchNorm(4, process_group="pg-sentinel")
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(sync, shared, nn.Sequential(shared))
    convert_to_ghost(model, 2)
    assert type(model[0]) is GhostBatchNorm
    assert model[1] is model[2][0] and type(model[1]) is GhostBatchNorm1d
    assert len(list(model.parameters())) == 4  # still shared
    revert_ghost(model)
    assert model[0] is sync and type(model[0]) is nn.SyncBatchNorm
    assert model[0].process_group == "pg-sentinel"
    assert model[1] is shared and model[2][0] is shared


def test_convert_skips_custom_forward_and_existing_ghosts():
    class FusedBNReLU(nn.BatchNorm2d):
        def forward(self, x):
            return F.relu(super().forward(x))

    seq = SeqNorm(4, 2, 3)
    model = nn.Sequential(FusedBNReLU(4), seq, nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="overrides forward"):
        convert_to_ghost(model, 8)
    assert type(model[0]) is FusedBNReLU
    assert model[1].gbn.ghost_size == 3  # built directly: keeps its ghost size
    assert model[2].ghost_size == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_ghost(model, 4)  # converting again sets the new size, no double wrapping
    assert type(model[2]) is GhostBatchNorm2d and model[2].ghost_size == 4
    assert model[1].gbn.ghost_size == 3
    revert_ghost(model)
    assert type(model[2]) is nn.BatchNorm2d
    assert type(model[1].gbn) is GhostBatchNorm  # no BatchNorm counterpart: left alone


def test_revert_directly_built_alias():
    model = nn.Sequential(GhostBatchNorm2d(4, 2, eps=1e-3, momentum=0.3), GhostBatchNorm(4, 2))
    randomize_affine(model)
    model(make_x(6, "NCHW", torch.float32).repeat(1, 2, 1, 1)[:, :4])
    sd = copy.deepcopy(model.state_dict())
    revert_ghost(model)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is GhostBatchNorm
    assert model[0].eps == 1e-3 and model[0].momentum == 0.3
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value)
    assert model[0].weight.device.type == "cpu"


def test_lazy_batchnorm():
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="lazy"):
        convert_to_ghost(lazy, 2)
    lazy(torch.randn(4, 3, 2, 2))
    convert_to_ghost(lazy, 2)
    assert type(lazy[0]) is GhostBatchNorm2d


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, "4", True, None])
def test_bad_ghost_size(bad):
    with pytest.raises(ValueError, match="ghost_size"):
        GhostBatchNorm(4, bad)
    with pytest.raises(ValueError, match="ghost_size"):
        GhostBatchNorm2d(4, bad)
    with pytest.raises(ValueError, match="ghost_size"):
        SeqNorm(4, 2, bad)
    with pytest.raises(ValueError, match="ghost_size"):
        convert_to_ghost(nn.Sequential(nn.BatchNorm1d(4)), bad)
    with pytest.raises(ValueError, match="ghost_size"):
        ghost_chunk_sizes(10, bad)
    m = GhostBatchNorm(4, 2)
    with pytest.raises(ValueError, match="ghost_size"):
        m.ghost_size = bad
    assert m.ghost_size == 2


def test_input_dims_and_single_value_chunks():
    with pytest.raises(ValueError, match="4D"):
        GhostBatchNorm2d(3, 2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="2D or 3D"):
        GhostBatchNorm1d(3, 2)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="5D"):
        GhostBatchNorm3d(3, 2)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2D"):
        GhostBatchNorm(3, 2)(torch.randn(3))
    with pytest.raises(ValueError, match="one value per channel"):
        GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    # GhostBatchNorm1d(3, 1) on [N, C, L] with L > 1 is fine; eval takes a batch of 1
    GhostBatchNorm1d(3, 1)(torch.randn(4, 3, 2))
    GhostBatchNorm1d(3, 1).eval()(torch.randn(1, 3))
    assert "ghost_size=1" in repr(GhostBatchNorm1d(3, 1))

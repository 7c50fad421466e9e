"""The collection engine's cost and discipline: tensor operations per BN call, no host reads
inside the loops (counted with torch.profiler on CPU, where a scalar read shows up as
``aten::_local_scalar_dense``), block merges, periodic checks, ill-conditioned layers found
after the first batch, and what happens at the block boundaries."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import bnscope
from bnscope.engine import capture, sync
from bnscope.errors import DataError

from ..statecheck import assert_same_state, snapshot

F64 = torch.float64
READ_EVENTS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


@pytest.fixture(autouse=True)
def _no_timed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Periodic checks are time-based: a slow machine must not change what is counted."""
    monkeypatch.setattr(capture, "CHECK_SECONDS", float("inf"))


class Block(nn.Module):
    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def small_net(classes: int = 3) -> nn.Sequential:
    """4 BN2d layers and a BN1d head: 5 native BN layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        Block(3, 8), Block(8, 8), Block(8, 8), Block(8, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8),
        nn.Linear(8, classes),
    )  # fmt: skip


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def images(n: int, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def labelled(n: int, batch: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 100)
    return [(x, torch.randint(0, 3, (batch,), generator=g)) for x in images(n, batch, seed)]


def plain_loop(model: nn.Module, data: list) -> None:
    model.train()
    with torch.no_grad():
        for batch in data:
            model(batch[0] if isinstance(batch, tuple) else batch)


def events(fn, model: nn.Module, data: list) -> tuple[collections.Counter, int]:
    """Profiler event names (nested ones included) of ``fn(model, data)`` and bnscope's read
    points."""
    reads = sync.READS
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(model, data)
    return collections.Counter(e.name for e in prof.events()), sync.READS - reads


def scalar_reads(counter: collections.Counter) -> int:
    return sum(counter[name] for name in READ_EVENTS)


def test_native_bn_calls_add_at_most_4_operations_and_no_read_per_batch():
    """Steady state (past the first block of rows): the slope of profiler events against
    batches, minus the plain forward loop's, per BN call; scalar reads do not grow at all."""
    model = small_net()
    layers = bn_count(model)
    n1, n2 = capture.ROWS + 4, 2 * capture.ROWS + 4
    data = images(n2)
    run = {}
    for n in (n1, n2):
        plain, _ = events(plain_loop, copy.deepcopy(model), data[:n])
        ours, reads = events(lambda m, d: bnscope.precise_bn(m, d), copy.deepcopy(model), data[:n])
        run[n] = (sum(plain.values()), sum(ours.values()), scalar_reads(ours), reads)
    extra = (run[n2][1] - run[n1][1]) - (run[n2][0] - run[n1][0])
    per_call = extra / ((n2 - n1) * layers)
    assert per_call <= 4, per_call
    assert run[n1][2] == run[n2][2], (run[n1][2], run[n2][2])  # no scalar read per batch
    assert run[n1][3] == run[n2][3] <= 3, (run[n1][3], run[n2][3])  # read points: a constant


class CustomBN(nn.BatchNorm2d):
    """A BN subclass with its own forward (takes the exact float64 path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def test_exact_path_reads_nothing_per_batch_and_is_exact():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CustomBN(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4).to(torch.float64))  # fmt: skip
    model[3].double()
    data = [x.double() for x in images(12)]
    model[0].double()
    model[1].double()
    counts = {}
    for n in (4, 12):
        m = copy.deepcopy(model)
        c, reads = events(lambda mm, d: bnscope.precise_bn(mm, d), m, data[:n])
        counts[n] = (scalar_reads(c), reads)
    assert counts[4] == counts[12]
    m = copy.deepcopy(model)
    bnscope.precise_bn(m, data)
    with torch.no_grad():
        h = m[0](torch.cat(data))
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(m[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m[1].running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("what", ["precise", "adapt", "inspect", "ghost", "evaluate"])
def test_analyses_read_from_the_device_a_constant_number_of_times(what: str):
    model = small_net()
    fns = {
        "precise": lambda m, d: bnscope.precise_bn(m, d),
        "adapt": lambda m, d: bnscope.adapt_bn(m, d, prior=4),
        "inspect": lambda m, d: bnscope.inspect(m, d),
        "ghost": lambda m, d: bnscope.ghost_analysis(m, d, sizes=[2, 4]),
        "evaluate": lambda m, d: bnscope.evaluate_models(
            {"a": m, "b": copy.deepcopy(m)}, d, modes={"b": "batch"}
        ),
    }
    counts = {}
    for n in (3, 7):
        c, reads = events(fns[what], copy.deepcopy(model), labelled(n))
        counts[n] = (scalar_reads(c), reads)
    assert counts[3] == counts[7], counts


def test_a_periodic_check_merges_and_reads_every_block(monkeypatch: pytest.MonkeyPatch):
    """With checks due after every forward, the same statistics and the same error come out."""
    model = small_net()
    data = images(10)
    ref = copy.deepcopy(model)
    bnscope.precise_bn(ref, data)
    monkeypatch.setattr(capture, "CHECK_SECONDS", 0.0)
    checked = copy.deepcopy(model)
    reads = sync.READS
    bnscope.precise_bn(checked, data)
    assert sync.READS - reads >= 10  # one per forward
    for a, b in zip(ref.modules(), checked.modules(), strict=True):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("checks", [False, True])
def test_nan_after_merged_blocks_names_the_batch_and_the_first_layer(
    monkeypatch: pytest.MonkeyPatch, checks: bool
):
    monkeypatch.setattr(capture, "ROWS", 4)  # several merges before the bad batch
    if checks:
        monkeypatch.setattr(capture, "CHECK_SECONDS", 0.0)
    model = small_net()
    data = images(15)
    data[11] = data[11].clone()
    data[11][2, 1, 3, 3] = float("nan")
    before = snapshot(model)
    with pytest.raises(DataError, match=r"NaN or Inf reached BN layer 0\.bn in batch 11"):
        bnscope.precise_bn(model, data)
    assert_same_state(before, snapshot(model))


def test_layer_called_more_often_than_a_block_holds(monkeypatch: pytest.MonkeyPatch):
    """One forward calls a layer 5 times with ROWS = 2: its block grows, nothing is lost."""
    monkeypatch.setattr(capture, "ROWS", 2)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(5):
                x = self.bn(x) * 0.5 + 0.25
            return x

    torch.manual_seed(3)
    data = [torch.randn(6, 3) * 3 + 2 for _ in range(7)]
    model = Loop()
    rep = bnscope.precise_bn(model, data)
    inputs = []
    probe = Loop()
    probe.load_state_dict(model.state_dict())
    probe.train()
    probe.bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].double()))
    with torch.no_grad():
        for x in data:
            probe(x)
    allx = torch.cat(inputs)
    torch.testing.assert_close(model.bn.running_mean.double(), allx.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        model.bn.running_var.double(), allx.var(0, unbiased=False), rtol=1e-5, atol=1e-7
    )
    assert rep.layers[0].calls == 35 and rep.layers[0].calls_per_forward == 5


def test_a_layer_that_becomes_ill_conditioned_later_switches_to_the_exact_path(
    monkeypatch: pytest.MonkeyPatch,
):
    """Batches 0-3 are ordinary, then the channel mean jumps to 1e4 sigma: the periodic check
    moves the layer to the float64 path, and its variance stays within 1e-6 (log ratio)."""
    monkeypatch.setattr(capture, "ROWS", 2)
    monkeypatch.setattr(capture, "CHECK_SECONDS", 0.0)
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(64, 2, 3, generator=g, dtype=F64) for _ in range(12)]
    data = [(x + (1e4 if i >= 4 else 0.0)).float() for i, x in enumerate(data)]
    bn = nn.BatchNorm1d(2)
    bnscope.precise_bn(bn, data)
    allx = torch.cat(data).double()
    var, mean = torch.var_mean(allx, dim=(0, 2), correction=0)
    assert float((bn.running_var.double() / var).log().abs().max()) < 1e-6
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-7, atol=1e-3)


def test_first_batch_ill_conditioned_layer_is_exact_from_the_start():
    """|mean|/std = 1e4 from batch 0: the first forward is repeated for that layer on the
    exact path, so its statistics are exact (other layers are not counted twice)."""
    torch.manual_seed(5)
    x = torch.randn(128, 2, 4, 4) + torch.tensor([1e4, 0.0]).view(1, 2, 1, 1)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    rep = bnscope.precise_bn(model, list(torch.split(x, 16)))
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert float((model[0].running_var.double() / var).log().abs().max()) < 1e-6
    assert [r.calls for r in rep.layers] == [8, 8]
    assert [r.samples for r in rep.layers] == [128, 128]


def test_blocks_of_different_call_sizes_pool_exactly():
    """Calls with different element counts (a short last batch, two resolutions) fill separate
    blocks; the pooled statistics equal float64 pooling of everything."""
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(3)
    data = [torch.randn(5, 3, 4, 4) * 2, torch.randn(5, 3, 2, 2) + 1, torch.randn(2, 3, 4, 4)]
    data = data * 3
    bnscope.precise_bn(bn, data)
    num = sum(x.double().sum((0, 2, 3)) for x in data)
    cnt = sum(x.numel() // 3 for x in data)
    mean = num / cnt
    var = sum(((x.double() - mean.view(1, 3, 1, 1)) ** 2).sum((0, 2, 3)) for x in data) / cnt
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-7)


def test_the_kernel_is_checked_on_the_first_forward():
    """A layer keeps the fast path only when its kernel reproduces float64 batch moments of the
    first forward. PyTorch's CPU kernel for channels-last bfloat16 inputs accumulates in
    float32 and is about 1e-5 off here: that layer takes the exact path, and its statistics
    are exact; the same layer on float32 NCHW inputs keeps the kernel's moments."""
    from bnscope.engine.collect import collect

    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 8, 1), nn.BatchNorm2d(8))  # fmt: skip
    data = [torch.randn(16, 3, 16, 16) * 2 + 3 for _ in range(3)]
    plain = collect(copy.deepcopy(model), data)
    assert not plain.layers["1"].exact_path
    fast = collect(copy.deepcopy(model), data, amp="bf16", channels_last=True)
    assert fast.layers["1"].exact_path

    m = copy.deepcopy(model)
    bnscope.precise_bn(m, data, amp="bf16", channels_last=True)
    inputs: list[torch.Tensor] = []
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last)
    probe[1].momentum = 0.0
    probe[1].register_forward_pre_hook(lambda mod, a: inputs.append(a[0].double()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in data:
            probe(x.to(memory_format=torch.channels_last))
    var, mean = torch.var_mean(torch.cat(inputs), dim=(0, 2, 3), correction=0)
    assert float((m[1].running_var.double() / var).log().abs().max()) < 1e-6
    assert float(((m[1].running_mean.double() - mean).abs() / var.sqrt()).max()) < 1e-6

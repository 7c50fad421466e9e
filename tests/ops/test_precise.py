"""Precise BN against float64 references of torch.cat(all data), and state restoration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnscope.engine.capture import BNCapture
from bnscope.errors import DataError, UsageError
from bnscope.ops.precise import (
    INIT_WEIGHT_GONE,
    cumulative_tracked,
    precise_bn,
    tracked_advance,
)
from bnscope.ops.static import WARMUP_WEIGHT, static_inspect

from ..statecheck import assert_same_state, snapshot

SPLIT = (2, 2, 4, 8, 16, 32, 64)
#: the buffers precise_bn writes in an updated layer
STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batches_of(x: torch.Tensor, sizes=SPLIT) -> list[torch.Tensor]:
    out, start = [], 0
    for s in sizes:
        out.append(x[start : start + s])
        start += s
    assert start == x.shape[0]
    return out


def ref_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(h.ndim) if d != 1]
    hd = h.double()
    return hd.mean(dims), hd.var(dims, unbiased=False)


class Pre(nn.Module):
    """A fixed linear map before BN so the BN input is not the raw data."""

    def __init__(self, ndim: int, c_in: int, c: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(ndim)
        self.f = conv(c_in, c, 1) if conv else nn.Linear(c_in, c)

    def forward(self, x):
        return self.f(x)


CASES = {
    "bn1d_NC": (nn.BatchNorm1d, (128, 5), 0),
    "bn1d_NCL": (nn.BatchNorm1d, (128, 5, 7), 1),
    "bn2d": (nn.BatchNorm2d, (128, 5, 6, 4), 2),
    "bn3d": (nn.BatchNorm3d, (128, 5, 3, 4, 2), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_population_stats_match_reference_any_split(case):
    bn_cls, shape, ndim = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 2
    model = nn.Sequential(Pre(ndim, 5, 6), bn_cls(6), nn.ReLU())
    with torch.no_grad():
        mu, var = ref_stats(model[0](x))
    results = []
    for sizes in (SPLIT, (128,), (64, 64), (100, 27, 1) if ndim else (100, 26, 2)):
        m = nn.Sequential(Pre(ndim, 5, 6), bn_cls(6), nn.ReLU())
        m.load_state_dict(model.state_dict())
        rep = precise_bn(m, batches_of(x, sizes))
        torch.testing.assert_close(m[1].running_mean.double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m[1].running_var.double(), var, rtol=1e-5, atol=1e-7)
        assert rep.layers[0].status == "updated"
        assert rep.layers[0].samples == 128
        results.append(m[1].running_var.clone())
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=0)


def test_huge_mean_channel():
    """|mean|/std = 1e4 per channel: exact where float32 E[x^2]-E[x]^2 goes negative."""
    torch.manual_seed(1)
    x = torch.randn(256, 3, 4, 4) + torch.tensor([1e4, -1e4, 0.0]).view(1, 3, 1, 1)
    bn = nn.BatchNorm2d(3)
    precise_bn(bn, batches_of(x, (32,) * 8))
    mu, var = ref_stats(x)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=0)
    assert float((bn.running_var.double() / var).log().abs().max()) < 1e-6
    torch.testing.assert_close(bn.running_mean.double(), mu, rtol=1e-7, atol=1e-3)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_layer_called_twice_pools_both_calls_and_unused_layer_kept():
    torch.manual_seed(2)
    m = Twice()
    m.unused.running_mean.fill_(3.0)
    x = torch.randn(96, 4) * 2
    with torch.no_grad():
        both = torch.cat([m.a(x), m.b(x)])
    mu, var = ref_stats(both)
    rep = precise_bn(m, batches_of(x, (10, 30, 56)))
    torch.testing.assert_close(m.bn.running_mean.double(), mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bn.running_var.double(), var, rtol=1e-5, atol=1e-7)
    layers = {r.name: r for r in rep.layers}
    assert layers["bn"].calls == 6 and layers["bn"].calls_per_forward == 2
    assert layers["unused"].status == "not-called"
    assert torch.equal(m.unused.running_mean, torch.full((4,), 3.0))
    codes = {(f.code, f.layer) for f in rep.findings}
    assert codes == {("reused", "bn"), ("not-called", "unused")}


def test_frozen_layer_recomputed_unless_only_training():
    torch.manual_seed(3)
    x = torch.randn(64, 4) + 5
    m = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    m.train()
    m[0].eval()  # frozen
    written = {f"{i}.{b}" for i in (0, 2) for b in STAT_BUFFERS}
    before = snapshot(m, skip_buffers=written)
    precise_bn(m, batches_of(x, (16, 48)))
    torch.testing.assert_close(m[0].running_mean.double(), x.double().mean(0), rtol=1e-5, atol=1e-5)
    assert m[0].training is False and m[2].training is True
    assert_same_state(before, snapshot(m, skip_buffers=written))

    m2 = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    m2[0].eval()
    rep = precise_bn(m2, batches_of(x, (16, 48)), only_training=True)
    assert torch.equal(m2[0].running_mean, torch.zeros(4))
    status = {r.name: (r.status, r.reason) for r in rep.layers}
    assert status["0"] == ("skipped", "in eval mode (only_training=True)")
    assert status["2"][0] == "updated"


def test_momentum_none_and_untracked_layers():
    torch.manual_seed(4)
    x = torch.randn(40, 3) * 4 - 1
    m = nn.Sequential(
        nn.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, track_running_stats=False)
    )
    rep = precise_bn(m, batches_of(x, (8, 32)))
    torch.testing.assert_close(
        m[0].running_var.double(), x.double().var(0, unbiased=False), rtol=1e-5, atol=0
    )
    assert m[0].momentum is None
    assert m[0].num_batches_tracked.item() == 2  # the cumulative average of 2 batches
    status = {r.name: (r.status, r.reason) for r in rep.layers}
    assert status["1"] == ("skipped", "track_running_stats=False")


def test_state_restored_after_success_except_new_stats():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    m[1].num_batches_tracked.fill_(17)
    m.train()
    m[3].eval()
    stats = {f"{i}.{b}" for i in (1, 3) for b in STAT_BUFFERS}
    before = snapshot(m, skip_buffers=stats)
    precise_bn(m, [torch.randn(8, 4) for _ in range(3)])
    assert_same_state(before, snapshot(m, skip_buffers=stats))
    assert m[1].num_batches_tracked.item() == 17 + 349  # momentum 0.1: 0.9^349 <= 2^-53


class Boom(nn.Module):
    def __init__(self, exc: type[BaseException], after: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.2)
        self.calls = 0
        self.exc = exc
        self.after = after

    def forward(self, x):
        self.calls += 1
        y = self.drop(self.bn(x))
        if self.calls > self.after:
            raise self.exc("interrupted in the middle")
        return y


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, OSError])
def test_state_identical_after_failure(exc):
    m = Boom(exc, after=2)
    m.bn.running_mean.fill_(0.25)
    m.bn.num_batches_tracked.fill_(9)
    m.eval()
    m.bn.train()
    before = snapshot(m)
    expected = DataError if exc is RuntimeError else exc
    with pytest.raises(expected):
        precise_bn(m, [torch.randn(4, 3) for _ in range(5)])
    assert_same_state(before, snapshot(m))


def test_capture_restores_on_interrupt_directly():
    m = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
    before = snapshot(m)
    with pytest.raises(KeyboardInterrupt), BNCapture(m):
        assert m[0].momentum == 1.0 and m[1].training is False
        raise KeyboardInterrupt
    assert_same_state(before, snapshot(m))


def test_dropout_in_eval_mode_during_collection():
    """With dropout active the stats of the layer after it would change; they must not."""
    torch.manual_seed(6)
    x = torch.randn(64, 8) + 1
    m = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(8))
    m.train()
    precise_bn(m, [x])
    torch.testing.assert_close(m[1].running_mean.double(), x.double().mean(0), rtol=1e-5, atol=1e-6)


def test_custom_bn_subclass_uses_exact_path():
    class MyBN(nn.BatchNorm1d):
        def forward(self, x):  # a custom forward: buffers may not be updated the usual way
            return super().forward(x) * 1.0

    torch.manual_seed(7)
    x = torch.randn(50, 3) * 2 + 1
    m = nn.Sequential(MyBN(3))
    precise_bn(m, batches_of(x, (7, 43)))
    torch.testing.assert_close(
        m[0].running_var.double(), x.double().var(0, unbiased=False), rtol=1e-6, atol=0
    )


def test_data_runs_out_and_batches_validation():
    m = nn.Sequential(nn.BatchNorm1d(2))
    # a list's length is known: refused before the first batch; a generator's is not: the
    # data runs out while it is read
    with pytest.raises(DataError, match="batches=5, but the data holds 3 batches"):
        precise_bn(m, [torch.randn(4, 2) for _ in range(3)], batches=5)
    with pytest.raises(DataError, match="ran out after 3 batches but 5 were asked for"):
        precise_bn(m, (torch.randn(4, 2) for _ in range(3)), batches=5)
    rep = precise_bn(m, [torch.randn(4, 2) for _ in range(3)], batches=2)
    assert rep.extra["batches"] == 2
    for bad in (0, -1):
        with pytest.raises(UsageError):
            precise_bn(m, [torch.randn(4, 2)], batches=bad)
    with pytest.raises(DataError, match="no batches"):
        precise_bn(m, [])


def test_nan_names_layer_and_batch():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    data = [torch.randn(4, 2), torch.randn(4, 2), torch.full((4, 2), float("nan"))]
    before = snapshot(m)
    with pytest.raises(DataError, match=r"NaN or Inf reached BN layer 1 in batch 2"):
        precise_bn(m, data)
    assert_same_state(before, snapshot(m))


def test_batch_of_one_and_shape_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(DataError, match="1 value per channel") as info:
        precise_bn(m, [torch.randn(1, 2)])
    assert "batch_size=2" in info.value.fix  # the library's parameter; the CLI shows the flag
    with pytest.raises(DataError, match=r"input 4x3.*in 0 \(Linear\)"):
        precise_bn(m, [torch.randn(4, 3)])


def test_custom_call_and_dict_batches():
    m = nn.Sequential(nn.BatchNorm1d(2))
    data = [{"feat": torch.randn(5, 2) + 3} for _ in range(2)]
    precise_bn(m, data, call=lambda model, b: model(b["feat"]))
    assert m[0].running_mean.mean() > 2


def test_progress_callback():
    seen = []
    precise_bn(
        nn.BatchNorm1d(2),
        [torch.randn(3, 2)] * 4,
        batches=3,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_syncbatchnorm_without_process_group_and_lazy_batchnorm():
    torch.manual_seed(8)
    x = torch.randn(48, 3, 5) * 2 + 0.5
    ref_var = x.double().var((0, 2), unbiased=False)
    sync = nn.Sequential(nn.SyncBatchNorm(3))
    precise_bn(sync, batches_of(x, (16, 32)))
    torch.testing.assert_close(sync[0].running_var.double(), ref_var, rtol=1e-5, atol=0)

    lazy = nn.Sequential(nn.LazyBatchNorm1d())
    lazy(torch.randn(4, 3, 5))  # initializes it (it becomes a BatchNorm1d)
    rep = precise_bn(lazy, batches_of(x, (16, 32)))
    torch.testing.assert_close(lazy[0].running_var.double(), ref_var, rtol=1e-5, atol=0)
    assert rep.layers[0].status == "updated"


def test_layers_reported_in_module_order_including_skipped():
    m = nn.Sequential(
        nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    )
    rep = precise_bn(m, [torch.randn(8, 3)])
    assert [(r.name, r.status) for r in rep.layers] == [
        ("0", "skipped"),
        ("1", "updated"),
        ("2", "updated"),
    ]


# --------------------------------------------------------------------------------------------
# num_batches_tracked after Precise BN (docs/statistics.md, section 3.1)


@pytest.mark.parametrize("m", [0.1, 0.01, 0.5, 1e-4, 0.999])
def test_tracked_advance_is_the_smallest_count_that_forgets_the_init(m):
    j = tracked_advance(m, 0.0)
    assert (1 - m) ** j <= INIT_WEIGHT_GONE < (1 - m) ** (j - 1)


@pytest.mark.parametrize(("m", "lam"), [(0.1, 0.3), (0.01, 0.5), (0.1, 1e-9), (0.3, 0.7)])
def test_tracked_advance_with_a_prior_never_understates_the_init_weight(m, lam):
    j = tracked_advance(m, lam)
    assert (1 - m) ** j >= lam > (1 - m) ** (j + 1)


def test_tracked_advance_edge_momenta():
    assert tracked_advance(0.1, 0.0) == 349 and tracked_advance(0.01, 0.0) == 3656
    assert tracked_advance(1.0, 0.0) == 1 and tracked_advance(1.0, 0.5) == 0
    assert tracked_advance(0.0, 0.0) == 0  # an EMA that never moves: no count says more
    assert tracked_advance(None, 0.0) == 0 and tracked_advance(1.5, 0.0) == 0
    assert tracked_advance(1e-30, 0.0) == 2**63 - 1  # saturates
    assert tracked_advance(1e-30, 0.5) == 0  # 1 - m rounds to 1: T says nothing more
    assert cumulative_tracked(6, 0.0) == 6 and cumulative_tracked(6, 0.5) == 12
    assert cumulative_tracked(3, 0.75) == 12 and cumulative_tracked(2, 0.2) == 2  # 2.5 -> 2
    assert cumulative_tracked(0, 0.0) == 0


class Mixed(nn.Module):
    """Layers with momentum 0.1, 0.01 and None, one called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.ema = nn.BatchNorm1d(3)
        self.slow = nn.BatchNorm1d(3, momentum=0.01)
        self.cma = nn.BatchNorm1d(3, momentum=None)
        self.twice = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cma(self.slow(self.ema(self.lin(x))))
        return self.twice(self.twice(h) * 2)


def partly_trained(steps: int) -> Mixed:
    torch.manual_seed(11)
    m = Mixed()
    m.train()
    with torch.no_grad():
        for _ in range(steps):
            m(torch.randn(8, 3) * 3 + 2)
    return m


def warmup_layers(model: nn.Module) -> set[str]:
    return {f.layer for f in static_inspect(model).findings if f.code == "ema-warmup"}


def test_precise_counts_its_statistics_and_ema_warmup_no_longer_fires():
    """The issue: after Precise BN, (1-m)^T still said the EMA was unwarmed."""
    m = partly_trained(20)  # 0.9^20 = 0.12 and 0.99^20 = 0.82: unwarmed EMAs
    assert warmup_layers(m) == {"ema", "slow"}  # genuinely unwarmed: reported
    x = torch.randn(40, 3) * 3 + 2
    precise_bn(m, batches_of(x, (8, 8, 8, 16)))
    assert int(m.ema.num_batches_tracked) == 20 + 349
    assert int(m.slow.num_batches_tracked) == 20 + 3656
    assert int(m.cma.num_batches_tracked) == 4  # the average of the 4 batches
    assert int(m.twice.num_batches_tracked) == 8  # 2 calls per forward
    records = {r.name: r for r in static_inspect(m).layers}
    assert records["ema"].ema_init_weight <= INIT_WEIGHT_GONE
    assert records["slow"].ema_init_weight <= INIT_WEIGHT_GONE
    assert records["cma"].ema_init_weight == 0.0
    assert warmup_layers(m) == set()


def test_a_cumulative_average_trains_on_from_the_count_precise_wrote():
    """momentum=None: one more training batch weighs 1/(T+1) against the T batches the
    statistics stand for."""
    torch.manual_seed(12)
    bn = nn.BatchNorm1d(2, momentum=None)
    x = torch.randn(30, 2) * 2 + 1
    precise_bn(bn, batches_of(x, (10, 10, 10)))
    mean_before = bn.running_mean.clone()
    extra = torch.randn(10, 2) - 3
    bn.train()
    with torch.no_grad():
        bn(extra)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, mean_before * 3 / 4 + extra.mean(0) / 4)


def test_warmed_or_untouched_counts_stay_as_they_are():
    m = partly_trained(0)
    assert warmup_layers(m) == set()  # T = 0: never-updated, not ema-warmup
    # a layer that is skipped or never runs keeps its T
    skipped = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    skipped[1].eval()
    skipped[1].num_batches_tracked.fill_(5)
    precise_bn(skipped, [torch.randn(8, 3)], only_training=True)
    assert int(skipped[1].num_batches_tracked) == 5
    assert int(skipped[0].num_batches_tracked) == 349
    assert WARMUP_WEIGHT > INIT_WEIGHT_GONE


# --------------------------------------------------------------------------------------------
# non-iid-batches from labels (docs/statistics.md, section 2.8)


def class_batches(order: str, n: int = 256, batch: int = 32, seed: int = 0) -> list:
    """(x, y) batches of 4 classes: ``sorted`` (one class per batch, as a folder read in
    order), ``shuffled`` (seeded), or ``unlabelled`` (x only)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    y = y.sort().values if order == "sorted" else y[torch.randperm(n, generator=g)]
    x = torch.randn(n, 3, generator=g) + 2 * y.view(-1, 1).float()
    if order == "unlabelled":
        return list(x.split(batch))
    return list(zip(x.split(batch), y.split(batch), strict=True))


def iid_findings(report) -> list:
    return [f for f in report.findings if f.code == "non-iid-batches"]


def test_class_sorted_batches_are_reported_and_shuffled_ones_are_not():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sorted_rep = precise_bn(model, class_batches("sorted"))
    [found] = iid_findings(sorted_rep)
    assert found.layer is None and found.severity == "warning"
    assert "8 of 8 batches hold a single class" in found.message
    mix = sorted_rep.extra["label_mix"]
    assert mix is not None and mix["effective_size"] < 1.2 and mix["classes"] == 4

    shuffled_rep = precise_bn(model, class_batches("shuffled"))
    assert iid_findings(shuffled_rep) == []
    mix = shuffled_rep.extra["label_mix"]
    assert mix is not None and 0.5 < mix["ratio"] < 1.5

    unlabelled = precise_bn(model, class_batches("unlabelled"))
    assert iid_findings(unlabelled) == [] and unlabelled.extra["label_mix"] is None


def test_float_labels_are_no_class_labels():
    batches = [(x, y.float()) for x, y in class_batches("sorted")]
    rep = precise_bn(nn.Sequential(nn.BatchNorm1d(3)), batches)
    assert iid_findings(rep) == [] and rep.extra["label_mix"] is None


def test_few_sorted_batches_are_not_enough_evidence():
    """2 batches of 2 classes: the chi-square cannot pass p < 1e-3 (chi2 <= N), however
    sorted."""
    batches = class_batches("sorted", n=8, batch=4)[:2]
    rep = precise_bn(nn.Sequential(nn.BatchNorm1d(3)), batches)
    mix = rep.extra["label_mix"]
    assert mix is not None and mix["ratio"] > 2 and iid_findings(rep) == []


def test_the_library_reads_shuffled_by_default(tmp_path):
    """The issue: bnscope.load_data read a class-sorted source in order and precise_bn used
    one-class batches without a word."""
    import bnscope

    x, y = zip(*class_batches("sorted"), strict=True)
    torch.save({"x": torch.cat(x), "y": torch.cat(y)}, tmp_path / "sorted.pt")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    rep = bnscope.precise_bn(model, bnscope.load_data(str(tmp_path / "sorted.pt")))
    assert iid_findings(rep) == []
    in_order = bnscope.load_data(str(tmp_path / "sorted.pt"), shuffle=False)
    assert len(iid_findings(bnscope.precise_bn(model, in_order))) == 1

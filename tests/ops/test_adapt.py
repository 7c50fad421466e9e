"""Adaptive BN: prior formula, pooled target statistics, shift records, state restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnscope.errors import UsageError
from bnscope.ops.adapt import adapt_bn, mix_with_prior, symmetric_kl
from bnscope.ops.precise import INIT_WEIGHT_GONE
from bnscope.ops.static import static_inspect

from ..statecheck import assert_same_state, snapshot
from .test_precise import batches_of, partly_trained, warmup_layers


def test_prior_formula_hand_made():
    mu, var, lam = mix_with_prior(
        torch.tensor([0.0]),
        torch.tensor([1.0]),
        torch.tensor([2.0]),
        torch.tensor([4.0]),
        prior=10,
        n=10,
    )
    assert lam == 0.5
    assert mu.item() == 1.0 and var.item() == 2.5
    mu, var, lam = mix_with_prior(
        torch.zeros(1), torch.ones(1), torch.full((1,), 2.0), torch.full((1,), 4.0), prior=0, n=10
    )
    assert (lam, mu.item(), var.item()) == (0.0, 2.0, 4.0)
    with pytest.raises(UsageError):
        mix_with_prior(torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1), -1, 3)


def test_symmetric_kl_closed_form():
    kl = symmetric_kl(
        torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0])
    )
    assert kl.item() == pytest.approx(1.0)  # 0.5*(2+2)-1 for a 1-sigma shift
    assert symmetric_kl(*(torch.ones(1),) * 4).item() == 0.0


@pytest.mark.parametrize("sizes", [(2, 2, 4, 8, 16, 32, 64), (128,), (100, 28)])
def test_pure_target_stats_are_pooled_reference(sizes):
    torch.manual_seed(0)
    target = torch.randn(128, 4, 3, 3) * 3 + 5
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.fill_(0.0)
        bn.running_var.fill_(1.0)
    m = nn.Sequential(bn)
    rep = adapt_bn(m, batches_of(target, sizes))
    td = target.double()
    torch.testing.assert_close(bn.running_mean.double(), td.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        bn.running_var.double(), td.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0
    )
    layer = rep.layers[0]
    assert layer.weight_source == 0.0 and layer.samples == 128
    assert layer.d_mu_median > 1 and layer.kl_median > 1
    assert [f.code for f in rep.findings] == ["domain-shift"]


def test_prior_mixes_with_source_per_layer_sample_count():
    torch.manual_seed(1)
    target = torch.randn(40, 3) * 2 + 1
    m = nn.Sequential(nn.BatchNorm1d(3))
    with torch.no_grad():
        m[0].running_mean.fill_(0.0)
        m[0].running_var.fill_(1.0)
    rep = adapt_bn(m, batches_of(target, (10, 30)), prior=40)
    td = target.double()
    expect_mu = 0.5 * 0.0 + 0.5 * td.mean(0)
    expect_var = 0.5 * 1.0 + 0.5 * td.var(0, unbiased=False)
    torch.testing.assert_close(m[0].running_mean.double(), expect_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m[0].running_var.double(), expect_var, rtol=1e-5, atol=0)
    assert rep.layers[0].weight_source == 0.5
    assert rep.extra["prior"] == 40


def test_no_shift_no_finding_and_state_restored():
    torch.manual_seed(2)
    x = torch.randn(256, 3)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout())
    m.eval()
    from bnscope.ops.precise import precise_bn

    precise_bn(m, [x])
    stats = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    before = snapshot(m, skip_buffers=stats)
    rep = adapt_bn(m, batches_of(x, (56, 200)))
    assert rep.findings == ()
    assert rep.layers[0].kl_max < 1e-9
    assert_same_state(before, snapshot(m, skip_buffers=stats))


def test_negative_prior_refused_before_running():
    m = nn.Sequential(nn.BatchNorm1d(2))
    before = snapshot(m)
    with pytest.raises(UsageError, match="prior"):
        adapt_bn(m, [torch.randn(4, 2)], prior=-1)
    assert_same_state(before, snapshot(m))


def test_adapt_counts_its_statistics_in_num_batches_tracked():
    """docs/statistics.md, section 3.1: without a prior the adapted statistics hold nothing of
    the EMA's initial value; with one they hold lambda times what the source held, and
    (1-m)^T says so, never less."""
    target = torch.randn(48, 3) - 1
    m = partly_trained(20)
    adapt_bn(m, batches_of(target, (16, 16, 16)))
    assert warmup_layers(m) == set()
    assert int(m.ema.num_batches_tracked) == 20 + 349
    assert int(m.cma.num_batches_tracked) == 3 and int(m.twice.num_batches_tracked) == 6

    m = partly_trained(20)
    source = {r.name: r.ema_init_weight for r in static_inspect(m).layers}
    rep = adapt_bn(m, batches_of(target, (16, 16, 16)), prior=48)  # lambda = 48 / 96 = 0.5
    lam = {r.name: r.weight_source for r in rep.layers}
    assert lam["ema"] == lam["cma"] == 0.5 and lam["twice"] == 48 / 144
    after = {r.name: r.ema_init_weight for r in static_inspect(m).layers}
    for name, m_ in (("ema", 0.1), ("slow", 0.01)):
        true_weight = lam[name] * source[name]
        assert true_weight <= after[name] < true_weight / (1 - m_), name
    assert warmup_layers(m) == {"ema", "slow"}  # half of an unwarmed EMA is still unwarmed
    assert int(m.cma.num_batches_tracked) == 6  # 3 batches and 48 pseudo samples = 3 more
    assert int(m.twice.num_batches_tracked) == 9  # 6 calls of 16 and 48 pseudo samples: 3 more
    assert after["cma"] == 0.0 < INIT_WEIGHT_GONE


def test_class_sorted_target_batches_are_reported():
    from .test_precise import class_batches, iid_findings

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    rep = adapt_bn(model, class_batches("sorted"), prior=16)
    assert len(iid_findings(rep)) == 1 and rep.extra["label_mix"]["single_class_batches"] == 8
    rep = adapt_bn(model, class_batches("shuffled"), prior=16)
    assert iid_findings(rep) == [] and rep.extra["label_mix"]["classes"] == 4

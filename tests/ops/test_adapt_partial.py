"""Partial Adaptive BN: only the means, only the variances, or only the first K BN layers in
module order. Untouched statistics stay bit-identical to the source; touched ones equal those
of full adaptation. Also the validation of adapt's test-time priors (online_prior(s))."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnscope.errors import UsageError
from bnscope.ops.adapt import adapt_bn, check_online_prior, parse_priors
from bnscope.records import Status

from ..statecheck import assert_same_state, snapshot
from .test_precise import batches_of

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class OutOfOrder(nn.Module):
    """Four BN layers whose module order (registration: ``late``, ``a``, ``b``, ``unused``)
    differs from their forward order (``a``, ``b``, ``late``); ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.BatchNorm1d(4, momentum=0.1)
        self.a = nn.BatchNorm1d(4, momentum=None)
        self.fc = nn.Linear(4, 4)
        self.b = nn.BatchNorm1d(4, momentum=0.01)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.fc(self.b(self.a(x))))


def source_model(seed: int = 0) -> OutOfOrder:
    """Trained-looking source statistics (a few training steps on source-domain data)."""
    torch.manual_seed(seed)
    m = OutOfOrder()
    m.train()
    for _ in range(5):
        m(torch.randn(16, 4))
    return m.eval()


def target_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 4, generator=g) * 3 + 2
    return batches_of(x, (20, 25, 15))


def buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k.endswith(BUFFERS)}


def adapted(only=None, first_layers=None, prior=0.0):
    """(source buffers, full adaptation's buffers, partial adaptation's buffers, report)."""
    source = source_model()
    full = copy.deepcopy(source)
    part = copy.deepcopy(source)
    adapt_bn(full, target_batches(), prior=prior)
    rep = adapt_bn(part, target_batches(), prior=prior, only=only, first_layers=first_layers)
    return buffers(source), buffers(full), buffers(part), rep


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("prior", [0.0, 30.0])
@pytest.mark.parametrize("only", ["mean", "var"])
def test_only_one_statistic(only, prior):
    src, full, part, rep = adapted(only=only, prior=prior)
    touched, untouched = ("running_mean", "running_var")[:: 1 if only == "mean" else -1]
    for layer in ("late", "a", "b"):
        assert same(part[f"{layer}.{touched}"], full[f"{layer}.{touched}"]), layer
        assert not same(part[f"{layer}.{touched}"], src[f"{layer}.{touched}"]), layer
        assert same(part[f"{layer}.{untouched}"], src[f"{layer}.{untouched}"]), layer
        # the count speaks for both statistics, and one of them is still the EMA's
        assert same(part[f"{layer}.num_batches_tracked"], src[f"{layer}.num_batches_tracked"])
    for key in BUFFERS:  # never called: kept
        assert same(part[f"unused.{key}"], src[f"unused.{key}"])
    by_name = {r.name: r for r in rep.layers}
    assert [by_name[n].adapted for n in ("late", "a", "b")] == [only] * 3
    assert by_name["unused"].adapted is None and by_name["unused"].status == Status.NOT_CALLED
    assert rep.extra["only"] == only and rep.extra["first_layers"] is None
    assert by_name["a"].weight_source == pytest.approx(prior / (prior + 60))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 9])
def test_first_layers_in_module_order(k):
    src, full, part, rep = adapted(first_layers=k)
    order = ["late", "a", "b", "unused"]  # module order, not forward order (a, b, late)
    assert [r.name for r in rep.layers] == order
    for i, layer in enumerate(order):
        record = rep.layers[i]
        if layer == "unused":
            assert record.status == Status.NOT_CALLED
            continue
        if i < k:
            assert record.status == Status.UPDATED and record.adapted == "mean+var"
            for key in BUFFERS:  # the count advances as in full adaptation
                assert same(part[f"{layer}.{key}"], full[f"{layer}.{key}"]), (layer, key)
            assert record.weight_source == 0.0
        else:
            assert record.status == Status.KEPT and record.adapted is None
            assert record.reason == f"kept: after the first {k} BN layer" + "s" * (k > 1)
            assert record.weight_source is None
            assert record.kl_median is not None and record.kl_median > 0  # still measured
            for key in BUFFERS:
                assert same(part[f"{layer}.{key}"], src[f"{layer}.{key}"]), (layer, key)
    assert rep.extra["first_layers"] == k


def test_first_layers_with_only_and_a_prior():
    src, full, part, rep = adapted(only="var", first_layers=2, prior=12.0)
    assert same(part["late.running_var"], full["late.running_var"])
    assert same(part["a.running_var"], full["a.running_var"])
    assert same(part["late.running_mean"], src["late.running_mean"])
    for key in BUFFERS:
        assert same(part[f"b.{key}"], src[f"b.{key}"])
    assert [r.adapted for r in rep.layers] == ["var", "var", None, None]
    assert [r.status for r in rep.layers] == ["updated", "updated", "kept", "not-called"]


def test_full_adaptation_reports_both_statistics():
    _, _, _, rep = adapted()
    assert [r.adapted for r in rep.layers] == ["mean+var"] * 3 + [None]
    assert rep.extra["only"] is None and rep.extra["first_layers"] is None


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"only": "both"}, "only= must be mean or var"),
        ({"only": "MEAN"}, "only= must be mean or var"),
        ({"only": 1}, "only= must be mean or var"),
        ({"first_layers": 0}, "first_layers= must be an integer >= 1"),
        ({"first_layers": -2}, "first_layers= must be an integer >= 1"),
        ({"first_layers": 1.5}, "first_layers= must be an integer >= 1"),
        ({"first_layers": True}, "first_layers= must be an integer >= 1"),
    ],
)
def test_bad_partial_options_refused_before_running(kwargs, fragment):
    m = source_model()
    before = snapshot(m)
    with pytest.raises(UsageError, match=fragment):
        adapt_bn(m, target_batches(), **kwargs)
    assert_same_state(before, snapshot(m))


def test_test_time_priors_are_validated_in_library_terms():
    assert parse_priors("256, 0,16,inf,16") == [0.0, 16.0, 256.0, math.inf]
    assert parse_priors([4, 0]) == [0.0, 4.0] and parse_priors(None) is None
    assert check_online_prior("inf") == math.inf and check_online_prior(16) == 16.0
    for bad in ("-1", "0,x", "0,nan", [True], [-0.5]):
        with pytest.raises(UsageError, match="online_priors= must be comma-separated numbers"):
            parse_priors(bad)
    with pytest.raises(UsageError, match="online_priors= is empty"):
        parse_priors(" , ")
    for bad in (-1, math.nan, "x", True, None):
        with pytest.raises(UsageError, match="online_prior= must be a number >= 0"):
            check_online_prior(bad)

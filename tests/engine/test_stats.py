"""Accumulators: any split gives the one-batch answer; merge is associative."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnscope.engine.stats import MomentAccumulator, log_var_ratio, normalized_mean_shift


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.double()
    return xd.mean(0), xd.var(0, unbiased=False)


def split_sizes(total: int, cuts: list[int]) -> list[int]:
    points = sorted({c % total for c in cuts if 0 < c % total})
    edges = [0, *points, total]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 200),
    channels=st.integers(1, 5),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    loc=st.floats(-1e4, 1e4),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_split_equals_one_batch(total, channels, cuts, loc, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, channels, generator=g, dtype=torch.float64) * scale + loc
    one = MomentAccumulator(channels)
    one.update_tensor(x, [0])
    parts = MomentAccumulator(channels)
    start = 0
    for size in split_sizes(total, cuts):
        parts.update_tensor(x[start : start + size], [0])
        start += size
    mu, var = reference(x)
    assert parts.count == one.count == total
    torch.testing.assert_close(parts.population_mean, mu, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(one.population_var, var, rtol=1e-7, atol=1e-20)
    torch.testing.assert_close(parts.population_var, var, rtol=1e-7, atol=1e-20)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_merge_is_associative_and_commutative(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    accs = []
    for n in sizes:
        a = MomentAccumulator(3)
        a.update_tensor(torch.randn(n, 3, generator=g, dtype=torch.float64) * 5 + 2, [0])
        accs.append(a)
    a, b, c = accs
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = c.merge(a).merge(b)
    for other in (right, swapped):
        assert other.count == left.count
        torch.testing.assert_close(other.population_mean, left.population_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(other.population_var, left.population_var, rtol=1e-12, atol=0)
    # inputs are unchanged by merge
    assert a.count == sizes[0]


def test_empty_merge_and_errors():
    a = MomentAccumulator(2)
    b = MomentAccumulator(2)
    b.update_tensor(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), [0])
    m = a.merge(b)
    assert m.count == 2
    torch.testing.assert_close(m.population_mean, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(m.population_var, torch.tensor([1.0, 4.0], dtype=torch.float64))
    import pytest

    with pytest.raises(ValueError):
        _ = a.population_mean
    with pytest.raises(ValueError):
        a.update(torch.zeros(3), torch.ones(3), 4)


def test_huge_mean_small_std_float32_input():
    """|mean|/std = 1e4: float32 E[x^2]-E[x]^2 goes negative; the accumulator does not."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 2, generator=g) + 1e4 for _ in range(10)]
    x = torch.cat(batches)
    naive = (x * x).mean(0) - x.mean(0) ** 2
    acc = MomentAccumulator(2)
    for b in batches:
        acc.update_tensor(b, [0])
    mu, var = reference(x)
    torch.testing.assert_close(acc.population_var, var, rtol=1e-9, atol=0)
    assert (naive - var.float()).abs().max() > 0.1  # the naive way is far off here


def test_divergences_closed_form():
    mu_a = torch.tensor([1.0, 0.0])
    mu_b = torch.tensor([0.0, 0.0])
    var = torch.tensor([4.0, 1.0])
    d = normalized_mean_shift(mu_a, mu_b, var, eps=0.0)
    torch.testing.assert_close(d, torch.tensor([0.5, 0.0], dtype=torch.float64))
    r = log_var_ratio(torch.tensor([4.0]), torch.tensor([1.0]), eps=0.0)
    torch.testing.assert_close(r, torch.log(torch.tensor([4.0], dtype=torch.float64)))

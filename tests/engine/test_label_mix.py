"""The class mix of labelled batches (docs/statistics.md, section 2.8): the chi-square ratio
against a brute-force table, its exact mean under every shuffle, the tally's rules for what
counts as labels, and no device read per batch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bnscope.engine import labels
from bnscope.engine.labels import LabelTally, dense, from_dense, label_mix


def tally_of(batches: list[torch.Tensor]) -> LabelTally:
    tally = LabelTally()
    for y in batches:
        tally.add(y, int(y.shape[0]))
    return tally


def brute_force(batches: list[torch.Tensor]) -> tuple[float, int]:
    """Pearson's chi-square of the full batch x class table, cell by cell."""
    classes = sorted({int(v) for y in batches for v in y})
    table = np.array([[int((y == k).sum()) for k in classes] for y in batches], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return chi2, (len(batches) - 1) * (len(classes) - 1)


def test_chi_square_equals_the_cell_by_cell_table():
    g = torch.Generator().manual_seed(0)
    sizes = [32, 32, 17, 5, 32, 2]
    batches = [torch.randint(3, 9, (n,), generator=g) for n in sizes]  # labels 3..8
    mix = label_mix(tally_of(batches).counts())
    chi2, df = brute_force(batches)
    n = sum(sizes)
    assert mix is not None and mix["df"] == df and mix["classes"] == 6
    assert mix["chi2"] == pytest.approx(chi2, rel=1e-12)
    assert mix["ratio"] == pytest.approx(chi2 * (n - 1) / (n * df), rel=1e-12)
    assert mix["mean_batch_size"] == n / len(sizes) and mix["batches"] == len(sizes)
    assert mix["effective_size"] == pytest.approx(mix["mean_batch_size"] / mix["ratio"])
    # Q(df/2, chi2/2): the chi-square tail, checked at df = 4: exp(-chi2/2) (1 + chi2/2)
    two = label_mix(tally_of([torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2]),
                              torch.tensor([2, 0, 1])]).counts())  # fmt: skip
    assert two is not None and two["df"] == 4
    assert two["p_value"] == pytest.approx(
        math.exp(-two["chi2"] / 2) * (1 + two["chi2"] / 2), rel=1e-12
    )


def test_the_ratio_averages_exactly_one_over_every_shuffle():
    """Haldane (1940): with the margins fixed, E[chi2] = df N / (N - 1), here over all 7!
    orders of 7 labels into batches of 3, 2 and 2."""
    labels = [0, 0, 0, 1, 1, 2, 2]
    ratios = []
    for order in itertools.permutations(labels):
        batches = [torch.tensor(order[:3]), torch.tensor(order[3:5]), torch.tensor(order[5:])]
        mix = label_mix(tally_of(batches).counts())
        assert mix is not None
        ratios.append(mix["ratio"])
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, rel=1e-12)


def test_class_sorted_batches_look_like_one_sample():
    batches = [torch.full((32,), k) for k in range(4) for _ in range(5)]  # 20 batches, 4 classes
    mix = label_mix(tally_of(batches).counts())
    assert mix is not None
    n = 640
    assert mix["chi2"] == pytest.approx(n * 3)  # N (K - 1)
    assert mix["ratio"] == pytest.approx(n * 3 * (n - 1) / (n * 19 * 3))  # ~ the batch size
    assert mix["effective_size"] == pytest.approx(32 / mix["ratio"]) and mix["effective_size"] < 1
    assert mix["single_class_batches"] == 20 and mix["p_value"] == 0.0


def test_shuffled_batches_have_a_ratio_near_one():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(640) % 10
    batches = list(labels[torch.randperm(640, generator=g)].split(32))
    mix = label_mix(tally_of(batches).counts())
    assert mix is not None and 0.8 < mix["ratio"] < 1.2 and mix["p_value"] > 0.01
    assert mix["single_class_batches"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        None,
        torch.tensor([0.0, 1.0, 1.0]),  # floating point
        torch.tensor([True, False, True]),
        torch.tensor([[1, 0], [0, 1], [1, 0]]),  # one-hot
        torch.tensor([0, 1]),  # not one label per sample
        torch.tensor([0, -100, 1]),  # an ignore index
    ],
)
def test_one_batch_without_class_labels_means_no_label_mix(bad):
    tally = LabelTally()
    tally.add(torch.tensor([0, 1, 2]), 3)
    tally.add(bad, 3)
    tally.add(torch.tensor([0, 1, 2]), 3)
    assert tally.counts() is None and label_mix(tally.counts()) is None


def test_one_batch_or_one_class_has_no_ratio():
    one_batch = label_mix(tally_of([torch.tensor([0, 1, 2, 1])]).counts())
    one_class = label_mix(tally_of([torch.zeros(4, dtype=torch.long)] * 3).counts())
    for mix in (one_batch, one_class):
        assert mix is not None and mix["df"] == 0
        assert mix["ratio"] is None and mix["effective_size"] is None and mix["p_value"] is None
    assert label_mix(LabelTally().counts()) is None  # no batch at all


def test_dense_vectors_pool_like_one_tally():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 7, (n,), generator=g) for n in (9, 4, 12, 6, 8)]
    whole = tally_of(batches).counts()
    parts = [tally_of(batches[:2]).counts(), tally_of(batches[2:]).counts()]
    assert whole is not None and all(p is not None for p in parts)
    length = 7
    pooled = from_dense(
        sum(dense(p, length) for p in parts if p is not None),
        batches=5,
        samples=39,
        single_class=0,
    )
    np.testing.assert_array_equal(pooled.classes, whole.classes)
    np.testing.assert_allclose(pooled.totals, whole.totals, rtol=0, atol=0)
    np.testing.assert_allclose(pooled.squares, whole.squares, rtol=1e-15)


def test_a_long_tally_folds_its_counts_and_keeps_a_bounded_number_of_arrays():
    """Past FOLD batches the per-batch counts are folded into running sums: the tally holds
    fewer than FOLD batches' arrays whatever the length of the run, and its counts are those
    of the whole table (class totals exactly, S_k to rounding). A class that first shows up
    after a fold joins the sums."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 5, (int(n),), generator=g) for n in torch.randint(2, 9, (700,))]
    batches.append(torch.tensor([9, 9, 0]))  # class 9 only in the last, unfolded part
    tally = LabelTally()
    longest = 0
    for y in batches:
        tally.add(y, int(y.shape[0]))
        longest = max(longest, len(tally._host))
    assert longest == labels.FOLD - 1 and len(tally._host) == len(batches) % labels.FOLD
    counts = tally.counts()
    assert counts is not None and counts is tally.counts()  # reading twice changes nothing
    all_labels = torch.cat(batches)
    classes, totals = torch.unique(all_labels, return_counts=True)
    np.testing.assert_array_equal(counts.classes, classes.numpy())
    np.testing.assert_array_equal(counts.totals, totals.numpy().astype(float))
    squares = [
        sum(float((y == k).sum()) ** 2 / y.shape[0] for y in batches) for k in classes.tolist()
    ]
    np.testing.assert_allclose(counts.squares, squares, rtol=1e-13)
    assert counts.batches == len(batches) and counts.samples == all_labels.numel()
    assert counts.single_class == sum(1 for y in batches if len(torch.unique(y)) == 1)
    mix, brute = label_mix(counts), brute_force(batches)
    assert mix is not None and mix["chi2"] == pytest.approx(brute[0], rel=1e-10)


def test_a_negative_label_after_a_fold_still_drops_the_whole_tally():
    tally = tally_of([torch.tensor([0, 1, 2])] * (labels.FOLD + 3) + [torch.tensor([0, -1])])
    assert tally.counts() is None

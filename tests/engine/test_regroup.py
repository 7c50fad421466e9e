"""Samples re-batched (bnscope/engine/regroup.py): pooling batches of any structure, taking
batches back out in the same structure, group ids, and the i.i.d. and grouped arrangements."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from bnscope.engine.regroup import grouped_order, iid_order, read_pool, take
from bnscope.engine.runner import make_runner
from bnscope.errors import DataError


def runner():
    return make_runner(nn.Linear(2, 2), device="cpu")


def test_pool_and_take_keep_the_structure_of_dict_batches():
    batches = [
        {
            "x": torch.arange(6.0).view(3, 2) + 10 * b,
            "y": torch.tensor([0, 1, 2]) + b,
            "path": [f"b{b}-{i}.png" for i in range(3)],
            "scale": torch.tensor(2.0),  # a per-batch constant
            "meta": {"id": torch.arange(3) + 3 * b},
        }
        for b in range(3)
    ]
    pool = read_pool(batches, runner(), None, ["label", "path"])
    assert (pool.size, pool.batches, pool.largest_batch) == (9, 3, 3)
    got = take(pool.batch, torch.tensor([4, 0, 8]))
    assert set(got) == {"x", "y", "path", "scale", "meta"}
    assert torch.equal(got["x"], torch.stack([batches[1]["x"][1], batches[0]["x"][0],
                                              batches[2]["x"][2]]))  # fmt: skip
    assert got["y"].tolist() == [2, 0, 4]
    assert got["path"] == ["b1-1.png", "b0-0.png", "b2-2.png"]
    assert got["scale"] is batches[0]["scale"]
    assert got["meta"]["id"].tolist() == [4, 0, 8]
    # codes number the groups in order of first appearance
    assert pool.codes["label"].tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4]
    assert pool.codes["path"].tolist() == list(range(9))


def test_pool_of_tuples_stops_at_the_sample_count():
    Pair = namedtuple("Pair", "x y")
    batches = [Pair(torch.full((4, 2), float(b)), torch.arange(4)) for b in range(5)]
    pool = read_pool(batches, runner(), 6, ["label"])
    assert pool.size == 6 and pool.batches == 2  # the second batch reaches 6; cut there
    got = take(pool.batch, torch.arange(6))
    assert isinstance(got, Pair) and got.x[:, 0].tolist() == [0, 0, 0, 0, 1, 1]
    plain = read_pool([(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))] * 2, runner(), None)
    assert isinstance(take(plain.batch, torch.tensor([1])), tuple)


def test_given_ids_and_group_functions():
    batches = [torch.randn(4, 2) for _ in range(3)]
    pool = read_pool(
        batches, runner(), 10, [lambda b: (b[:, 0] > 0).long()],
        given={"image": torch.arange(12) // 3, "names": ["a", "b"] * 6},
    )  # fmt: skip
    assert pool.size == 10
    assert pool.codes["image"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert pool.codes["names"].tolist() == [0, 1] * 5
    assert pool.codes["<lambda>"].numel() == 10
    with pytest.raises(DataError, match="holds 4 ids for 'image', but 10 samples"):
        read_pool(batches, runner(), 10, given={"image": torch.arange(4)})


@pytest.mark.parametrize(
    ("batches", "specs", "message"),
    [
        ([torch.randn(4, 2)], ["label"], "group_by=label needs labels, but batch 0 carries none"),
        ([{"x": torch.randn(4, 2)}], ["image_id"], "batches have no key 'image_id' (keys: 'x')"),
        ([(torch.randn(4, 2), torch.zeros(4))], ["image_id"], "batches are tuples, not dicts"),
        ([{"x": torch.randn(4, 2), "g": torch.zeros(3)}], ["g"], "shape (3,)"),
        ([{"x": torch.randn(4, 2), "g": [[1]] * 4}], ["g"], "hashable"),
        ([torch.randn(4, 2)], [lambda b: 1 / 0], "the group function <lambda> failed on batch 0"),
        ([{"x": torch.randn(4, 2)}, {"z": torch.randn(4, 2)}], [], "differ in structure"),
        ([torch.randn(4, 2), torch.randn(4, 3)], [], "differ in shape or dtype"),
        ([], [], "yielded no batches"),
    ],
)
def test_bad_batches_are_one_data_error(batches, specs, message):
    with pytest.raises(DataError) as info:
        read_pool(batches, runner(), None, specs)
    assert message in str(info.value)


def test_iid_order_is_a_seeded_permutation():
    a, b = iid_order(40, 0), iid_order(40, 1)
    assert sorted(a.tolist()) == list(range(40)) and torch.equal(a, iid_order(40, 0))
    assert not torch.equal(a, b)


def test_grouped_order_puts_each_group_together_in_a_random_group_order():
    codes = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    order = grouped_order(codes, 5)
    assert sorted(order.tolist()) == list(range(12))
    runs = codes[order].tolist()
    # consecutive: each group appears in one run
    changes = sum(1 for i in range(1, 12) if runs[i] != runs[i - 1])
    assert changes == 2 and torch.equal(order, grouped_order(codes, 5))
    firsts = {tuple(codes[grouped_order(codes, s)].tolist()[::4]) for s in range(12)}
    assert len(firsts) > 1  # the group order depends on the seed
    # within a group the order is random too
    within = {tuple(grouped_order(torch.zeros(6, dtype=torch.long), s).tolist()) for s in range(5)}
    assert len(within) > 1

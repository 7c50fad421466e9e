"""The operations' progress callbacks get the total number of batches whenever the data's
length is known (a DataLoader, a list), capped by ``batches``; None when it is not."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnscope.ops.adapt import adapt_bn
from bnscope.ops.ghost import ghost_analysis
from bnscope.ops.inspect import inspect
from bnscope.ops.precise import precise_bn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)  # 4 batches


class Unsized:
    """Re-iterable batches without ``len()``."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)


def record(run) -> list[tuple[int, int | None]]:
    calls: list[tuple[int, int | None]] = []
    run(lambda done, total: calls.append((done, total)))
    return calls


def test_precise_and_adapt_know_the_total_without_batches():
    expected = [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert record(lambda p: precise_bn(mlp(), loader(), progress=p)) == expected
    assert record(lambda p: adapt_bn(mlp(), loader(), progress=p)) == expected
    assert record(lambda p: precise_bn(mlp(), loader(), 2, progress=p)) == [(0, 2), (1, 2), (2, 2)]


def test_unknown_length_keeps_total_none():
    calls = record(lambda p: precise_bn(mlp(), Unsized(loader()), progress=p))
    assert calls == [(0, None), (1, None), (2, None), (3, None), (4, None)]
    assert record(lambda p: precise_bn(mlp(), Unsized(loader()), 3, progress=p))[-1] == (3, 3)


def test_inspect_and_ghost_count_both_passes():
    calls = record(lambda p: inspect(mlp(), loader(), progress=p))
    assert calls == [(i, 8) for i in range(9)]  # from (0, 8): the total before a batch
    calls = record(lambda p: ghost_analysis(mlp(), loader(), sizes=[2, 4], progress=p))
    assert calls == [(i, 8) for i in range(9)]
    calls = record(lambda p: inspect(mlp(), Unsized(loader()), progress=p))
    assert [t for _, t in calls] == [None] * 9

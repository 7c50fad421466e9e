"""Packed storage of many small tensors: items come back exactly, chunks grow geometrically (few
tensors for many items), mismatched items are refused, used chunks are let go."""

from __future__ import annotations

import pytest
import torch

from bnscope.engine import packed
from bnscope.engine.packed import Packed


def items(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 9, (n,), generator=g).tolist()  # 0 rows too
    return [torch.randn(k, 3, generator=g) for k in sizes]


def test_items_come_back_exactly_across_chunks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packed, "MIN_CHUNK_BYTES", 64)
    monkeypatch.setattr(packed, "MAX_CHUNK_BYTES", 256)  # chunks of 5 to 21 rows of 12 bytes
    store = Packed()
    data = items(200)
    for t in data:
        assert store.append(t)
    assert len(store) == 200
    for i, t in enumerate(data):
        got = store.get(i)
        assert got is not None and torch.equal(got, t)
    assert store.nbytes == sum(t.numel() * 4 for t in data) + 24 * 200


def test_many_items_make_few_chunks():
    store = Packed()
    for t in items(5000):
        store.append(t)
    chunks = [c for c in store._chunks if c is not None]
    allocated = sum(c.numel() * c.element_size() for c in chunks)
    # geometric growth from MIN to MAX: 240 KB of data in a handful of tensors, allocated
    # beyond the items' bytes by less than one chunk
    assert len(chunks) <= 4
    assert store.nbytes - 24 * 5000 <= allocated < store.nbytes + packed.MAX_CHUNK_BYTES


def test_an_item_larger_than_a_chunk_gets_a_chunk_of_its_own(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packed, "MAX_CHUNK_BYTES", 64)
    store = Packed()
    big = torch.arange(300.0).reshape(100, 3)
    assert store.append(torch.ones(1, 3)) and store.append(big)
    assert torch.equal(store.get(1), big) and torch.equal(store.get(0), torch.ones(1, 3))


@pytest.mark.parametrize(
    "other",
    [
        torch.zeros(2, 4),  # other trailing shape
        torch.zeros(2, 3, dtype=torch.float64),  # other dtype
        torch.zeros(2, 3, 1),  # other rank
        torch.tensor(1.0),  # 0-d
    ],
)
def test_an_item_unlike_the_first_is_refused_and_nothing_stored(other: torch.Tensor):
    store = Packed()
    assert store.append(torch.ones(2, 3))
    before = store.nbytes
    assert not store.matches(other) and not store.append(other)
    assert len(store) == 1 and store.nbytes == before


def test_reading_in_order_lets_go_of_used_chunks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packed, "MIN_CHUNK_BYTES", 48)
    monkeypatch.setattr(packed, "MAX_CHUNK_BYTES", 48)  # 2 items of 2 x 3 float32 per chunk
    store = Packed()
    data = [torch.full((2, 3), float(i)) for i in range(6)]
    for t in data:
        store.append(t)
    assert len(store._chunks) == 3
    first = store.get(0)
    store.release_through(0)  # chunk 0 still holds item 1
    assert store._chunks[0] is not None
    view = store.get(1)
    store.release_through(1)
    assert store._chunks[0] is None and store.get(0) is None and store.get(1) is None
    assert first is not None and view is not None and torch.equal(view, data[1])  # views live on
    assert torch.equal(store.get(2), data[2])
    store.release_all()
    assert all(c is None for c in store._chunks) and store.get(5) is None
    assert store.append(torch.ones(2, 3))  # a fresh chunk after everything was let go
    assert torch.equal(store.get(6), torch.ones(2, 3))

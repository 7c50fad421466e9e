"""How many batches a pass over the data yields, known before reading it (the progress bar's
total): data specs, DataLoaders, lists; unknown for generators and iterable datasets."""

from __future__ import annotations

import textwrap

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from bnscope.engine.collect import expected_batches
from bnscope.io.data import batch_count, load_data


class Stream(IterableDataset):
    def __len__(self) -> int:  # an estimate only: workers may each yield all of it
        return 12

    def __iter__(self):
        return iter(torch.randn(12, 3))


def test_tensor_file_specs(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(10, 3)}, path)
    for kwargs, count in (
        ({"batch_size": 4}, 3),  # 4 + 4 + 2
        ({"batch_size": 4, "drop_last": True}, 2),
        ({"batch_size": 3, "drop_single": True}, 3),  # the last batch of 1 is left out
        ({"batch_size": 3, "drop_single": False}, 4),  # the library default drops it too
    ):
        source = load_data(str(path), **kwargs)
        assert batch_count(source) == count == len(list(source)), kwargs


def test_factory_specs(tmp_path):
    (tmp_path / "fac.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch.utils.data import DataLoader, TensorDataset

            def loader(batch_size=4):
                return DataLoader(TensorDataset(torch.randn(10, 3)), batch_size=batch_size)

            def batches():
                return [torch.randn(2, 3) for _ in range(5)]

            def generator():
                return (torch.randn(2, 3) for _ in range(5))
            """
        )
    )
    assert batch_count(load_data(f"{tmp_path / 'fac.py'}:loader", batch_size=4)) == 3
    assert batch_count(load_data(f"{tmp_path / 'fac.py'}:batches")) == 5
    assert batch_count(load_data(f"{tmp_path / 'fac.py'}:generator")) is None


def test_plain_iterables():
    assert batch_count([torch.randn(2, 3)] * 7) == 7
    assert batch_count(DataLoader(TensorDataset(torch.randn(9, 3)), batch_size=2)) == 5
    assert batch_count(iter([1, 2, 3])) is None
    assert batch_count(x for x in range(3)) is None
    assert batch_count(DataLoader(Stream(), batch_size=4)) is None  # only an estimate


def test_expected_batches_caps_batches_by_the_length():
    data = [torch.randn(2, 3)] * 5
    assert expected_batches(data, None) == 5
    assert expected_batches(data, 3) == 3
    assert expected_batches(data, 9) == 5  # the run fails when the data runs out
    assert expected_batches(iter(data), 3) == 3
    assert expected_batches(iter(data), None) is None

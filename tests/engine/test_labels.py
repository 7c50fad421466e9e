"""Labels that do not fit the model: a label outside the outputs' classes is one DataError
(counted on the device, no read per batch), never an IndexError from cross_entropy; labels of
an image folder that was not matched by name (``num_classes``) are refused when they name more
classes than the model outputs and set aside when they name fewer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnscope
from bnscope.engine import sync
from bnscope.engine.evaluate import Scores, batch_kind, check_label_range, read_scores
from bnscope.errors import DataError


def net(classes: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    )  # fmt: skip


def batches(labels: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(len(y), 3, 6, 6, generator=g), torch.tensor(y)) for y in labels]


GOOD = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2]]
# one label of 5 and one of -1 in the last batch, after two good ones
BAD = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 5, -1, 2]]
OPS = {
    "evaluate": lambda m, d, **kw: bnscope.evaluate_models(
        {"a": m, "b": copy.deepcopy(m)}, d, modes={"b": "batch"}, **kw
    ),
    "compare": lambda m, d, **kw: bnscope.compare_models(m, copy.deepcopy(m), d, **kw),
    "inspect": lambda m, d, **kw: bnscope.inspect(m, d, **kw),
    "ghost": lambda m, d, **kw: bnscope.ghost_analysis(m, d, sizes=[2], **kw),
}
ROLE = {"evaluate": "eval_data", "compare": "eval_data", "inspect": "data", "ghost": "data"}


@pytest.mark.parametrize("what", list(OPS))
def test_labels_outside_the_outputs_are_one_error(what: str) -> None:
    with pytest.raises(DataError) as info:
        OPS[what](net(), batches(BAD))
    err = info.value
    assert err.message == (
        f"{ROLE[what]}= has labels outside the model's 4 classes (0 to 3): 2 of 12 labels"
    )
    assert err.fix is not None and err.fix.startswith("labels must be class indices")
    assert not isinstance(err.__cause__, IndexError)


@pytest.mark.parametrize("what", ["evaluate", "inspect", "ghost"])
def test_the_range_check_reads_nothing_per_batch(what: str) -> None:
    reads = {}
    for n in (2, 6):
        before = sync.READS
        with pytest.raises(DataError, match="has labels outside"):
            OPS[what](net(), batches([[0, 7, 1, 2]] + GOOD[:1] * n))
        reads[n] = sync.READS - before
    assert reads[2] == reads[6]


def test_scores_count_labels_outside_and_score_the_others_exactly() -> None:
    out = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.5, 4.0]])
    labels = torch.tensor([0, 1, 3, -1])
    s = Scores()
    s.add(out, labels=labels)
    read_scores([s])
    assert s.value("bad") == 2 and s.value("correct") == 2 and s.outputs == 3
    expected = torch.nn.functional.cross_entropy(out[:2], labels[:2], reduction="sum")
    assert s.value("loss") == pytest.approx(float(expected))
    with pytest.raises(DataError, match="2 of 4 labels"):
        check_label_range(s, "eval_data")
    ok = Scores()
    ok.add(out[:2], labels=labels[:2])
    check_label_range(ok)  # nothing outside: no error


def test_batch_kind_with_the_folder_class_count() -> None:
    ref = torch.zeros(4, 4)
    labels = torch.tensor([0, 1, 2, 2])
    assert batch_kind(ref, labels) == (4, True, True)
    assert batch_kind(ref, labels, 4) == (4, True, True)
    # fewer classes than outputs, not matched by name: which ones are missing is unknown
    assert batch_kind(ref, labels, 3) == (4, True, False)
    with pytest.raises(DataError) as info:
        batch_kind(ref, labels, 5, "eval_data")
    assert info.value.message == (
        "eval_data= has labels of 5 classes but the model outputs 4 class scores"
    )
    # outputs that are not class scores: the count does not matter
    assert batch_kind(torch.zeros(4), labels, 5) == (4, False, False)
    assert batch_kind(ref, labels.float(), 5) == (4, True, False)


@pytest.mark.parametrize("what", list(OPS))
def test_more_folder_classes_than_outputs_stop_at_the_first_batch(what: str) -> None:
    seen: list[int] = []

    class Counting(list):
        def __iter__(self):
            for i, b in enumerate(super().__iter__()):
                seen.append(i)
                yield b

    data = Counting(batches(GOOD))
    with pytest.raises(DataError, match="has labels of 5 classes but the model outputs 4"):
        OPS[what](net(), data, num_classes=5)
    if what != "ghost":  # ghost scores outputs only on its second reading
        assert seen == [0]


@pytest.mark.parametrize("what", list(OPS))
def test_fewer_folder_classes_than_outputs_set_the_labels_aside(what: str) -> None:
    data = batches(GOOD)
    with_labels = OPS[what](net(), data)
    aside = OPS[what](net(), data, num_classes=3)
    if what in ("evaluate", "compare"):
        assert with_labels.has_labels and not aside.has_labels
        first = aside.metrics["a"] if what == "evaluate" else aside.a
        assert first.accuracy is None and first.loss is None
        agreement = aside.agreement["b"] if what == "evaluate" else aside.agreement
        assert agreement is not None
    elif what == "inspect":
        assert with_labels.extra["metrics"]["has_labels"]
        assert not aside.extra["metrics"]["has_labels"]
        assert aside.extra["metrics"]["variants"]["running"]["accuracy"] is None
    else:
        assert with_labels.extra["metrics"]["has_labels"]
        assert not aside.extra["metrics"]["has_labels"]
    # the same number of classes as outputs: labels are used as they are
    same = OPS[what](net(), data, num_classes=4)
    if what == "evaluate":
        assert same.metrics["a"] == with_labels.metrics["a"]

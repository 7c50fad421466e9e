"""Every public function leaves the model exactly as it found it (modes, momentum, eps,
parameters, buffers, hook dictionaries), on success and when the data or the model fails
mid-way (an exception, or KeyboardInterrupt). One shared helper: tests/statecheck.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnscope
from bnscope.errors import BnscopeError

from ..statecheck import assert_same_state, snapshot


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn2(self.bn(self.conv(x)))))
        return self.fc(h.mean((2, 3)))


def make_model() -> Net:
    torch.manual_seed(0)
    model = Net()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6))
    model.bn2.eval()  # mixed modes must survive: never model.train(flag) at the root
    model.bn.register_forward_hook(lambda m, a, o: None)  # a user's own hook
    return model


def batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]  # fmt: skip


class Failing:
    """Re-iterable data that raises ``exc`` at batch ``at`` of read number ``read``."""

    def __init__(self, exc: BaseException, at: int = 2, read: int = 1) -> None:
        self.exc, self.at, self.read, self.reads = exc, at, read, 0

    def __iter__(self):
        self.reads += 1
        for i, b in enumerate(batches()):
            if self.reads == self.read and i == self.at:
                raise self.exc
            yield b


def bad_shape_at(at: int, read: int):
    class BadShape(Failing):
        def __iter__(self):
            self.reads += 1
            for i, (x, y) in enumerate(batches()):
                yield (x[:, :2] if (self.reads == read and i == at) else x), y

    return BadShape(RuntimeError(), at, read)


#: what precise and adapt write: the statistics and their count (docs/statistics.md, 3.1)
STATS = {
    f"{layer}.{buffer}"
    for layer in ("bn", "bn2")
    for buffer in ("running_mean", "running_var", "num_batches_tracked")
}

FUNCTIONS = {
    # name: (call(model, data), buffers it is meant to change on success, the readings of the
    # data that go through every batch: a failure is planted in each of them in turn)
    "precise_bn": (lambda m, d: bnscope.precise_bn(m, d), STATS, (1,)),
    "adapt_bn": (lambda m, d: bnscope.adapt_bn(m, d, prior=8), STATS, (1,)),
    "inspect": (lambda m, d: bnscope.inspect(m, d), set(), (1, 2)),
    # ghost reads the data twice (the batch size comes from the BN layers' inputs)
    "ghost_analysis": (lambda m, d: bnscope.ghost_analysis(m, d, sizes=[2, 4]), set(), (1, 2)),
    "evaluate_models": (
        lambda m, d: bnscope.evaluate_models({"a": m}, d, modes={"a": "batch"}), set(), (1,),
    ),
    "compare_models": (lambda m, d: bnscope.compare_models(m, m, d), set(), (1,)),
    "static_inspect": (lambda m, d: bnscope.static_inspect(m), set(), ()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_state_after_success(name):
    fn, changes, _ = FUNCTIONS[name]
    model = make_model()
    before = snapshot(model, skip_buffers=changes)
    fn(model, batches())
    assert_same_state(before, snapshot(model, skip_buffers=changes))
    if changes:  # and the statistics did change, nothing else
        assert not torch.equal(snapshot(make_model())["bn.running_mean"][0],
                               model.bn.running_mean)  # fmt: skip


FAILURES = {
    "runtime-error-in-data": lambda read: Failing(RuntimeError("disk went away"), 2, read),
    "keyboard-interrupt": lambda read: Failing(KeyboardInterrupt(), 2, read),
    "wrong-shape-in-model": lambda read: bad_shape_at(2, read),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", [n for n, f in FUNCTIONS.items() if f[2]])
def test_state_after_failure(name, failure):
    fn, _, reads = FUNCTIONS[name]
    for read in reads:  # fail in every pass over the data
        model = make_model()
        before = snapshot(model)
        with pytest.raises((BnscopeError, RuntimeError, KeyboardInterrupt)):
            fn(model, FAILURES[failure](read))
        assert_same_state(before, snapshot(model))
        assert all("forward" not in m.__dict__ for m in model.modules())

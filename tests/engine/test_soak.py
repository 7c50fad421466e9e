"""Long runs leave nothing behind: after precise, adapt, inspect and ghost return, the model has
exactly the hooks it had, the process the same open files and threads, and no Python object made
during the run is still alive, whether the run took many batches or few, or stopped on an error
(benchmarks/soak.py measures the same over 2,000 batches, with memory sampled during the run).

Why the object count can be exact: after a warm-up run of the same op (same call, progress
callback included) has made what is made once per process (lazy imports, caches, first-call
paths), every object alive is frozen (``gc.freeze()``: moved out of the generations that
``gc.get_objects()`` lists). What the list holds after the next run and ``gc.collect()`` is
exactly what that run made and left alive. Every figure an op keeps is a sum of fixed size and
its report is dropped before counting, so a run that leaves nothing behind leaves 0, for 120
batches as for 20; a per-batch leak would grow with the batches, a per-run leak would show in
both. Frozen objects are not scanned, which also keeps each collection fast. During a run,
the objects alive at the end of each pass are as many after 120 batches as after 20.

Objects the garbage collector does not track (numpy arrays, strings, numbers) are not counted:
the label tally's bounded memory has its own test (tests/engine/test_label_mix.py), and
benchmarks/soak.py samples RSS.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import nn

import bnscope
import bnscope.ops.inspect as dynamic
from bnscope.engine import capture
from bnscope.engine.collect import Progress
from bnscope.errors import DataError

from ..models import make_tiny

FEW, MANY = 20, 120


class Stream:
    """``n`` labelled batches of 4 images 3x8x8, generated on the fly from a seeded generator
    (re-iterable, stores nothing). ``bad`` is the index of a batch that holds a NaN."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        for i in range(self.n):
            x = torch.randn(4, 3, 8, 8, generator=g) * 2 + 1
            if i == self.bad:
                x[0, 0, 0, 0] = float("nan")
            yield x, torch.randint(0, 3, (4,), generator=g)


def _progress(done: int, total: int | None) -> None:
    assert total is not None and 0 <= done <= total


#: each op on a model and data, with a progress callback
OPS: dict[str, Callable[[nn.Module, Stream, Progress], Any]] = {
    "precise": lambda m, d, p: bnscope.precise_bn(m, d, batches=d.n, progress=p),
    "adapt": lambda m, d, p: bnscope.adapt_bn(m, d, prior=16, batches=d.n, progress=p),
    "inspect": lambda m, d, p: bnscope.inspect(m, d, batches=d.n, progress=p),
    "ghost": lambda m, d, p: bnscope.ghost_analysis(m, d, sizes=[2, 4], batches=d.n, progress=p),
}


def hooks(model: nn.Module) -> dict[str, int]:
    """Every hook that could outlive a run, by kind: the model's modules' hook dictionaries,
    instance ``forward`` attributes (patched forwards), torch's global module hooks and the
    torch-function-mode stack."""
    counts: dict[str, int] = {}
    for m in model.modules():
        for key, value in vars(m).items():
            if "hook" in key and isinstance(value, dict):
                counts[key] = counts.get(key, 0) + len(value)
        counts["patched forward"] = counts.get("patched forward", 0) + ("forward" in vars(m))
    for key in dir(module_globals):
        value = getattr(module_globals, key)
        if key.startswith("_global") and "hook" in key and isinstance(value, dict):
            counts[key] = len(value)
    counts["torch function modes"] = torch._C._len_torch_function_stack()
    return counts


def process_state(model: nn.Module) -> dict[str, Any]:
    return {
        "hooks": hooks(model),
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os threads": len(os.listdir("/proc/self/task")),
    }


def new_objects() -> int:
    """Objects made since the last ``gc.freeze()`` and still alive (after a collection)."""
    gc.collect()
    return len(gc.get_objects())


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """Every object alive now is left out of ``gc.get_objects()`` for the block (put back
    afterwards): in the block the list holds only what the block made and kept alive."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts open files and threads through /proc"
)


@pytest.fixture(autouse=True)
def _same_paths_on_any_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine's flag read after every forward (``CHECK_SECONDS`` 0) instead of every 5
    seconds: every run takes the same code paths however fast the machine is (a first timed
    check in the long run only would make what it makes once per process there), and the
    check path itself runs on every batch. One intra-op thread: these models are tiny, and on
    a busy machine several threads spin against each other (ten times slower); the count is
    restored afterwards."""
    monkeypatch.setattr(capture, "CHECK_SECONDS", 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("op", list(OPS))
def test_long_and_short_runs_leave_the_same_hooks_files_threads_and_no_objects(op: str) -> None:
    model = make_tiny()
    run = OPS[op]
    run(model, Stream(FEW), _progress)  # warm-up: what is made once per process
    before = process_state(model)
    assert sum(before["hooks"].values()) == 0
    left: dict[int, int] = {}
    for n in (MANY, FEW):
        with frozen():
            report = run(model, Stream(n), _progress)
            assert report.extra["batches"] == n
            del report
            assert process_state(model) == before
            left[n] = new_objects()
    assert left == {MANY: 0, FEW: 0}


@pytest.mark.parametrize("op", list(OPS))
def test_the_objects_alive_during_a_run_do_not_grow_with_its_batches(
    op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the end of each pass (read through ``progress``), the objects made since the run
    began and still alive are as many after 120 batches as after 20: nothing is kept per
    batch, neither statistics (float64 sums of fixed size) nor inspect's outputs for its
    second pass (packed into a few tensors). The dynamic report's trace of batch means, kept
    for its figure and bounded by ``TRACE_BATCHES`` rows per layer, is cut to 1 row here."""
    monkeypatch.setattr(dynamic, "TRACE_BATCHES", 1)
    model = make_tiny()
    passes = 2 if op in ("inspect", "ghost") else 1
    counts: list[int] = []

    def progress(done: int, total: int | None) -> None:
        assert total is not None
        if done and done % (total // passes) == 0:
            counts.append(new_objects())

    run = OPS[op]
    run(model, Stream(FEW), progress)
    seen: dict[int, list[int]] = {}
    for n in (MANY, FEW):
        counts.clear()
        with frozen():
            run(model, Stream(n), progress)
        seen[n] = list(counts)
    assert len(seen[MANY]) == passes and seen[MANY] == seen[FEW]


@pytest.mark.parametrize("op", list(OPS))
def test_a_run_stopped_by_an_error_leaves_nothing_behind(op: str) -> None:
    """NaN in batch 60 of 120 stops the collection pass with a DataError (at that batch's flag
    read): hooks, forwards, files and threads are as before, and once the error is dropped no
    object it made is alive. The first error is a warm-up for what an error path makes once
    per process."""
    model = make_tiny()
    run = OPS[op]
    run(model, Stream(FEW), _progress)
    before = process_state(model)
    left = []
    for _ in range(2):
        with frozen():
            with pytest.raises(DataError, match="NaN or Inf reached BN layer") as info:
                run(model, Stream(MANY, bad=60), _progress)
            del info
            assert process_state(model) == before
            left.append(new_objects())
    assert left[1] == 0

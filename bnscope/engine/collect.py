"""The collection loop shared by precise, adapt, inspect and ghost.

Runs the model over ``batches`` batches of ``data`` under :class:`~bnscope.engine.capture.BNCapture`
and turns failures into one-line errors that name the batch and the layer. Under an initialized
``torch.distributed`` process group each rank collects its own data and the float64 sufficient
statistics are all-reduced once at the end (:mod:`bnscope.engine.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import DataError, UsageError
from ..io.batches import split_batch
from ..io.data import DataSource, known_batches
from . import distributed
from .capture import BNCapture, LayerStats, NonFiniteInput, RowObserver, SkippedLayer
from .labels import MAX_POOLED_LABEL, LabelCounts, LabelTally, dense, from_dense
from .runner import Call, Runner, default_call, make_runner, model_device, placed

#: ``progress(done, total)`` once before the first batch (``done`` 0) and after each batch:
#: ``total`` is the number of batches the run will take when that is known (see
#: :func:`expected_batches`), else None
Progress = Callable[[int, "int | None"], None]
#: ``on_output(batch_index, batch, output)``: a batch's output of the collection forward
OutputHook = Callable[[int, Any, Any], None]

__all__ = [
    "Call",
    "Collection",
    "OutputHook",
    "Progress",
    "check_batches",
    "collect",
    "default_call",
    "expected_batches",
    "model_device",
]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_R = TypeVar("_R", bound=_Named)


@dataclass
class Collection:
    """Population statistics per BN layer (float64 accumulators) and what was run.

    Under a process group every figure (statistics, calls, samples, batches, label counts)
    covers all ranks and ``world_size`` says how many took part. ``labels`` are the counts of
    the batches' labels (:mod:`bnscope.engine.labels`; None when some batch had none)."""

    layers: dict[str, LayerStats]
    skipped: list[SkippedLayer]
    batches: int
    samples: int
    order: list[str]
    world_size: int = 1
    labels: LabelCounts | None = None

    @property
    def max_rows(self) -> int:
        """The largest leading size of any BN layer's input in one call (the batch size as
        the BN layers see it)."""
        return max((st.max_rows for st in self.layers.values()), default=0)

    def in_module_order(self, records: list[_R]) -> list[_R]:
        """Records (anything with ``.name``) sorted into module order."""
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(records, key=lambda r: rank.get(r.name, len(rank)))


def _failing_module(exc: BaseException, names: dict[int, str]) -> str:
    """The innermost module of the model on the exception's traceback, as "name (Class)":
    found from the frames' ``self`` after the fact, so the happy path costs nothing."""
    where = "(model)"
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module):
            name = names.get(id(obj))
            if name:
                where = f"{name} ({type(obj).__name__})"
        tb = tb.tb_next
    return where


def _shape_of(batch: Any) -> str:
    try:
        inputs, _ = split_batch(batch)
    except Exception:  # noqa: BLE001 - only for the message
        return "?"
    return "x".join(str(s) for s in inputs.shape) if isinstance(inputs, torch.Tensor) else "?"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split()) if text else type(exc).__name__


def check_batches(batches: int | None, data: Any = None) -> None:
    """Refuse a ``batches`` that is not a positive integer, or, given ``data``, one that is
    more than the data holds when its length is known (:func:`bnscope.io.data.known_batches`):
    before any of it is read, not after reading all of it."""
    if batches is not None and (not isinstance(batches, int) or batches < 1):
        raise UsageError(
            f"batches must be a positive integer, got {batches!r}", "e.g. batches=100"
        )
    known = None if batches is None or data is None else known_batches(data)
    if known is None or batches is None or batches <= known[0]:
        return
    available, size = known
    details = [data.description] if isinstance(data, DataSource) else []
    if size is not None:
        details.append(f"in batches of {size}")
    detail = f" ({', '.join(details)})" if details else ""
    raise DataError(
        f"batches={batches}, but the data holds {available} "
        f"batch{'' if available == 1 else 'es'}{detail}",
        f"pass batches={available} or less (batches per rank under torchrun), or leave "
        "batches= out to use all of the data",
    )


def expected_batches(data: Iterable[Any], batches: int | None) -> int | None:
    """The batches one pass over ``data`` takes, when that is known before reading it:
    ``batches`` capped by the data's length (:func:`bnscope.io.data.batch_count`: a DataLoader,
    a list, a data spec's loader), or ``batches`` alone when the length is unknown (None when
    both are)."""
    from ..io.data import batch_count

    count = batch_count(data)
    if count is None:
        return batches
    return count if batches is None else min(batches, count)


def collect(
    model: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    only_training: bool = False,
    process_group: Any = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    observer: RowObserver | None = None,
    on_output: OutputHook | None = None,
    input_key: str | None = None,
    include_frozen: bool = False,
) -> Collection:
    """Run ``model`` over the data in collection mode and return the pooled statistics.

    The model's state is restored afterwards (see :class:`~bnscope.engine.capture.BNCapture`);
    ``batches=None`` uses all of the data. Data that runs out before ``batches`` is an error.
    ``device`` (default: where the model is), ``amp`` (``"bf16"``/``"fp16"``: every forward
    under autocast; the statistics are those of the tensors that reach the BN layers) and
    ``channels_last`` say how the model runs, ``call(model, batch)`` or ``input_key`` how it
    takes a batch (:mod:`bnscope.engine.runner`; by default inputs follow ``forward``'s signature).
    ``observer`` sees the per-call batch moments (:data:`~bnscope.engine.capture.RowObserver`);
    ``on_output(index, batch, output)`` sees each batch's output of the collection forward
    (BN with batch statistics). Frozen BN layers are measured (their inputs pooled) while they
    normalize with their stored statistics, or, with ``include_frozen``, with batch
    statistics like the others.

    Under ``torch.distributed`` (``process_group=None`` uses the default group when it is
    initialized; :data:`bnscope.engine.distributed.LOCAL` turns communication off) ``data`` is this
    rank's share and ``batches`` counts this rank's batches. At the end the ranks exchange
    their status (a rank's error stops every rank: it re-raises its error, the others raise
    :class:`~bnscope.engine.distributed.PeerFailed`), then all-reduce count, sum and centred second
    moment of every layer in float64, plus calls, samples and calls per forward: every rank
    returns the same statistics, equal to one process's on the union of the data. A rank
    whose share is empty is fine when ``batches`` is None. Every rank must call this the same
    number of times, with the same model.
    """
    runner = make_runner(model, call, device, amp, channels_last, input_key)
    group = distributed.resolve_group(process_group)

    def run(allow_empty: bool) -> Collection:
        return _collect_local(
            model, data, allow_empty=allow_empty, batches=batches, runner=runner,
            progress=progress, only_training=only_training, observer=observer,
            on_output=on_output, include_frozen=include_frozen,
        )  # fmt: skip

    if group is None:
        return run(False)
    try:
        collection = run(batches is None)
    except Exception as exc:
        distributed.announce_failure(exc, group)
        raise
    distributed.check_peers(group)
    _reduce(collection, group)
    if collection.batches == 0:
        raise DataError(
            f"the data yielded no batches on any of the {collection.world_size} ranks",
            "check data= (is it empty?)",
        )
    return collection


def _reduce(collection: Collection, group: Any) -> None:
    """All-reduce a collection's statistics and counters over ``group`` (in place)."""
    stats = list(collection.layers.values())
    n = len(stats)
    labels = collection.labels
    sums = torch.tensor(
        [float(s.calls) for s in stats]
        + [float(s.samples) for s in stats]
        + [float(collection.batches), float(collection.samples)]
        + (
            [float(labels.batches), float(labels.samples), float(labels.single_class)]
            if labels is not None
            else [0.0, 0.0, 0.0]
        ),
        dtype=torch.float64,
    )
    # label counts are pooled when every rank's batches had labels: no rank unlabelled, and
    # the largest label (plus one) sizes the dense per-class vectors
    unlabelled = labels is None and collection.batches > 0
    length = int(labels.classes[-1]) + 1 if labels is not None and len(labels.classes) else 0
    maxima = torch.tensor(
        [float(s.max_calls_per_forward) for s in stats]
        + [float(s.max_rows) for s in stats]
        + [1.0 if unlabelled else 0.0, float(length)],
        dtype=torch.float64,
    )
    total, peak = distributed.reduce_moments([s.acc for s in stats], group, sums, maxima)
    counts = [int(round(v)) for v in (total.tolist() if total is not None else [])]
    peaks = [int(round(v)) for v in (peak.tolist() if peak is not None else [])]
    collection.labels = _pool_labels(labels, counts[2 * n + 2 :], peaks[2 * n :], group)
    for i, st in enumerate(stats):
        st.calls = counts[i]
        st.samples = counts[n + i]
        st.max_calls_per_forward = peaks[i]
        st.max_rows = peaks[n + i]
        st.calls_this_forward = 0
    collection.batches = counts[2 * n]
    collection.samples = counts[2 * n + 1]
    collection.world_size = distributed.get_world_size(group)


def _pool_labels(
    labels: LabelCounts | None, sums: list[int], maxima: list[int], group: Any
) -> LabelCounts | None:
    """The label counts of all ranks: ``sums`` are the pooled (batches, samples, single-class
    batches), ``maxima`` (some rank unlabelled, largest label + 1). Every rank takes the same
    branch, so the one more all-reduce is made by all or by none."""
    batches, samples, single = sums
    unlabelled, length = maxima
    if unlabelled or length == 0 or length > MAX_POOLED_LABEL:
        return None
    empty = LabelCounts(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    local = torch.from_numpy(dense(labels if labels is not None else empty, length))
    pooled = distributed.all_reduce_sum(local, group)
    return from_dense(pooled.numpy(), batches, samples, single)


def _collect_local(
    model: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None,
    runner: Runner,
    progress: Progress | None,
    only_training: bool,
    allow_empty: bool,
    observer: RowObserver | None,
    on_output: OutputHook | None,
    include_frozen: bool = False,
) -> Collection:
    """One process's collection (no communication)."""
    check_batches(batches, data)
    done = 0
    samples = 0
    total = expected_batches(data, batches) if progress is not None else None
    if progress is not None:
        progress(0, total)  # the total is known before the first batch
    tally = LabelTally()
    names = {id(m): n for n, m in model.named_modules() if n}
    with (
        placed(model, runner),
        BNCapture(
            model, only_training=only_training, observer=observer, include_frozen=include_frozen
        ) as cap,
    ):
        iterator = iter(data)
        try:
            with torch.no_grad():
                while batches is None or done < batches:
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    size = runner.samples(batch)
                    # labels as the data yields them: a DataLoader's stay on the host
                    tally.add(runner.labels(batch), size)
                    batch = runner.prepare(batch)
                    try:
                        with cap.forward(done):
                            out = runner(model, batch)
                        cap.end_forward()
                    except NonFiniteInput as exc:
                        raise _non_finite(exc) from exc
                    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                        where = _failing_module(exc, names)
                        raise _forward_error(exc, done, where, batch) from exc
                    if on_output is not None:
                        on_output(done, batch, out)
                    done += 1
                    samples += size
                    if progress is not None:
                        progress(done, total)
                try:
                    cap.finish()
                except NonFiniteInput as exc:
                    raise _non_finite(exc) from exc
        finally:
            # a loader with persistent_workers reuses this iterator for its next epoch (the
            # training loop's): its workers must stay up
            shutdown = getattr(iterator, "_shutdown_workers", None)
            persistent = getattr(iterator, "_persistent_workers", False)
            if callable(shutdown) and not persistent and (batches is not None and done >= batches):
                with contextlib.suppress(Exception):
                    shutdown()
        if done == 0 and not allow_empty:
            raise DataError("the data yielded no batches", "check data= (is it empty?)")
        if batches is not None and done < batches:
            raise DataError(
                f"the data ran out after {done} batches but {batches} were asked for",
                "lower batches= (batches per rank under torchrun), or omit it to use all of "
                "the data",
            )
        return Collection(
            dict(cap.layers), list(cap.skipped), done, samples, list(cap.order),
            labels=tally.counts(),
        )  # fmt: skip


def _non_finite(exc: NonFiniteInput) -> DataError:
    where = f" in batch {exc.batch}" if exc.batch is not None else ""
    return DataError(
        f"NaN or Inf reached BN layer {exc.layer}{where}",
        "check the data and the checkpoint (bnscope inspect CKPT)",
    )


def _forward_error(exc: BaseException, index: int, where: str, batch: Any) -> DataError:
    text = _first_line(exc)
    if "Expected more than 1 value per channel" in text:
        return DataError(
            f"BN layer {where} got 1 value per channel in batch {index} (batch of one sample): "
            "batch statistics need at least 2",
            "use batch_size=2 or more, or drop_last=True to leave out an incomplete last batch "
            "(a data factory batches itself: make it yield 2 or more samples per batch, e.g. a "
            "DataLoader that drops its incomplete last batch)",
        )
    if isinstance(exc, TypeError) and "required positional argument" in text:
        return DataError(
            f"the model failed on batch {index} (input {_shape_of(batch)}) in {where}: {text}",
            "make batches (input1, input2, ..., labels) tuples or dicts keyed by forward's "
            "parameter names, or pass call=file.py:fn to run the model on a batch",
        )
    return DataError(
        f"the model failed on batch {index} (input {_shape_of(batch)}) in {where}: "
        f"{type(exc).__name__}: {text}",
        "check that data= fits the model (channels, image size, input_key=, model_kwargs=)",
    )

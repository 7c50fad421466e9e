"""Precise BN inside a plain PyTorch training loop: :class:`PreciseBNHook`.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", section 3: the EMA of batch statistics
lags a model that is still changing, and evaluating during training with it misjudges the
model; recomputing the population statistics before each evaluation (every N steps or epochs,
on a bounded number of samples) fixes that. fvcore/detectron2's ``PreciseBN`` hook and
mmpretrain's ``PreciseBNHook`` do this for their trainers; this hook does it for any loop, with
:func:`bnscope.precise_bn`'s exact, batch-split-independent statistics (docs/statistics.md,
section 3) and its guarantees: the model fixed during the pass, every module's mode, momentum
and other buffers as before, every rank of a process group ending with the same statistics.

What the hook adds around :func:`~bnscope.ops.precise.precise_bn`:

- when to run (:meth:`PreciseBNHook.maybe_update` with ``every_n_steps``/``every_n_epochs``);
- an exact sample bound (``samples=``: whole batches, the last one cut to what is left; the
  total over all ranks, each rank taking its share);
- the training wrappers unwrapped (DDP, ``torch.compile``, ``AveragedModel``, EMA copies);
- which layers: in a model that is training, the BN layers it trains (fvcore's rule: a layer a
  training loop keeps in eval mode is frozen on purpose); in a model kept in eval mode (an EMA
  or averaged copy), every BN layer;
- the training run left as it was: the global random number generators (Python, NumPy, torch,
  CUDA) are restored after the pass, so the data loader's shuffling for the pass does not
  change what training draws next;
- history for logging: the last report, the step and epoch of each update, a flat summary.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..engine import distributed
from ..engine.collect import Call, Progress, check_batches
from ..engine.runner import BatchProtocol, make_runner
from ..engine.wrappers import unwrap
from ..errors import DataError, UsageError
from ..extras import PreciseReport
from ..ops.precise import precise_bn
from ..records import Status

__all__ = ["HookUpdate", "PreciseBNHook", "sample_share"]


@dataclass(frozen=True)
class HookUpdate:
    """One recomputation by a :class:`PreciseBNHook`: when, on how much data, what changed.

    ``step``/``epoch`` as passed to the hook (None when not given); ``batches``/``samples``
    pooled over all ranks; ``updated``/``not_called`` count BN layers; ``d_mu_max``/
    ``d_var_max`` are the largest per-layer changes of the statistics (how stale the running
    statistics were: docs/statistics.md, section 3), None when no layer was measured;
    ``seconds`` is the wall time of the pass."""

    step: int | None
    epoch: int | None
    batches: int
    samples: int
    updated: int
    not_called: int
    d_mu_max: float | None
    d_var_max: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_share(samples: int, rank: int, world_size: int) -> int:
    """Rank ``rank``'s share of ``samples`` over ``world_size`` ranks: equal shares, the first
    ``samples % world_size`` ranks one more, so that the shares add up to ``samples``."""
    base, extra = divmod(samples, world_size)
    return base + (1 if rank < extra else 0)


def first_rows(batch: Any, k: int, n: int) -> Any:
    """``batch`` (of ``n`` samples) cut to its first ``k``: every tensor inside tuples, lists
    and dicts whose leading size is ``n`` is sliced; other entries are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch[:k] if batch.ndim and batch.shape[0] == n else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(first_rows(v, k, n) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(first_rows(v, k, n) for v in batch)
    if isinstance(batch, Mapping):
        items = {key: first_rows(v, k, n) for key, v in batch.items()}
        try:
            return cast(Any, type(batch))(items)
        except Exception:
            return items
    return batch


class _FirstSamples:
    """The first ``samples`` samples of ``data`` as batches: whole batches, then the last one
    cut to what is left (:func:`first_rows`). Data that runs out first is an error. ``cut``
    records the last cut as (kept, of), for the error a one-sample remainder may cause."""

    def __init__(
        self, data: Iterable[Any], samples: int, protocol: BatchProtocol, asked: str
    ) -> None:
        self.data = data
        self.samples = samples
        self.protocol = protocol
        self.asked = asked
        self.cut: tuple[int, int] | None = None
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        self.iterator = iter(self.data)
        taken = 0
        while taken < self.samples:
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise DataError(
                    f"the data ran out after {taken} samples, but {self.asked}",
                    "lower samples=, or leave it out to use all of the data",
                ) from None
            n = self.protocol.samples(batch)
            if n <= 0:
                raise DataError(
                    f"cannot count the samples of a batch of type {type(batch).__name__} "
                    "(samples= cuts batches at a sample count)",
                    "yield tensors, (inputs, labels) tuples or dicts of tensors, or use "
                    "batches= instead of samples=",
                )
            left = self.samples - taken
            if n > left:
                batch = first_rows(batch, left, n)
                self.cut = (left, n)
                n = left
            taken += n
            yield batch


@contextlib.contextmanager
def rng_preserved(enabled: bool = True) -> Iterator[None]:
    """The global random number generators (Python's, NumPy's, torch's CPU one and, when CUDA
    is initialized, every GPU's) as they were when the block began, also after an error."""
    if not enabled:
        yield
        return
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _positive(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}", f"e.g. {name}=100")
    return value


def _counter(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(
            f"{name} must be a count of {name}s done (an integer 0 or more), got {value!r}",
            f"pass {name}= as the number of {name}s completed so far",
        )
    return value


def _largest(values: Iterable[float | None]) -> float | None:
    """The largest finite-or-infinite value, NaN above everything (a NaN must show); None when
    there is none."""
    found = [v for v in values if v is not None]
    if not found:
        return None
    if any(math.isnan(v) for v in found):
        return math.nan
    return max(found)


class PreciseBNHook:
    """Recompute a model's BatchNorm statistics inside a training loop (Precise BN).

    Construct it once with the model and the data to estimate on, then call it from the loop::

        hook = bnscope.PreciseBNHook(model, train_loader, samples=2048, every_n_epochs=1)
        for epoch in range(1, epochs + 1):
            for x, y in train_loader:
                ...  # forward, backward, optimizer step
            hook.maybe_update(epoch=epoch)  # epochs done so far: updates every epoch
            evaluate(model)

    Each update is :func:`bnscope.precise_bn` on the current model: exact population statistics
    of the model as it is, written into the BN buffers in place; parameters, gradients,
    ``requires_grad``, every module's train/eval mode, momentum and other buffers are left as
    they were, and the optimizer, which holds the same parameter objects, is unaffected. The
    model keeps training afterwards.

    Args:
        model: The network, or the object the loop trains or evaluates:
            ``DistributedDataParallel``/``DataParallel``, a ``torch.compile`` result,
            ``torch.optim.swa_utils.AveragedModel`` or an EMA copy such as timm's
            ``ModelEmaV3`` (the network inside is updated: :func:`~bnscope.engine.wrappers.unwrap`;
            ``n_averaged`` and the like are left alone).
        data: The batches to estimate on: a DataLoader or anything iterable, read afresh
            (``iter(data)``) at each update, so a shuffled loader gives other batches each time.
            Under ``torch.distributed``, this rank's share (e.g. a loader with a
            ``DistributedSampler``).
        every_n_steps: :meth:`maybe_update` updates when ``step`` is a multiple of this.
        every_n_epochs: :meth:`maybe_update` updates when ``epoch`` is a multiple of this.
            With neither, every :meth:`maybe_update` call updates (the loop decides when).
        batches: Read this many batches per update (per rank, as :func:`~bnscope.precise_bn`).
        samples: Read exactly this many samples per update, in all ranks together: whole
            batches, and the last one cut to the samples left (every tensor of the batch whose
            leading size is the batch size is sliced), so the statistics cover exactly
            ``samples`` samples. Under a process group rank r reads ``samples // world_size``,
            plus one for the first ``samples % world_size`` ranks. Not with ``batches``; with
            neither, each update reads all of ``data``.
        call, device, amp, process_group, input_key, channels_last, include_frozen, progress:
            As for :func:`~bnscope.precise_bn` (``amp="bf16"``/``"fp16"``: every forward of the
            pass under autocast).
        only_training: Which BN layers to update. None (default): when the model is in
            training mode, only the BN layers in training mode (a layer the loop keeps in eval
            mode is frozen on purpose, as fvcore's and detectron2's hooks assume); when the
            model is in eval mode (an EMA or averaged copy), all of them. True/False as for
            :func:`~bnscope.precise_bn`.
        preserve_rng: Restore the global random number generators after each pass, so that
            reading ``data`` (a shuffled loader draws its order) does not change what the
            training loop draws afterwards. True by default.

    Under ``torch.distributed`` every rank must call :meth:`maybe_update`/:meth:`update` at the
    same points with the same counters: each update is one collective pass, after which every
    rank holds the same statistics.

    History, for logging: :attr:`last_report` (the report of the last update), :attr:`last_step`
    and :attr:`last_epoch` (its counters), :attr:`history` (a :class:`HookUpdate` per update)
    and :meth:`summary` (the last update's figures as a flat dict for a logger).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        batches: int | None = None,
        samples: int | None = None,
        call: Call | None = None,
        device: torch.device | str | None = None,
        amp: str | torch.dtype | None = None,
        process_group: Any = None,
        only_training: bool | None = None,
        include_frozen: bool = False,
        input_key: str | None = None,
        channels_last: bool = False,
        preserve_rng: bool = True,
        progress: Progress | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"model must be an nn.Module, got {type(model).__name__}",
                "pass the network (or its DDP/AveragedModel/EMA wrapper)",
            )
        self.every_n_steps = _positive("every_n_steps", every_n_steps)
        self.every_n_epochs = _positive("every_n_epochs", every_n_epochs)
        if batches is not None and samples is not None:
            raise UsageError(
                "batches= and samples= both given", "bound each update by one of them"
            )
        check_batches(batches, data)
        self.batches = batches
        self.samples = _positive("samples", samples)
        self.model = model
        self.network = unwrap(model)
        # device, amp and call are checked now, not at the first update hours into training
        make_runner(self.network, call, device, amp, channels_last, input_key)
        self.data = data
        self.call = call
        self.device = device
        self.amp = amp
        self.process_group = process_group
        self.only_training = only_training
        self.include_frozen = include_frozen
        self.input_key = input_key
        self.channels_last = channels_last
        self.preserve_rng = preserve_rng
        self.progress = progress
        self.history: list[HookUpdate] = []
        self.last_report: PreciseReport | None = None
        # (a persistent loader's iterator, its sampler iterator, batches it had yielded) when
        # a pass of this hook left it: in that state it is not in a training loop's epoch
        self._left: tuple[Any, Any, int] | None = None

    # -- when -----------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        """``step`` of the last update (None before the first, or when it was not given)."""
        return self.history[-1].step if self.history else None

    @property
    def last_epoch(self) -> int | None:
        """``epoch`` of the last update (None before the first, or when it was not given)."""
        return self.history[-1].epoch if self.history else None

    @property
    def updates(self) -> int:
        """How many updates have run."""
        return len(self.history)

    def due(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether :meth:`maybe_update` with these counters would update: ``step`` (optimizer
        steps done so far, 1 after the first) is a positive multiple of ``every_n_steps``, or
        ``epoch`` (epochs done so far) a positive multiple of ``every_n_epochs``; always, with
        neither schedule. Never twice at the same ``step`` (the model has not changed), nor,
        for calls with ``epoch`` only, twice at the same ``epoch``."""
        step, epoch = _counter("step", step), _counter("epoch", epoch)
        if self.history:
            last = self.history[-1]
            if step is not None and step == last.step:
                return False
            if step is None and last.step is None and epoch is not None and epoch == last.epoch:
                return False
        if self.every_n_steps is None and self.every_n_epochs is None:
            return True
        if step is None and epoch is None:
            raise UsageError(
                "maybe_update() needs step= or epoch= when every_n_steps= or every_n_epochs= "
                "is set",
                "pass step= (optimizer steps done) or epoch= (epochs done), or call update()",
            )
        by_step = bool(self.every_n_steps and step and step % self.every_n_steps == 0)
        by_epoch = bool(self.every_n_epochs and epoch and epoch % self.every_n_epochs == 0)
        return by_step or by_epoch

    def maybe_update(
        self, step: int | None = None, epoch: int | None = None
    ) -> PreciseReport | None:
        """:meth:`update` when :meth:`due`, else nothing: the report, or None."""
        if not self.due(step, epoch):
            return None
        return self.update(step=step, epoch=epoch)

    __call__ = maybe_update

    # -- the pass -------------------------------------------------------------------------
    def update(self, step: int | None = None, epoch: int | None = None) -> PreciseReport:
        """Recompute the statistics now (``step``/``epoch`` are recorded in the history).
        Returns the ``precise`` report of :func:`bnscope.precise_bn`."""
        step, epoch = _counter("step", step), _counter("epoch", epoch)
        self._check_not_mid_epoch()
        network = self.network
        only_training = network.training if self.only_training is None else self.only_training
        data: Iterable[Any] = self.data
        bounded: _FirstSamples | None = None
        if self.samples is not None:
            group = distributed.resolve_group(self.process_group)
            rank = distributed.get_rank(group) if group is not None else 0
            world = distributed.get_world_size(group) if group is not None else 1
            share = sample_share(self.samples, rank, world)
            asked = (
                f"rank {rank}'s share of samples={self.samples} over {world} ranks is {share}"
                if world > 1
                else f"samples={self.samples} were asked for"
            )
            protocol = BatchProtocol.for_model(network, self.input_key)
            bounded = _FirstSamples(self.data, share, protocol, asked)
            data = bounded
        start = time.perf_counter()
        try:
            with rng_preserved(self.preserve_rng):
                report = precise_bn(
                    network, data, self.batches, call=self.call, device=self.device,
                    progress=self.progress, only_training=only_training,
                    process_group=self.process_group, amp=self.amp,
                    channels_last=self.channels_last, input_key=self.input_key,
                    include_frozen=self.include_frozen,
                )  # fmt: skip
        except DataError as exc:
            cut = bounded.cut if bounded is not None else None
            if cut is not None and cut[0] == 1 and "1 value per channel" in exc.message:
                raise DataError(
                    f"samples={self.samples} leaves a last batch of 1 sample (cut from "
                    f"{cut[1]}), and a BN layer cannot normalize 1 value per channel",
                    "pick samples= so that the last batch keeps 2 or more samples",
                ) from exc
            raise
        finally:
            self._remember_iterator()
        seconds = time.perf_counter() - start
        self.history.append(_summarize(report, step, epoch, seconds))
        self.last_report = report
        return report

    def _check_not_mid_epoch(self) -> None:
        """Refuse a ``persistent_workers`` DataLoader that the training loop is in the middle
        of reading: ``iter()`` on it resets that very iterator, which would end the training
        loop's epoch early (or make it read the batches again)."""
        data = self.data
        iterator = getattr(data, "_iterator", None)
        if iterator is None or not getattr(data, "persistent_workers", False):
            return
        yielded = getattr(iterator, "_num_yielded", 0)
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            return
        if not 0 < yielded < total or self._left_by_us(iterator, yielded):
            return
        raise UsageError(
            f"data= is a DataLoader with persistent_workers=True that is in the middle of an "
            f"epoch ({yielded} of {total} batches read): reading it here would reset the "
            "training loop's iterator",
            "give the hook its own DataLoader over the dataset, or update at epoch ends",
        )

    def _left_by_us(self, iterator: Any, yielded: int) -> bool:
        """Whether ``iterator`` is as this hook's last pass left it (each epoch of a training
        loop makes a new sampler iterator)."""
        if self._left is None:
            return False
        it, sampler_iter, count = self._left
        return it is iterator and sampler_iter is getattr(iterator, "_sampler_iter", None) and (
            count == yielded
        )

    def _remember_iterator(self) -> None:
        data = self.data
        if not getattr(data, "persistent_workers", False):
            return
        iterator = getattr(data, "_iterator", None)
        if iterator is not None:
            sampler_iter = getattr(iterator, "_sampler_iter", None)
            self._left = (iterator, sampler_iter, getattr(iterator, "_num_yielded", 0))

    # -- history --------------------------------------------------------------------------
    def summary(self, prefix: str = "precise_bn/") -> dict[str, float]:
        """The last update's figures for a logger, keys ``prefix + name``: ``d_mu_max``,
        ``d_var_max`` (when measured), ``samples``, ``batches``, ``updated``,
        ``not_called``, ``seconds``, and ``step``/``epoch`` when given. Empty before the first
        update."""
        if not self.history:
            return {}
        last = self.history[-1].to_dict()
        return {prefix + k: float(v) for k, v in last.items() if v is not None}

    def __repr__(self) -> str:
        when = []
        if self.every_n_steps:
            when.append(f"every_n_steps={self.every_n_steps}")
        if self.every_n_epochs:
            when.append(f"every_n_epochs={self.every_n_epochs}")
        if self.samples is not None:
            when.append(f"samples={self.samples}")
        if self.batches is not None:
            when.append(f"batches={self.batches}")
        what = ", ".join([type(self.network).__name__, *when])
        return f"PreciseBNHook({what}, updates={self.updates})"


def _summarize(
    report: PreciseReport, step: int | None, epoch: int | None, seconds: float
) -> HookUpdate:
    measured = [lay for lay in report.layers if lay.status in (Status.UPDATED, Status.FROZEN)]
    return HookUpdate(
        step=step,
        epoch=epoch,
        batches=int(report.extra["batches"]),
        samples=int(report.extra["samples"]),
        updated=sum(1 for lay in report.layers if lay.status == Status.UPDATED),
        not_called=sum(1 for lay in report.layers if lay.status == Status.NOT_CALLED),
        d_mu_max=_largest(lay.d_mu_max for lay in measured),
        d_var_max=_largest(lay.d_var_max for lay in measured),
        seconds=seconds,
    )

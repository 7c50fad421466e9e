"""Context managers that put a model in collection mode and always restore it.

:class:`BNCapture` collects, for every BatchNorm layer, the statistics of every call's input
while the forward runs with batch statistics (as in training), with no parameter change and no
EMA update kept. On exit (normal, exception or KeyboardInterrupt) each module gets back its own
``training`` flag, every BN layer its momentum and its very buffer tensors (which collection
never writes), and every hook added here is removed.

How batch statistics are read, without slowing the forward down. For layers whose forward is
PyTorch's own (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` run locally, initialized
``LazyBatchNorm``) with float32/float64 buffers, momentum is 1 during collection, so the BN
kernel itself writes each call's batch mean and unbiased batch variance n/(n-1) var_B into the
running buffers. A pre-hook points those buffers at the next row of a preallocated block
(:class:`_Block`, :data:`ROWS` rows per layer): per call that is two dictionary assignments and
no tensor operation at all. When a block is full (checked between forwards) its rows are merged
into the layer's float64 accumulator in bulk
(:meth:`bnscope.engine.stats.MomentAccumulator.add_rows`, exact: law of total variance, then
Chan et al.'s merge), together with device-side checks for non-finite rows and for
ill-conditioned channels. Nothing is read back to the host inside the loop: the flags are read
once after a layer's first forward, at most every :data:`CHECK_SECONDS` after that, and at the
end (:mod:`bnscope.engine.sync`).

The kernel is checked, not trusted. In a layer's first forward the pre-hook also computes
float64 moments of each call's input; after that forward (one read for all new layers) they are
compared with what the kernel wrote. Where the kernel is off by more than :data:`KERNEL_TOL`
(|mean|/std large enough that a float32 batch mean loses digits; CPU kernels for channels-last
or bfloat16 inputs, which accumulate in float32 and can be 1e-5 off), the layer keeps the
float64 rows and takes the exact path from then on; otherwise the float64 rows are dropped. A
layer whose channels become ill-conditioned later (|mean|/std above :data:`ILL_CONDITIONED`,
flagged at each merge) switches at the next check.

The exact float64 path: other ``_BatchNorm`` subclasses (custom forwards, whose buffer updates
bnscope cannot vouch for), layers with float16/bfloat16 buffers (a batch mean rounded to half
precision is useless) and the layers above get float64 moments of their input computed in the
pre-hook, written to float64 rows and merged the same way.

``SyncBatchNorm`` runs as a plain BatchNorm during collection (also under a process group, and
on CPU): each rank normalizes with its own batch statistics and the ranks pool float64
sufficient statistics once at the end (:mod:`bnscope.engine.distributed`), instead of all-reducing
every batch. The module keeps its class.
"""

from __future__ import annotations

import contextlib
import math
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..records import layer_label
from . import sync
from .distributed import local_batchnorm, local_sync_forward
from .intercept import Observation, observed
from .stats import MomentAccumulator

#: |mean|/std above which a layer's batch moments are computed in float64 from its input.
ILL_CONDITIONED = 100.0
#: a native layer's kernel must reproduce float64 batch moments of its first forward to this
#: (relative variance; mean in units of sigma), else the layer takes the exact path
KERNEL_TOL = 5e-7
#: rows (calls) per layer block before the block is merged into the float64 accumulator
ROWS = 64
#: after a layer's first forward, error flags are read at most this often (seconds)
CHECK_SECONDS = 5.0

F64 = torch.float64
_NATIVE_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward, local_sync_forward}

#: called with (layer name, float64 batch means [r, C], float64 biased batch variances [r, C],
#: elements per channel n) for every block of rows, before it is merged
RowObserver = Callable[[str, torch.Tensor, torch.Tensor, int], None]


def is_batchnorm(module: nn.Module) -> bool:
    """Any ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm, custom)."""
    return isinstance(module, _BatchNorm)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A frozen BN layer: running statistics (``running_mean`` and ``running_var`` buffers of
    the same 1-D shape) but no batch-statistics mode, i.e. not a ``_BatchNorm``: torchvision's
    and detectron2's ``FrozenBatchNorm2d`` and the like. Its forward always normalizes with the
    stored statistics."""
    if isinstance(module, _BatchNorm):
        return False
    mean = module._buffers.get("running_mean")
    var = module._buffers.get("running_var")
    return (
        isinstance(mean, torch.Tensor)
        and isinstance(var, torch.Tensor)
        and mean.ndim == 1
        and mean.shape == var.shape
        and mean.is_floating_point()
    )


def num_features(module: nn.Module) -> int:
    """Channels of a BN layer (frozen ones have no ``num_features`` attribute)."""
    n = getattr(module, "num_features", None)
    if isinstance(n, int):
        return n
    mean = module._buffers.get("running_mean")
    return int(mean.numel()) if isinstance(mean, torch.Tensor) else 0


def _native(module: nn.Module) -> bool:
    """PyTorch's own BN forward with float32/float64 buffers: its running_mean/var can carry
    the batch moments. float16/bfloat16 buffers would round each batch mean to the dtype (up to
    ~0.05 sigma in float16 at |mean|/std = 100), so such layers take the exact float64 path."""
    if type(module).forward not in _NATIVE_FORWARDS:
        return False
    buf = getattr(module, "running_mean", None)
    return buf is None or buf.dtype in (torch.float32, F64)


class _Block:
    """Preallocated rows for one layer's per-call batch moments, for calls with ``n``
    elements per channel. ``native`` rows hold what the BN kernel writes with momentum 1
    (batch mean, unbiased batch variance, in the buffer dtype); the other rows hold float64
    mean and biased variance computed from the input."""

    def __init__(
        self, channels: int, n: int, dtype: torch.dtype, device: torch.device, native: bool
    ) -> None:
        self.n = n
        self.native = native
        self.dtype = dtype
        self.device = device
        self.channels = channels
        self.used = 0
        self.batches = array("q")  # batch index of each used row
        self._allocate(ROWS)

    def _allocate(self, rows: int) -> None:
        self.mean = torch.zeros(rows, self.channels, dtype=self.dtype, device=self.device)
        self.var = torch.zeros(rows, self.channels, dtype=self.dtype, device=self.device)
        # every row's views made once here (one unbind): taking a row costs no tensor operation
        self.row_views = list(zip(self.mean.unbind(0), self.var.unbind(0), strict=True))

    @property
    def capacity(self) -> int:
        return len(self.row_views)

    def take(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next free (mean, var) row pair; the block grows when one forward calls the
        layer more often than it has rows (flushes only happen between forwards)."""
        if self.used == self.capacity:
            old_mean, old_var = self.mean, self.var
            self._allocate(2 * self.used)
            self.mean[: self.used].copy_(old_mean)
            self.var[: self.used].copy_(old_var)
        i = self.used
        self.used += 1
        self.batches.append(batch)
        return self.row_views[i]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The used rows as stored, [r, C] each."""
        r = self.used
        if r == self.capacity:
            return self.mean, self.var
        return self.mean[:r], self.var[:r]

    def moments(self, means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """float64 (means, biased variances) of rows as returned by :meth:`rows`."""
        if not self.native:
            return means, variances
        # not in place: for float64 buffers .to(F64) is the row tensor itself
        return means.to(F64), variances.to(F64) * ((self.n - 1) / self.n)

    def reset(self) -> None:
        # Rows are not cleared: with momentum 1 the kernel writes 0 * old + batch, exact for
        # finite old values; a non-finite row stops the run at the next check (the first bad
        # row is still the earliest one).
        self.used = 0
        self.batches = array("q")


@dataclass
class LayerStats:
    """What was collected for one BN layer."""

    name: str
    module: nn.Module
    acc: MomentAccumulator
    num_features: int = 0
    frozen: bool = False  # a frozen BN layer (no batch-statistics mode of its own)
    calls: int = 0
    samples: int = 0
    max_calls_per_forward: int = 0
    calls_this_forward: int = 0
    samples_this_forward: int = 0
    max_rows: int = 0  # the largest leading size of one call's input
    exact_note: str | None = None  # why a custom forward stays on the exact path
    exact_path: bool = False
    # engine state (device tensors are read only at check points)
    blocks: dict[tuple[int, bool], _Block] = field(default_factory=dict)
    #: merged blocks not yet checked: (per-row float64 sums, non-finite exactly when the row
    #: is; ill-conditioned flag or None; batch index of each row)
    pending: list[tuple[torch.Tensor, torch.Tensor | None, array[int]]] = field(
        default_factory=list
    )
    first_call: int = -1  # order of the layer's first call among all layers
    checked: bool = False  # the first-forward check was done

    @property
    def called(self) -> bool:
        return self.calls > 0

    @property
    def running_mean(self) -> torch.Tensor:
        """The layer's ``running_mean`` buffer (every collected layer has one)."""
        return cast(torch.Tensor, self.module.running_mean)

    @property
    def running_var(self) -> torch.Tensor:
        """The layer's ``running_var`` buffer (every collected layer has one)."""
        return cast(torch.Tensor, self.module.running_var)


@dataclass
class SkippedLayer:
    """A BN layer that collection leaves alone, with the reason."""

    name: str
    num_features: int
    reason: str


@dataclass
class _Saved:
    training: dict[nn.Module, bool] = field(default_factory=dict)
    momentum: dict[nn.Module, float | None] = field(default_factory=dict)
    buffers: dict[nn.Module, dict[str, torch.Tensor | None]] = field(default_factory=dict)


class NonFiniteInput(RuntimeError):
    """A BN layer received NaN or Inf (carries the layer name and, when known, the batch)."""

    def __init__(self, layer: str, batch: int | None = None) -> None:
        super().__init__(f"NaN or Inf reached BN layer {layer}")
        self.layer = layer
        self.batch = batch


_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class BNCapture:
    """Collect per-call input statistics of BN layers; restore the model on exit.

    ``only_training=True`` leaves layers that are in eval mode (frozen) untouched and skipped.
    Layers with ``track_running_stats=False`` are always skipped (they have no statistics).
    Around each model call use :meth:`forward`, then :meth:`end_forward`; :meth:`finish` merges
    what is left and checks the last flags. ``observer`` sees every block of rows (see
    :data:`RowObserver`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        only_training: bool = False,
        observer: RowObserver | None = None,
        include_frozen: bool = False,
    ) -> None:
        self.model = model
        self.only_training = only_training
        self.include_frozen = include_frozen
        self.observer = observer
        self.layers: dict[str, LayerStats] = {}
        self.skipped: list[SkippedLayer] = []
        #: every BN layer's name (collected or skipped) in module order
        self.order: list[str] = []
        self._saved = _Saved()
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()
        self._active = False
        self._batch = 0
        self._calls_seen = 0
        self._scratch: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_check = 0.0
        # custom-forward layers watched during their first forward (see intercept.observed)
        self._observing: dict[nn.Module, contextlib.ExitStack] = {}
        self._observations: dict[nn.Module, Observation] = {}

    # -- setup / teardown ---------------------------------------------------------------
    def __enter__(self) -> BNCapture:
        try:
            self._setup()
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self._restore()

    def _setup(self) -> None:
        for module in self.model.modules():
            self._saved.training[module] = module.training
        targets: list[tuple[str, _BatchNorm]] = []
        frozen: list[tuple[str, nn.Module]] = []
        for name, module in self.model.named_modules():
            if is_frozen_batchnorm(module):
                self.order.append(layer_label(name))
                frozen.append((layer_label(name), module))
                continue
            if not is_batchnorm(module):
                continue
            label = layer_label(name)
            self.order.append(label)
            if not module.track_running_stats or module.running_mean is None:
                self.skipped.append(
                    SkippedLayer(
                        name=label,
                        num_features=module.num_features,
                        reason="track_running_stats=False",
                    )
                )
                continue
            if self.only_training and not module.training:
                self.skipped.append(
                    SkippedLayer(
                        name=label,
                        num_features=module.num_features,
                        reason="in eval mode (only_training=True)",
                    )
                )
                continue
            targets.append((label, module))
        for module in self._saved.training:
            module.training = False  # dropout and everything else in eval mode
        self._stack.enter_context(local_batchnorm(self.model))
        for label, module in targets:
            running_mean, running_var = module.running_mean, module.running_var
            assert running_mean is not None and running_var is not None  # checked above
            self._saved.momentum[module] = module.momentum
            self._saved.buffers[module] = {n: module._buffers.get(n) for n in _STAT_BUFFERS}
            device = running_mean.device
            stats = LayerStats(
                name=label,
                module=module,
                acc=MomentAccumulator(module.num_features, device),
                num_features=module.num_features,
            )
            self.layers[label] = stats
            module.training = True
            native = _native(module)
            stats.exact_path = not native
            # the module's own buffers are never written: scratch copies take the updates
            with torch.no_grad():
                scratch_mean = running_mean.detach().clone()
                scratch_var = running_var.detach().clone()
                if native:  # momentum 1 computes 0 * old + batch: old values must be finite
                    scratch_mean.zero_()
                    scratch_var.fill_(1.0)
            self._scratch[module] = (scratch_mean, scratch_var)
            module._buffers["running_mean"] = scratch_mean
            module._buffers["running_var"] = scratch_var
            tracked = module._buffers.get("num_batches_tracked")
            if tracked is not None:
                module._buffers["num_batches_tracked"] = tracked.clone()
            # native: the kernel writes each call's moments; custom forwards: keep the EMA still
            module.momentum = 1.0 if native else 0.0
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(stats)))
            if not native and _custom_full_precision(module):  # its first forward shows how
                stack = contextlib.ExitStack()
                self._observing[module] = stack
                self._observations[module] = stack.enter_context(observed([module]))[module]
        for label, module in frozen:
            self._saved.buffers[module] = {n: module._buffers.get(n) for n in _STAT_BUFFERS}
            mean = module._buffers["running_mean"]
            assert mean is not None  # is_frozen_batchnorm checked it
            stats = LayerStats(
                name=label,
                module=module,
                acc=MomentAccumulator(mean.numel(), mean.device),
                num_features=mean.numel(),
                frozen=True,
                exact_path=True,
                checked=False,
            )
            self.layers[label] = stats
            self._handles.append(module.register_forward_pre_hook(self._frozen_hook(stats)))
        self._last_check = time.monotonic()

    def _restore(self) -> None:
        errors: list[BaseException] = []
        for stack in self._observing.values():
            try:
                stack.close()
            except BaseException as exc:  # pragma: no cover - defensive
                errors.append(exc)
        self._observing.clear()
        for handle in self._handles:
            try:
                handle.remove()
            except BaseException as exc:  # pragma: no cover - defensive
                errors.append(exc)
        self._handles.clear()
        try:
            self._stack.close()
        except BaseException as exc:  # pragma: no cover - defensive
            errors.append(exc)
        for module, momentum in self._saved.momentum.items():
            module.momentum = momentum  # type: ignore[assignment]
        for module, buffers in self._saved.buffers.items():
            for name, value in buffers.items():
                if name in module._buffers:
                    module._buffers[name] = value
        for module, flag in self._saved.training.items():
            module.training = flag
        self._saved = _Saved()
        self._scratch.clear()
        if errors:  # pragma: no cover
            raise errors[0]

    # -- the per-call hook ----------------------------------------------------------------
    def _pre_hook(self, stats: LayerStats) -> Any:
        scratch = self._scratch[stats.module]

        def hook(module: _BatchNorm, args: tuple[Any, ...]) -> None:
            buffers = module._buffers
            x = args[0]
            channels, n = self._count_call(stats, x)
            if n == 0:
                return
            if not stats.exact_path:
                block = stats.blocks.get((n, True))
                if block is None:
                    block = stats.blocks[(n, True)] = _Block(
                        channels, n, scratch[0].dtype, scratch[0].device, True
                    )
                buffers["running_mean"], buffers["running_var"] = block.take(self._batch)
                if stats.checked:
                    return
                # the layer's first forward: float64 moments too, to check the kernel's
            else:
                buffers["running_mean"], buffers["running_var"] = scratch
            self._exact_row(stats, x, channels, n)

        return hook

    def _count_call(self, stats: LayerStats, x: torch.Tensor) -> tuple[int, int]:
        """Count one call of ``stats``'s layer on input ``x`` (calls, samples, rows); returns
        (channels, elements per channel)."""
        channels = x.shape[1] if x.ndim > 1 else x.numel()
        n = x.numel() // max(channels, 1)
        if stats.calls == 0:
            stats.first_call = self._calls_seen
        self._calls_seen += 1
        stats.calls += 1
        stats.calls_this_forward += 1
        rows = int(x.shape[0]) if x.ndim > 1 else 1
        stats.samples += rows
        stats.samples_this_forward += rows
        if rows > stats.max_rows:
            stats.max_rows = rows
        return channels, n

    def _exact_row(
        self, stats: LayerStats, x: torch.Tensor, channels: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's float64 mean and (biased) variance of ``x`` per channel into the
        next row of the layer's float64 block for ``n`` elements; returns (mean, var)."""
        block = stats.blocks.get((n, False))
        if block is None:
            block = stats.blocks[(n, False)] = _Block(channels, n, F64, x.device, False)
        mean_row, var_row = block.take(self._batch)
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x.detach().to(F64), dim=dims, correction=0)
        mean_row.copy_(mean)
        var_row.copy_(var)
        return mean, var

    def _frozen_hook(self, stats: LayerStats) -> Any:
        """A frozen layer: float64 moments of its input, and with ``include_frozen`` its own
        forward normalizes with this call's batch statistics (its running_mean/running_var
        slots hold them for the call), as a BatchNorm in training mode would."""
        saved = self._saved.buffers[stats.module]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            channels, n = self._count_call(stats, x)
            if n == 0:
                return
            mean, var = self._exact_row(stats, x, channels, n)
            if self.include_frozen:
                own_mean, own_var = saved["running_mean"], saved["running_var"]
                assert own_mean is not None and own_var is not None
                module._buffers["running_mean"] = mean.to(own_mean.dtype)
                module._buffers["running_var"] = var.to(own_var.dtype)

        return hook

    # -- per forward ----------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, batch: int = 0) -> Iterator[None]:
        """Wrap one model call on batch number ``batch``: counts calls per forward. Call
        :meth:`end_forward` after it."""
        self._batch = batch
        for stats in self.layers.values():
            stats.calls_this_forward = 0
            stats.samples_this_forward = 0
        yield
        for stats in self.layers.values():
            stats.max_calls_per_forward = max(stats.max_calls_per_forward, stats.calls_this_forward)

    def end_forward(self) -> None:
        """Bookkeeping after a forward: checks the layers that ran for the first time (see
        :meth:`_first_check`), merges full blocks, and every :data:`CHECK_SECONDS` merges every
        block and reads the error flags of everything merged so far."""
        fresh = [s for s in self.layers.values() if s.calls and not s.checked]
        if fresh:
            self._first_check(fresh)
        due = time.monotonic() - self._last_check >= CHECK_SECONDS
        for stats in self.layers.values():
            for block in stats.blocks.values():
                full = block.used + stats.max_calls_per_forward > block.capacity
                if block.used and (full or due):
                    self._flush(stats, block)
        if due:
            self.check()

    def finish(self) -> None:
        """Merge every remaining row and read the final flags (raises
        :class:`NonFiniteInput` naming the first layer and batch with NaN/Inf)."""
        fresh = [s for s in self.layers.values() if s.calls and not s.checked]
        if fresh:
            self._first_check(fresh)
        for stats in self.layers.values():
            for block in stats.blocks.values():
                self._flush(stats, block)
        self.check(final=True)

    def _first_check(self, fresh: list[LayerStats]) -> None:
        """After the forward in which these layers first ran (one read for all of them):
        NaN/Inf raises :class:`NonFiniteInput`; for a native layer, the batch moments its
        kernel wrote are compared with float64 moments of the same inputs, computed alongside
        in that forward only. A layer whose kernel is off by more than :data:`KERNEL_TOL`
        (relative variance, mean in units of sigma: reduced-precision or channels-last kernels
        that accumulate in float32), or whose channels are ill-conditioned (|mean|/std above
        :data:`ILL_CONDITIONED`: even a kernel that happened to round well on this batch
        would lose digits on others), keeps the float64 rows and takes the exact path from
        now on; the others keep the kernel's rows."""
        flags = []
        for stats in fresh:
            bad = torch.zeros((), dtype=torch.bool, device=stats.acc.mean.device)
            off = torch.zeros_like(bad)
            for (n, native), block in stats.blocks.items():
                if not block.used:
                    continue
                means, variances = block.rows()
                bad = bad | ~torch.isfinite(means.sum() + variances.sum())
                if not native:
                    continue
                off = off | _ill_conditioned(means, variances)  # later batches would lose digits
                exact = stats.blocks.get((n, False))
                if exact is not None and exact.used == block.used:
                    off = off | _kernel_off(block, exact)
                else:
                    off = torch.ones_like(off)  # no float64 rows to compare with
            flags.append(torch.stack([bad, off]))
        values = sync.fetch([torch.stack(flags).to(torch.float64)])[0].tolist()
        broken: list[LayerStats] = []
        for stats, (bad, off) in zip(fresh, values, strict=True):
            stats.checked = True
            if bad:
                broken.append(stats)
                continue
            if stats.module in self._observing:
                self._end_observation(stats)
                continue
            if stats.exact_path:
                continue
            if off:
                stats.exact_path = True
                keep = False
            else:
                keep = True
            stats.blocks = {key: b for key, b in stats.blocks.items() if key[1] == keep}
        if broken:
            first = min(broken, key=lambda s: s.first_call)
            raise NonFiniteInput(first.name, self._batch)

    def _end_observation(self, stats: LayerStats) -> None:
        """After a custom-forward layer's first forward: if every call was one plain
        batch_norm on its input with its running statistics (timm's BatchNormAct2d,
        SyncBatchNorm subclasses), its kernel's moments are read from the next forward on,
        like a native layer's (checked against float64 once more on that forward)."""
        module = cast(_BatchNorm, stats.module)  # observed layers are never frozen ones
        self._observing.pop(module).close()
        observation = self._observations.pop(module)
        if not observation.is_plain:
            stats.exact_note = "; ".join(dict.fromkeys(observation.problems))
            return
        for block in stats.blocks.values():  # the observed forward's float64 rows count
            self._flush(stats, block)
        stats.exact_path = False
        stats.checked = False  # its first fast forward also computes float64 rows
        module.momentum = 1.0
        scratch_mean, scratch_var = self._scratch[module]
        with torch.no_grad():  # momentum 1 computes 0 * old + batch: old values must be finite
            scratch_mean.zero_()
            scratch_var.fill_(1.0)

    def _flush(self, stats: LayerStats, block: _Block) -> None:
        """Merge a block's rows into the layer's float64 accumulator, keeping device flags
        (finite rows, ill conditioning) for the next :meth:`check`: about 30 device operations
        for up to :data:`ROWS` calls, none of them a host read."""
        if not block.used:
            return
        rows_mean, rows_var = block.rows()
        ill = _ill_conditioned(rows_mean, rows_var) if block.native else None
        means, variances = block.moments(rows_mean, rows_var)
        row_sums = means.sum(1) + variances.sum(1)  # non-finite exactly when a row is
        if self.observer is not None:
            self.observer(stats.name, means, variances, block.n)
        stats.pending.append((row_sums, ill, block.batches))
        stats.acc.add_rows(means, variances, block.n)
        block.reset()

    def check(self, final: bool = False) -> None:
        """Read the flags of every merged block (one transfer): NaN/Inf raises
        :class:`NonFiniteInput` naming the earliest batch (and the first layer called in it);
        a native layer that became ill-conditioned takes the exact path from now on."""
        self._last_check = time.monotonic()
        watched = [s for s in self.layers.values() if s.pending]
        if not watched:
            return
        tensors: list[torch.Tensor] = []
        for stats in watched:
            for row_sums, ill, _ in stats.pending:
                tensors.append(row_sums)
                if ill is not None:
                    tensors.append(ill.reshape(1).to(row_sums.dtype))
        host = iter(t.tolist() for t in sync.fetch(tensors))
        broken = []
        switch = []
        for stats in watched:
            bad_batch = None
            became_ill = False
            for _, ill, batches in stats.pending:
                sums = next(host)
                if ill is not None and next(host)[0]:
                    became_ill = True
                if bad_batch is None:
                    bad = next((i for i, v in enumerate(sums) if not math.isfinite(v)), None)
                    if bad is not None:
                        bad_batch = batches[bad]
            stats.pending.clear()
            if bad_batch is not None:
                broken.append((bad_batch, stats.first_call, stats))
            elif became_ill and not stats.exact_path:
                switch.append(stats)
        if broken:
            batch, _, stats = min(broken, key=lambda b: (b[0], b[1]))
            raise NonFiniteInput(stats.name, batch)
        if not final:
            for stats in switch:
                for block in stats.blocks.values():
                    self._flush(stats, block)  # checked at the next check point
                stats.exact_path = True


def _custom_full_precision(module: _BatchNorm) -> bool:
    """A layer with its own forward and float32/float64 running statistics: if that forward
    turns out to be plain batch norm, the kernel's moments can be read as for a native one."""
    buf = module.running_mean
    return (
        type(module).forward not in _NATIVE_FORWARDS
        and buf is not None
        and buf.dtype in (torch.float32, F64)
    )


def _kernel_off(native: _Block, exact: _Block) -> torch.Tensor:
    """A device bool: the kernel's batch moments (``native`` rows) differ from the float64
    moments of the same calls (``exact`` rows) by more than KERNEL_TOL somewhere."""
    mean_k, var_k = native.moments(*native.rows())
    mean_e, var_e = exact.rows()
    mean_off = (mean_k - mean_e).abs() > var_e.sqrt() * KERNEL_TOL
    var_off = (var_k - var_e).abs() > var_e * KERNEL_TOL
    return (mean_off | var_off).any()


def _ill_conditioned(means: torch.Tensor, unbiased: torch.Tensor) -> torch.Tensor:
    """A device bool: some channel of some row has |mean| / std > ILL_CONDITIONED (mean^2 >
    ILL^2 var, so a zero variance under a non-zero mean counts too)."""
    return (means.square() > unbiased * ILL_CONDITIONED**2).any()


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag and every buffer of every module on exit."""
    flags = {m: m.training for m in model.modules()}
    buffers = {
        (m, n): b.detach().clone()
        for m in model.modules()
        for n, b in m.named_buffers(recurse=False)
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for (m, n), value in buffers.items():
                getattr(m, n).copy_(value)
        for m, flag in flags.items():
            m.training = flag

"""Context managers that put a model in collection mode and always restore it.

:class:`BNCapture` collects, for every BatchNorm layer, the statistics of every call's input
while the forward runs with batch statistics (as in training), with no parameter change and no
EMA update kept. On exit (normal, exception or KeyboardInterrupt) each module gets back its own
``training`` flag, every BN layer its momentum, running buffers and ``num_batches_tracked``, and
every hook added here is removed.

How batch statistics are read. For layers whose forward is PyTorch's own (``BatchNorm1d/2d/3d``,
``SyncBatchNorm`` without a process group, initialized ``LazyBatchNorm``), momentum is set to 1
during collection, so right after each call ``running_mean`` holds the call's batch mean and
``running_var`` its unbiased batch variance n/(n-1) var_B; a forward hook reads both and merges
them in float64 (:mod:`bnscope.stats`). This costs no extra pass over the activations. Other
``_BatchNorm`` subclasses (custom forwards) get a pre-hook that computes float64 moments of the
input itself, and so do a native layer whose channels have |mean|/std above
:data:`ILL_CONDITIONED` (there the float32 batch mean would lose digits) and a layer whose
buffers are float16/bfloat16.

``SyncBatchNorm`` runs as a plain BatchNorm during collection (also under a process group, and
on CPU): each rank normalizes with its own batch statistics and the ranks pool float64
sufficient statistics once at the end (:mod:`bnscope.distributed`), instead of all-reducing
every batch. The module keeps its class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import local_batchnorm
from .stats import MomentAccumulator

#: |mean|/std above which a layer's batch moments are computed in float64 from its input.
ILL_CONDITIONED = 100.0

_NATIVE_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def is_batchnorm(module: nn.Module) -> bool:
    """Any ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm, custom)."""
    return isinstance(module, _BatchNorm)


def _native(module: nn.Module) -> bool:
    """PyTorch's own BN forward with float32/float64 buffers: its running_mean/var can carry
    the batch moments. float16/bfloat16 buffers would round each batch mean to the dtype (up to
    ~0.05 sigma in float16 at |mean|/std = 100), so such layers take the exact float64 path."""
    if type(module).forward not in _NATIVE_FORWARDS:
        return False
    buf = getattr(module, "running_mean", None)
    return buf is None or buf.dtype in (torch.float32, torch.float64)


@dataclass
class LayerStats:
    """What was collected for one BN layer."""

    name: str
    module: _BatchNorm
    acc: MomentAccumulator
    calls: int = 0
    samples: int = 0
    max_calls_per_forward: int = 0
    calls_this_forward: int = 0
    last_mean: torch.Tensor | None = None
    exact_path: bool = False

    @property
    def called(self) -> bool:
        return self.calls > 0


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
    buffers: dict[nn.Module, dict[str, torch.Tensor]] = field(default_factory=dict)


class NonFiniteInput(RuntimeError):
    """A BN layer received NaN or Inf (raised from the hook; carries the layer name)."""

    def __init__(self, layer: str) -> None:
        super().__init__(f"NaN or Inf reached BN layer {layer}")
        self.layer = layer


class BNCapture:
    """Collect per-call input statistics of BN layers; restore the model on exit.

    ``only_training=True`` leaves layers that are in eval mode (frozen) untouched and skipped.
    Layers with ``track_running_stats=False`` are always skipped (they have no statistics).
    Use :meth:`forward` around each model call to count calls per forward.
    """

    def __init__(self, model: nn.Module, *, only_training: bool = False) -> None:
        self.model = model
        self.only_training = only_training
        self.layers: dict[str, LayerStats] = {}
        self.skipped: list[SkippedLayer] = []
        #: every BN layer's name (collected or skipped) in module order
        self.order: list[str] = []
        self._saved = _Saved()
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()
        self._active = False

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
        for name, module in self.model.named_modules():
            if not is_batchnorm(module):
                continue
            label = name or "(root)"
            self.order.append(label)
            if not module.track_running_stats or module.running_mean is None:
                self.skipped.append(
                    SkippedLayer(label, module.num_features, "track_running_stats=False")
                )
                continue
            if self.only_training and not module.training:
                self.skipped.append(
                    SkippedLayer(label, module.num_features, "in eval mode (only_training=True)")
                )
                continue
            targets.append((label, module))
        for module in self._saved.training:
            module.training = False  # dropout and everything else in eval mode
        self._stack.enter_context(local_batchnorm(self.model))
        for label, module in targets:
            self._saved.momentum[module] = module.momentum
            self._saved.buffers[module] = {
                n: b.detach().clone() for n, b in module.named_buffers(recurse=False)
            }
            device = module.running_mean.device
            stats = LayerStats(label, module, MomentAccumulator(module.num_features, device))
            self.layers[label] = stats
            module.training = True
            if _native(module):
                module.momentum = 1.0
                with torch.no_grad():  # 0 * NaN would survive momentum 1
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0)
                self._handles.append(module.register_forward_hook(self._post_hook(stats)))
            else:
                stats.exact_path = True
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(stats)))

    def _restore(self) -> None:
        errors: list[BaseException] = []
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
            module.momentum = momentum
        for module, buffers in self._saved.buffers.items():
            with torch.no_grad():
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
        for module, flag in self._saved.training.items():
            module.training = flag
        self._saved = _Saved()
        if errors:  # pragma: no cover
            raise errors[0]

    # -- hooks ----------------------------------------------------------------------------
    @staticmethod
    def _count(stats: LayerStats, x: torch.Tensor) -> int:
        n = x.numel() // max(stats.module.num_features, 1)
        stats.calls += 1
        stats.calls_this_forward += 1
        stats.samples += int(x.shape[0]) if x.ndim > 1 else 1
        return n

    @staticmethod
    def _ill_conditioned(stats: LayerStats, module: _BatchNorm) -> bool:
        """True when a channel's |mean|/std exceeds ILL_CONDITIONED: the float32 batch mean
        that BN stores would then cost precision, so the layer switches to float64 moments of
        its input. Checked on every call on CPU, on the first call elsewhere (a device sync)."""
        if stats.calls > 1 and module.running_mean.device.type != "cpu":
            return False
        ratio = module.running_mean.abs() / module.running_var.clamp_min(1e-30).sqrt()
        return bool((ratio > ILL_CONDITIONED).any())

    def _post_hook(self, stats: LayerStats) -> Any:
        def hook(module: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            n = self._count(stats, x)
            if stats.exact_path or self._ill_conditioned(stats, module):
                stats.exact_path = True
                stats.acc.update_tensor(x, [d for d in range(x.ndim) if d != 1])
                stats.last_mean = stats.acc.mean
                return
            mean_b = module.running_mean
            var_b = module.running_var.to(torch.float64) * ((n - 1) / n)
            stats.last_mean = mean_b
            stats.acc.update(mean_b, var_b, n)

        return hook

    def _pre_hook(self, stats: LayerStats) -> Any:
        def hook(module: _BatchNorm, args: tuple[Any, ...]) -> None:
            x = args[0]
            self._count(stats, x)
            dims = [d for d in range(x.ndim) if d != 1]
            stats.acc.update_tensor(x, dims)
            stats.last_mean = stats.acc.mean

        return hook

    # -- per forward ------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Wrap one model call: counts calls per forward and checks the batch was finite."""
        for stats in self.layers.values():
            stats.calls_this_forward = 0
            stats.last_mean = None
        yield
        means = []
        for stats in self.layers.values():
            stats.max_calls_per_forward = max(stats.max_calls_per_forward, stats.calls_this_forward)
            if stats.last_mean is not None:
                means.append(stats)
        if means:
            finite = torch.stack(
                [torch.isfinite(s.acc.mean).all() & torch.isfinite(s.acc.m2).all() for s in means]
            )
            if not bool(finite.all()):
                first = next(s for s, ok in zip(means, finite.tolist(), strict=True) if not ok)
                raise NonFiniteInput(first.name)


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

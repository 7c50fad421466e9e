"""The batch-norm call inside a BN layer's own forward: seen, and where needed redirected.

A BN layer is driven through its own forward in every operation, so an activation, dropout or
drop-path that a layer applies after normalizing (timm's ``BatchNormAct2d`` and
``SyncBatchNormAct``) is never lost. Where an operation must know or change how a layer
normalizes, it looks at the one call of :func:`torch.nn.functional.batch_norm` that the
forward makes with the layer's own running statistics, through a
:class:`~torch.overrides.TorchFunctionMode` that is active only while that layer's forward runs
(installed as an instance ``forward`` that calls the class's forward, removed on exit):

- :func:`observed` records whether a forward is "plain batch norm": exactly one
  ``batch_norm`` call on the layer's input with its running statistics, in training mode, with
  the layer's momentum, and no other use of those statistics (the collection engine then reads
  the batch moments the kernel writes, as for PyTorch's own BN classes);
- :func:`redirected` replaces that call's result (ghost batches normalize each chunk with its
  own statistics; the rest of the forward runs unchanged on the result).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_SIGNATURE = inspect.signature(F.batch_norm)


class BatchNormCall(NamedTuple):
    """The arguments of one ``F.batch_norm`` call."""

    input: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool
    momentum: float | None
    eps: float


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> BatchNormCall:
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return BatchNormCall(**bound.arguments)


class _LayerMode(TorchFunctionMode):
    """Active inside one layer's forward: calls ``on_batch_norm`` for each batch_norm call
    made with the layer's running mean (its return value, when not None, replaces the call's
    result) and ``on_other`` for every other torch function."""

    def __init__(
        self,
        module: nn.Module,
        on_batch_norm: Callable[[BatchNormCall], torch.Tensor | None],
        on_other: Callable[[Any, tuple[Any, ...], dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.on_batch_norm = on_batch_norm
        self.on_other = on_other

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _bind(args, kwargs)
            own = self.module._buffers.get("running_mean")
            if own is not None and call.running_mean is own:
                result = self.on_batch_norm(call)
                if result is not None:
                    return result
                return func(*args, **kwargs)
        if self.on_other is not None:
            self.on_other(func, args, kwargs)
        return func(*args, **kwargs)


#: ``wrap(module, forward, args, kwargs)``: a layer's forward, called instead of its own
_Wrap = Callable[[nn.Module, Any, tuple[Any, ...], dict[str, Any]], Any]


@contextlib.contextmanager
def _own_forward(layers: dict[nn.Module, _Wrap]) -> Iterator[None]:
    """Each module's forward becomes ``wrap(module, class_forward, *args)``; the instance
    attribute is removed (or the previous one put back) on exit."""
    missing = object()
    saved: dict[nn.Module, Any] = {}
    try:
        for module, wrap in layers.items():
            saved[module] = module.__dict__.get("forward", missing)
            inner = saved[module] if saved[module] is not missing else type(module).forward
            bound = inner if saved[module] is not missing else inner.__get__(module)

            def forward(*args: Any, _m: nn.Module = module, _w: Any = wrap, _f: Any = bound,
                        **kwargs: Any) -> Any:  # fmt: skip
                return _w(_m, _f, args, kwargs)

            module.forward = forward
        yield
    finally:
        for module, previous in saved.items():
            if previous is missing:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


@dataclass
class Observation:
    """What the forwards of one layer did with its running statistics (see :func:`observed`)."""

    calls: int = 0
    plain: int = 0  # calls that were one plain training batch_norm on the layer's input
    other_uses: int = 0  # other torch functions that read the running statistics
    problems: list[str] = field(default_factory=list)

    @property
    def is_plain(self) -> bool:
        return self.calls > 0 and self.plain == self.calls and self.other_uses == 0


@contextlib.contextmanager
def observed(modules: list[nn.Module]) -> Iterator[dict[nn.Module, Observation]]:
    """Within the block, every forward of the given BN layers is watched; yields one
    :class:`Observation` per layer."""
    seen = {m: Observation() for m in modules}

    def wrap(
        module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        obs = seen[module]
        obs.calls += 1
        x = args[0] if args else next(iter(kwargs.values()), None)
        calls: list[BatchNormCall] = []

        def on_bn(call: BatchNormCall) -> None:
            calls.append(call)
            return None

        def on_other(func: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if getattr(func, "__name__", "") == "__get__":
                return  # .shape, .dtype, .device: no value is read
            stats = (module._buffers.get("running_mean"), module._buffers.get("running_var"))
            for value in (*a, *kw.values()):
                if any(value is s for s in stats if s is not None):
                    obs.other_uses += 1
                    obs.problems.append(f"{getattr(func, '__name__', func)} reads the statistics")
                    return

        with _LayerMode(module, on_bn, on_other):
            out = forward(*args, **kwargs)
        if len(calls) == 1:
            c = calls[0]
            if (
                c.input is x
                and c.running_var is module._buffers.get("running_var")
                and bool(c.training)
                and c.momentum == module.momentum
            ):
                obs.plain += 1
            else:
                obs.problems.append("batch_norm is not called on the input in training mode")
        else:
            obs.problems.append(f"{len(calls)} batch_norm calls with the running statistics")
        return out

    with _own_forward({m: wrap for m in modules}):
        yield seen


@contextlib.contextmanager
def redirected(
    layers: dict[nn.Module, Callable[[BatchNormCall], torch.Tensor]],
) -> Iterator[dict[nn.Module, list[int]]]:
    """Within the block, the batch_norm call each given layer's own forward makes with its
    running statistics returns ``replace(call)`` instead; the rest of the forward (activation,
    dropout) runs on that. Yields, per layer, ``[forward calls, redirected calls]``: a layer
    whose forward never calls batch_norm with its statistics has fewer of the second."""
    counts = {m: [0, 0] for m in layers}

    def wrap(
        module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        replace = layers[module]
        counts[module][0] += 1

        def on_bn(call: BatchNormCall) -> torch.Tensor:
            counts[module][1] += 1
            return replace(call)

        with _LayerMode(module, on_bn):
            return forward(*args, **kwargs)

    with _own_forward({m: wrap for m in layers}):
        yield counts

"""How bnscope runs a model on a batch: on which device, under which autocast, in which memory
format, and through which ``call(model, batch)``.

Every pass over the data (collection, evaluation, the comparison passes of inspect and ghost)
moves each batch with :meth:`Runner.prepare` and runs it with :meth:`Runner.__call__`, so
``device``, ``amp`` and ``channels_last`` mean the same everywhere. :func:`placed` puts the
model where the run wants it and afterwards gives every parameter and buffer back its very
tensor (device, dtype and memory format as before; nothing is copied back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import move_to, split_batch
from .errors import UsageError

Call = Callable[[nn.Module, Any], Any]

#: names accepted for ``amp``
AMP_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def default_call(model: nn.Module, batch: Any) -> Any:
    """``model(inputs)`` where inputs are the batch's first item (or the tensor itself)."""
    inputs, _ = split_batch(batch)
    return model(inputs)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """``device`` as a :class:`torch.device` (the model's own device when None), checked to
    exist: a CUDA index beyond the visible devices is a :class:`UsageError`."""
    if device is None:
        return model_device(model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            f"device {device!r} is not a torch device", "e.g. device='cpu' or 'cuda:0'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r}: CUDA is not available here", "use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here",
                "pick an existing index",
            )
        if dev.index is None:  # "cuda" is the current device: compare equal to its tensors'
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (None, ``"bf16"``, ``"fp16"`` or the torch dtype),
    checked against what ``device`` can autocast to."""
    if amp is None:
        return None
    if isinstance(amp, torch.dtype):
        dtype = amp if amp in (torch.bfloat16, torch.float16) else None
    else:
        dtype = AMP_DTYPES.get(str(amp).strip().lower())
    if dtype is None:
        raise UsageError(f"amp must be 'bf16' or 'fp16', got {amp!r}", "use amp='bf16'")
    if not torch.amp.is_autocast_available(device.type):
        raise UsageError(f"autocast is not available on device {device}", "leave amp unset")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"this GPU ({torch.cuda.get_device_name(device)}) cannot autocast to bfloat16",
            "use amp='fp16'",
        )
    return dtype


@dataclass(frozen=True)
class Runner:
    """One way of running a model on batches: ``call`` on ``device``, under autocast to
    ``amp`` (None: no autocast), with 4-D/5-D floating inputs in channels-last layout when
    ``channels_last``."""

    call: Call
    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, batch: Any) -> Any:
        """The batch on the run's device (and memory format)."""
        return move_to(batch, self.device, channels_last=self.channels_last)

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        if self.amp is None:
            return self.call(model, batch)
        with torch.autocast(self.device.type, dtype=self.amp):
            return self.call(model, batch)


def make_runner(
    model: nn.Module,
    call: Call | None = None,
    device: torch.device | str | None = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
) -> Runner:
    """A :class:`Runner` from the public functions' ``call``, ``device``, ``amp`` and
    ``channels_last`` arguments (validated: :class:`UsageError` for a bad value)."""
    dev = resolve_device(device, model)
    return Runner(call or default_call, dev, resolve_amp(amp, dev), bool(channels_last))


def _memory_format(t: torch.Tensor, channels_last: bool) -> torch.memory_format | None:
    if not channels_last or not t.is_floating_point():
        return None
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


@contextlib.contextmanager
def placed(model: nn.Module, runner: Runner) -> Iterator[torch.device]:
    """The model on ``runner.device`` (4-D/5-D parameters and buffers channels-last when
    ``runner.channels_last``) for the block. On exit every parameter gets back its own data
    tensor and every buffer slot its own tensor object (also on error): the model is exactly
    as before, and values written into buffers after the block land in the originals."""
    target = runner.device
    moved: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        done = moved.get(id(t))
        if done is None:
            fmt = _memory_format(t, runner.channels_last)
            if fmt is None:
                done = t.to(target)
            else:
                done = t.to(target, memory_format=fmt)
            moved[id(t)] = done
        return done

    def needs_move(t: torch.Tensor) -> bool:
        fmt = _memory_format(t, runner.channels_last)
        return t.device != target or (fmt is not None and not t.is_contiguous(memory_format=fmt))

    tensors = [*model.parameters(), *model.buffers()]
    if not any(needs_move(t) for t in tensors):
        yield target
        return
    params: dict[nn.Parameter, torch.Tensor] = {}
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                for p in module._parameters.values():
                    if p is not None and p not in params:
                        params[p] = p.data
                        p.data = convert(p.data)
                for name, b in module._buffers.items():
                    if b is not None:
                        buffers.append((module, name, b))
                        module._buffers[name] = convert(b)
        yield target
    finally:
        for p, data in params.items():
            p.data = data
        for module, name, b in buffers:
            module._buffers[name] = b

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
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DataError, UsageError
from ..io.batches import LABEL_KEYS, move_to, split_batch

Call = Callable[[nn.Module, Any], Any]

#: spellings accepted for ``amp`` and the name they mean
AMP_NAMES: dict[str, str] = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_call(model: nn.Module, batch: Any, input_key: str | None = None) -> Any:
    """The model on a batch as bnscope runs it when no ``call`` is given: the batch's inputs by
    :class:`BatchProtocol` (in ``forward``'s order; a dict batch's ``input_key`` entry when
    set). The batch is not moved: :meth:`Runner.prepare` (or :func:`bnscope.io.batches.move_to`)
    does that first."""
    args, kwargs, _ = BatchProtocol.for_model(model, input_key).split(batch)
    return model(*args, **kwargs)


@dataclass(frozen=True)
class BatchProtocol:
    """How a batch becomes the model's inputs, its labels and its sample count.

    - a tensor is the one input;
    - a tuple/list holds the inputs first, as many as ``forward`` takes positionally without
      a default (at least one: ``(x, y)`` for ``forward(x)``, ``(a, b, y)`` for
      ``forward(a, b)``), then the labels when the next item is a tensor;
    - a dict gives ``input_key``'s entry when set; otherwise, when every parameter ``forward``
      requires is a key, ``model(**entries)`` with every key that ``forward`` names; otherwise
      the first of :data:`bnscope.io.batches.INPUT_KEYS`. Labels come from the first of
      :data:`bnscope.io.batches.LABEL_KEYS` that is not an input.

    The sample count of a batch is the leading size of its first input tensor.
    """

    positional: int = 1
    parameters: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    input_key: str | None = None

    @classmethod
    def for_model(cls, model: nn.Module, input_key: str | None = None) -> BatchProtocol:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):  # a builtin or C forward: one input
            return cls(1, (), (), input_key)
        positional_kinds = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        required = [
            p.name for p in params
            if p.kind in positional_kinds and p.default is inspect.Parameter.empty
        ]  # fmt: skip
        named = tuple(
            p.name for p in params if p.kind in (*positional_kinds, inspect.Parameter.KEYWORD_ONLY)
        )
        return cls(max(1, len(required)), named, tuple(required), input_key)

    def split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor | None]:
        """``(args, kwargs, labels)`` of a batch (labels None when absent)."""
        if isinstance(batch, torch.Tensor):
            return (batch,), {}, None
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise DataError(
                    "a batch is an empty sequence",
                    "make the data yield (inputs, labels) or inputs",
                )
            k = min(self.positional, len(batch))
            rest = batch[k] if len(batch) > k else None
            return tuple(batch[:k]), {}, rest if isinstance(rest, torch.Tensor) else None
        if isinstance(batch, Mapping):
            if self.input_key is None and self.required and all(
                name in batch for name in self.required
            ):
                kwargs = {k: v for k, v in batch.items() if k in self.parameters}
                label_key = next((k for k in LABEL_KEYS if k in batch and k not in kwargs), None)
                label = batch[label_key] if label_key is not None else None
                return (), kwargs, label if isinstance(label, torch.Tensor) else None
            inputs, label = split_batch(batch, self.input_key)
            return (inputs,), {}, label
        inputs, label = split_batch(batch, self.input_key)
        return (inputs,), {}, label

    def samples(self, batch: Any) -> int:
        """The leading size of the batch's first input tensor (0 when there is none)."""
        try:
            args, kwargs, _ = self.split(batch)
        except DataError:
            args, kwargs = (batch,), {}
        for t in _tensors((args, kwargs)):
            return int(t.shape[0]) if t.ndim else 1
        return 0


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def device_spec(spec: str | None) -> str:
    """A device name from ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``, checked to exist. Under ``torchrun``, ``auto`` and ``cuda`` mean this rank's
    GPU, ``cuda:LOCAL_RANK``; elsewhere ``cuda`` stays ``cuda`` (the current device)."""
    value = (spec or "auto").strip().lower()
    if value == "auto":
        return _cuda_for_this_rank(value) if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"device={value}: CUDA is not available here", "use device=cpu")
        if ":" in value and int(value[5:]) >= torch.cuda.device_count():
            raise UsageError(
                f"device={value}: only {torch.cuda.device_count()} CUDA devices",
                "pick an existing index",
            )
        return value if ":" in value else _cuda_for_this_rank(value)
    try:  # another accelerator torch knows (mps, xpu, ...): taken as given
        other = torch.device(value)
    except (RuntimeError, TypeError):
        other = None
    if other is None or other.type in ("cpu", "cuda", "meta"):
        raise UsageError(f"device={spec!r} is not auto, cpu, cuda or cuda:N", "e.g. device=cpu")
    return str(other)


def _cuda_for_this_rank(spec: str) -> str:
    """``cuda:LOCAL_RANK`` under a process group, else ``cuda`` (the current device)."""
    from . import distributed

    if not distributed.is_initialized():
        return "cuda"
    local, count = distributed.local_rank(), torch.cuda.device_count()
    if local >= count:
        raise UsageError(
            f"device={spec}: LOCAL_RANK {local} has no CUDA device (this node has {count})",
            f"start at most {count} processes per node (torchrun --nproc-per-node {count}), or "
            "use device=cpu",
        )
    return f"cuda:{local}"


def resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """``device`` as a :class:`torch.device` (the model's own device when None; names as in
    :func:`device_spec`), checked to exist."""
    if device is None:
        return model_device(model)
    if isinstance(device, torch.device):
        device = str(device)
    dev = torch.device(device_spec(device))
    if dev.type == "cuda" and dev.index is None:  # the current device: equal to its tensors'
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def amp_spec(amp: str | torch.dtype | None, device: str | torch.device) -> str | None:
    """``amp`` as ``"bf16"``/``"fp16"`` (None: no autocast; ``bfloat16``/``float16`` and the
    torch dtypes are accepted too), checked against what ``device`` can autocast to."""
    if amp is None:
        return None
    if isinstance(amp, torch.dtype):
        value = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp)
    else:
        value = AMP_NAMES.get(str(amp).strip().lower())
    if value is None:
        raise UsageError(f"amp={amp!r} is not bf16 or fp16", "use amp=bf16 or amp=fp16")
    dev = torch.device(device)
    if not torch.amp.is_autocast_available(dev.type):
        raise UsageError(
            f"amp={value}: autocast is not available on device {dev}", "leave amp unset"
        )
    if dev.type == "cuda" and value == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"amp=bf16: this GPU ({torch.cuda.get_device_name(dev)}) cannot autocast to bfloat16",
            "use amp=fp16",
        )
    return value


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (see :func:`amp_spec`)."""
    value = amp_spec(amp, device)
    return None if value is None else AMP_DTYPES[value]


@dataclass(frozen=True)
class Runner:
    """One way of running a model on batches: on ``device``, under autocast to ``amp`` (None:
    no autocast), with 4-D/5-D floating inputs in channels-last layout when
    ``channels_last``; through ``call(model, batch)`` when given, else by ``protocol``
    (:class:`BatchProtocol`), which also finds every batch's labels and sample count."""

    call: Call | None
    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False
    protocol: BatchProtocol = BatchProtocol()

    def prepare(self, batch: Any) -> Any:
        """The batch on the run's device (and memory format)."""
        return move_to(batch, self.device, channels_last=self.channels_last)

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        if self.amp is None:
            return self._run(model, batch)
        with torch.autocast(self.device.type, dtype=self.amp):
            return self._run(model, batch)

    def _run(self, model: nn.Module, batch: Any) -> Any:
        if self.call is not None:
            return self.call(model, batch)
        args, kwargs, _ = self.protocol.split(batch)
        return model(*args, **kwargs)

    def labels(self, batch: Any) -> torch.Tensor | None:
        """The batch's labels, or None (also when the batch's form has none)."""
        try:
            return self.protocol.split(batch)[2]
        except DataError:
            return None

    def samples(self, batch: Any) -> int:
        """Samples in the batch: the leading size of its first input tensor."""
        return self.protocol.samples(batch)


def make_runner(
    model: nn.Module,
    call: Call | None = None,
    device: torch.device | str | None = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
) -> Runner:
    """A :class:`Runner` from the public functions' ``call``, ``device``, ``amp``,
    ``channels_last`` and ``input_key`` arguments (validated: :class:`UsageError` for a bad
    value)."""
    dev = resolve_device(device, model)
    protocol = BatchProtocol.for_model(model, input_key)
    return Runner(call, dev, resolve_amp(amp, dev), bool(channels_last), protocol)


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

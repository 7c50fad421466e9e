"""Take batches apart into inputs and labels, and move them to a device.

:func:`split_batch` and :func:`move_to` are how the rest of bnscope takes batches apart and moves
them; how a model runs on a batch (``call``, :func:`bnscope.engine.runner.default_call`) is the
engine's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch

from bnscope.errors import DataError

__all__ = ["INPUT_KEYS", "LABEL_KEYS", "split_batch", "move_to"]

#: Keys that name the input in a dict batch (and in a ``.pt`` dict / ``.npz``), in priority order.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "data")
#: Keys that name the labels in a dict batch (and in a ``.pt`` dict / ``.npz``), in priority order.
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def split_batch(batch: Any, input_key: str | None = None) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into ``(inputs, labels)``; labels are ``None`` when absent.

    A tensor is all input. A tuple/list holds the input first and, when the second item is a
    tensor, the labels second. A dict gives its ``input_key`` entry, or else the first of
    :data:`INPUT_KEYS` present, with labels from the first of :data:`LABEL_KEYS` present.
    ``input_key`` only applies to dict batches. Raises :class:`DataError`.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(
                "a batch is an empty sequence", "make the data yield (inputs, labels) or inputs"
            )
        label = batch[1] if len(batch) >= 2 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], label
    if isinstance(batch, Mapping):
        if input_key is not None:
            if input_key not in batch:
                raise DataError(
                    f"batches have no key {input_key!r} (keys: {_key_list(batch.keys())})",
                    "pass input_key= with one of those keys",
                )
            key: Any = input_key
        else:
            key = _pick(batch, INPUT_KEYS)
            if key is None:
                raise DataError(
                    f"cannot tell which entry of the batch is the input "
                    f"(keys: {_key_list(batch.keys())})",
                    "pass input_key=KEY, or call= for several inputs",
                )
        label_key = _pick(batch, LABEL_KEYS)
        label = batch[label_key] if label_key is not None else None
        return batch[key], label if isinstance(label, torch.Tensor) else None
    raise DataError(
        f"unsupported batch type {type(batch).__name__}",
        "yield tensors, (inputs, labels) tuples or dicts, or pass a call(model, batch) function",
    )


def move_to(obj: Any, device: torch.device | str, *, channels_last: bool = False) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device`` (copies to
    a GPU are queued without waiting); with ``channels_last``, 4-D and 5-D floating tensors
    also take the channels-last memory format."""
    if isinstance(obj, torch.Tensor):
        fmt = None
        if channels_last and obj.is_floating_point():
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(obj.dim())
        target = torch.device(device)
        if obj.device == target and (fmt is None or obj.is_contiguous(memory_format=fmt)):
            return obj  # already there: not even a no-op dispatch
        non_blocking = obj.device.type == "cpu" and target.type == "cuda"
        if fmt is None:
            return obj.to(target, non_blocking=non_blocking)
        return obj.to(target, non_blocking=non_blocking, memory_format=fmt)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(v, device, channels_last=channels_last) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device, channels_last=channels_last) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: move_to(v, device, channels_last=channels_last) for k, v in obj.items()}
        try:
            return cast(Any, type(obj))(items)
        except Exception:
            return items
    return obj


def _pick(mapping: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in mapping), None)


def _key_list(keys: Iterable[Any], limit: int = 8) -> str:
    """``'a', 'b', ... (N in all)``: the first ``limit`` names, quoted."""
    names = [str(k) for k in keys]
    if not names:
        return "none"
    shown = ", ".join(repr(k) for k in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"

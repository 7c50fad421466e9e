"""Tensor files (``.pt``/``.pth``/``.npy``/``.npz``) and folders of such shards as datasets.

A file holds a tensor of inputs, an ``(x, y)`` pair, or a dict (a ``.pt`` dict, an ``.npz``)
with the inputs under ``x`` (or ``input``, ``inputs``, ``data``) and optionally the labels under
one of :data:`~bnscope.io.batches.LABEL_KEYS`; shards are concatenated in name order. A dict
file may hold more per-sample entries (``image_id``: one integer per sample); those named in
``keys`` are carried along, and the batches become dicts (``{"x": ..., "y": ...,
"image_id": ...}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bnscope.errors import DataError
from bnscope.io._messages import _exc_line
from bnscope.io.batches import LABEL_KEYS, _key_list, _pick

__all__ = ["TENSOR_SUFFIXES", "TensorPairDataset"]

TENSOR_SUFFIXES = {".pt", ".pth", ".npy", ".npz"}
# Tensor files accept a narrower set of input names than batches do.
_FILE_INPUT_KEYS = ("x", "input", "inputs", "data")

_TENSOR_FIX = "save the inputs as a tensor, an (x, y) pair, or a dict with 'x' (and optionally 'y')"


class TensorPairDataset(Dataset):
    """Samples ``x[i]`` (or ``(x[i], y[i])`` when labels are given) from in-memory tensors;
    with ``extras`` (name -> one value per sample), dict samples
    ``{"x": x[i], "y": y[i], name: extras[name][i]}``."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.x = x
        self.y = y
        self.extras = dict(extras or {})

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        if self.extras:
            item = {"x": self.x[index]}
            if self.y is not None:
                item["y"] = self.y[index]
            item.update((name, values[index]) for name, values in self.extras.items())
            return item
        if self.y is None:
            return self.x[index]
        return self.x[index], self.y[index]


def _as_tensor(value: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{what} in {path} is an object array", _TENSOR_FIX)
        try:
            value = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise DataError(
                f"{what} in {path} has unsupported dtype ({_exc_line(exc)})", _TENSOR_FIX
            ) from exc
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{what} in {path} is a {type(value).__name__}, not a tensor", _TENSOR_FIX)
    return value


def _from_mapping(content: Mapping[str, Any], path: Path) -> tuple[Any, Any]:
    x_key = _pick(content, _FILE_INPUT_KEYS)
    if x_key is None:
        if len(content) == 1:  # a single unnamed array (np.savez(f, arr) -> "arr_0")
            return next(iter(content.values())), None
        raise DataError(
            f"{path} has no input entry (looked for {', '.join(_FILE_INPUT_KEYS)}; "
            f"found {_key_list(content.keys())})",
            _TENSOR_FIX,
        )
    y_key = _pick(content, LABEL_KEYS)
    return content[x_key], (content[y_key] if y_key is not None else None)


def _extras(
    content: Any, path: Path, keys: Sequence[str], samples: int
) -> dict[str, torch.Tensor]:
    """The per-sample entries ``keys`` of a dict file (one integer per sample each)."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if not isinstance(content, Mapping) or key not in content:
            found = _key_list(content.keys()) if isinstance(content, Mapping) else "none"
            raise DataError(
                f"{path} has no per-sample entry {key!r} (entries: {found})",
                f"save one id per sample under that name, e.g. torch.save({{'x': x, 'y': y, "
                f"{key!r}: ids}}, path) or np.savez(path, x=x, y=y, {key}=ids)",
            )
        value = _as_tensor(content[key], path, f"the entry {key!r}")
        if value.dim() != 1 or value.shape[0] != samples or value.is_floating_point():
            raise DataError(
                f"the entry {key!r} in {path} has shape {tuple(value.shape)} ({value.dtype}) but "
                f"the inputs hold {samples} samples",
                "save one integer id per sample as a 1-D tensor of length N",
            )
        out[key] = value
    return out


def _read_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` from one tensor file, checked and with floating inputs as float32."""
    x, y, _ = _read_with_extras(path, ())
    return x, y


def _read_with_extras(
    path: Path, keys: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(x, y, extras)`` from one tensor file: :func:`_read_tensor_file` and the entries
    ``keys``."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            content = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                content = {name: npz[name] for name in npz.files}
    except Exception as exc:  # unpickling, zip and format errors come in many types
        raise DataError(f"cannot load tensor file {path} ({_exc_line(exc)})", _TENSOR_FIX) from exc

    if isinstance(content, Mapping):
        x, y = _from_mapping(content, path)
    elif isinstance(content, (tuple, list)):
        if len(content) not in (1, 2):
            raise DataError(
                f"{path} holds a {type(content).__name__} of {len(content)} items; expected "
                "(x,) or (x, y)",
                _TENSOR_FIX,
            )
        x, y = content[0], (content[1] if len(content) == 2 else None)
    else:
        x, y = content, None

    x = _as_tensor(x, path, "the input")
    y = _as_tensor(y, path, "the labels") if y is not None else None
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(
            f"{path} holds no samples (input shape {tuple(x.shape)})",
            "save inputs with the sample dimension first, e.g. shape (N, C, H, W)",
        )
    if y is None and x.dim() == 1 and not (x.is_floating_point() or x.is_complex()):
        raise DataError(
            f"{path} looks like labels only (a 1-D {x.dtype} tensor of {x.shape[0]} values)",
            "save the inputs too, e.g. torch.save({'x': inputs, 'y': labels}, path)",
        )
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise DataError(
            f"labels in {path} have shape {tuple(y.shape)} but the inputs hold "
            f"{x.shape[0]} samples",
            "save one label per sample as a 1-D tensor of length N",
        )
    extras = _extras(content, path, keys, int(x.shape[0]))
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return x, y, extras


def _tensor_dataset(
    files: Sequence[Path], keys: Sequence[str] = ()
) -> tuple[Dataset, int, bool]:
    """A dataset over one or more tensor files: ``(dataset, num_samples, has_labels)``; with
    ``keys``, every file's per-sample entries of those names come along (dict samples)."""
    parts: list[TensorPairDataset] = []
    first: tuple[Path, torch.Tensor, torch.Tensor | None] | None = None
    for path in files:
        x, y, extras = _read_with_extras(path, keys)
        if first is not None:
            p0, x0, y0 = first
            if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype:
                raise DataError(
                    f"shard {path.name} holds samples of shape {tuple(x.shape[1:])} "
                    f"({x.dtype}), but {p0.name} holds {tuple(x0.shape[1:])} ({x0.dtype})",
                    "make every shard hold samples of the same shape and dtype",
                )
            if (y is None) != (y0 is None):
                raise DataError(
                    f"shard {path.name} {'has no' if y is None else 'has'} labels, but "
                    f"{p0.name} {'has no' if y0 is None else 'has'} labels",
                    "save labels in every shard or in none",
                )
        else:
            first = (path, x, y)
        parts.append(TensorPairDataset(x, y, extras))
    assert first is not None
    total = sum(len(p) for p in parts)
    if len(parts) == 1:
        return parts[0], total, first[2] is not None
    return torch.utils.data.ConcatDataset(parts), total, first[2] is not None

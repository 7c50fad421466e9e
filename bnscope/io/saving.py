"""Save a checkpoint back in its own format and structure, some state-dict entries replaced.

:func:`save_checkpoint` writes a copy of the input with some state-dict entries replaced, in the
input's format and structure (wrapper keys, prefixes, optimizer state and other entries kept),
through a temporary file and an atomic rename; it never overwrites the input.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnscope.errors import CheckpointError
from bnscope.io._messages import _names, _reason
from bnscope.io.checkpoint import Checkpoint
from bnscope.io.outputs import atomic_path
from bnscope.io.statedict import _locate

__all__ = ["check_output", "default_output_path", "save_checkpoint"]


def default_output_path(path: Path, tag: str) -> Path:
    """``runs/ckpt.pt`` with tag ``precise`` gives ``runs/ckpt.precise.pt``.

    ``w.safetensors`` gives ``w.precise.safetensors``; a name without suffix gets
    ``.precise`` appended.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def save_checkpoint(
    ckpt: Checkpoint,
    updates: dict[str, torch.Tensor],
    out: str | Path,
    *,
    force: bool = False,
) -> Path:
    """Write ``ckpt`` to ``out`` with the state-dict entries in ``updates`` replaced.

    ``updates`` uses the original key names of :attr:`Checkpoint.state_dict` (with a prefix
    selection, the names without :attr:`Checkpoint.network_prefix`: they are written back
    under it); values (on any device) are cast to the original entry's dtype and must have
    its shape. Everything else (the other networks' entries included)
    (wrapper keys, prefixes, optimizer state, other entries, ``_metadata``, the file format,
    and each tensor's device: a tensor saved from ``cuda:0`` is written with that location
    again, a CPU tensor as a CPU tensor) is kept.
    ``ckpt`` itself is not modified. The file is written to a temporary file in the output
    directory, synced, and renamed onto ``out``; no temporary file survives a failure.

    Returns:
        The path written.

    Raises:
        CheckpointError: An unknown key or wrong shape in ``updates``; ``out`` is the input,
            exists without ``force``, or is not writable; the format cannot be written.
    """
    if ckpt.format == "torchscript":
        raise CheckpointError(
            "TorchScript archives are inspected statically only; bnscope cannot rewrite them",
            "save the model's state_dict() and pass model=",
        )
    new_values = _prepare_updates(ckpt.state_dict, updates)
    out_path = Path(out)
    check_output(ckpt.path, out_path, force=force)
    # with a prefix selection the updates go back to the original (prefixed) keys
    selected = ckpt.network_prefix
    full_values = {selected + k: v for k, v in new_values.items()} if selected else new_values

    if ckpt.format == "safetensors":
        import safetensors.torch

        tensors = dict(ckpt.raw)  # every entry (a selection's state dict holds some)
        tensors.update(full_values)
        payload = safetensors.torch.save(tensors, metadata=ckpt.metadata)

        def write(f: Any) -> None:
            f.write(payload)

    elif ckpt.format in ("torch", "module"):
        if ckpt.format == "module":
            obj = _updated_module(ckpt.raw, new_values)
        else:
            parts = ckpt._key_path
            if parts is None:
                parts = _locate(ckpt.raw, ckpt.key, str(ckpt.path)).parts if ckpt.key else ()
            obj = _rebuild(ckpt.raw, parts, full_values)

        tags = dict(ckpt.locations)
        for name, value in new_values.items():  # an update keeps its entry's location
            where = ckpt.locations.get(_storage_ptr(ckpt.state_dict[name]))
            if where is not None:
                tags[_storage_ptr(value)] = where

        def write(f: Any) -> None:
            with _saved_locations(tags):
                torch.save(obj, f)

    else:
        raise CheckpointError(
            f"unknown checkpoint format '{ckpt.format}'",
            "load the checkpoint with bnscope.io.checkpoint.load_checkpoint",
        )
    _atomic_write(out_path, write)
    return out_path


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _prepare_updates(
    state_dict: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Check keys and shapes, cast to the original dtypes on CPU (fresh, contiguous copies)."""
    unknown = [k for k in updates if k not in state_dict]
    if unknown:
        raise CheckpointError(
            "cannot update entries the checkpoint does not have: " + _names(unknown),
            "use the checkpoint's original key names",
        )
    result: dict[str, torch.Tensor] = {}
    for name, value in updates.items():
        original = state_dict[name]
        new = torch.as_tensor(value).detach()
        if tuple(new.shape) != tuple(original.shape):
            raise CheckpointError(
                f"update for {name} has shape {list(new.shape)}, "
                f"the checkpoint's has {list(original.shape)}",
                "pass a tensor of the checkpoint entry's shape",
            )
        result[name] = new.to(device="cpu", dtype=original.dtype, copy=True).contiguous()
    return result


def check_output(source: Path, out: Path, *, force: bool) -> None:
    """Refuse the input itself, a folder, an existing file without force, a missing folder."""
    same = out.resolve() == source.resolve()
    if not same and out.exists() and source.exists():
        try:
            same = os.path.samefile(out, source)
        except OSError:
            same = False
    if same:
        raise CheckpointError(
            f"refusing to overwrite the input checkpoint {source}", "choose another output= path"
        )
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory", "pass a file path to output=")
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists", "pass force=True to overwrite it")
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"output directory does not exist: {parent}", "create it or choose another output= path"
        )


def _atomic_write(out: Path, write: Any) -> None:
    """``write(handle)`` into a temporary file in ``out``'s folder, synced, then renamed onto
    ``out`` (:func:`bnscope.io.outputs.atomic_path`: nothing is left behind on a failure, a new
    file gets ``0666`` less the umask). Any failure is a :class:`CheckpointError` naming ``out``;
    an interrupt propagates as it is."""
    try:
        with atomic_path(out) as tmp, open(tmp, "wb") as handle:
            write(handle)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot write {out}: {_reason(exc)}", _fix_write()) from exc


def _fix_write() -> str:
    return "check that the output= directory is writable and has free space"


def _rebuild(container: Any, parts: tuple[str, ...], new_values: dict[str, torch.Tensor]) -> Any:
    """A shallow copy of ``container`` with only the path to the state dict copied and updated.

    Dicts keep their type, key order and attributes (``_metadata``); all untouched entries are
    the same objects as in the input.
    """
    if parts:
        head, rest = parts[0], parts[1:]
        copied = copy.copy(container)
        copied[head] = _rebuild(container[head], rest, new_values)
        return copied
    if isinstance(container, nn.Module):
        return _updated_module(container, new_values)
    copied = copy.copy(container)
    for name, value in new_values.items():
        copied[name] = value
    return copied


def _updated_module(module: nn.Module, new_values: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` with the given state-dict entries overwritten in place."""
    clone = copy.deepcopy(module)
    targets = clone.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in new_values.items():
            targets[name].copy_(value)
    return clone


# --------------------------------------------------------------------------------------------
# Storage locations


_SAVE_TAGS: dict[int, str] | None = None
_TAGGER_REGISTERED = False


def _location_tagger(storage: Any) -> str | None:
    """While :func:`_saved_locations` is active: the original location of a storage that was
    loaded from a non-CPU device (torch.save then writes that tag); otherwise None, so torch's
    own taggers decide."""
    if _SAVE_TAGS is None:
        return None
    try:
        ptr = storage.data_ptr()
    except Exception:  # noqa: BLE001 - an unusual storage: let torch tag it
        return None
    return _SAVE_TAGS.get(ptr) if ptr else None


def _no_restore(storage: Any, location: str) -> None:
    return None  # loading is left to torch's own deserializers


@contextlib.contextmanager
def _saved_locations(tags: dict[int, str]) -> Iterator[None]:
    """``torch.save`` inside the block writes the given storages with the given location
    tags (bytes are device-independent; only the tag differs)."""
    global _SAVE_TAGS, _TAGGER_REGISTERED
    if not tags:
        yield
        return
    if not _TAGGER_REGISTERED:
        torch.serialization.register_package(1, _location_tagger, _no_restore)
        _TAGGER_REGISTERED = True
    _SAVE_TAGS = tags
    try:
        yield
    finally:
        _SAVE_TAGS = None

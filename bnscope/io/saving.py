"""Save a checkpoint back in its own format and structure, some state-dict entries replaced.

:func:`save_checkpoint` writes a copy of the input with some state-dict entries replaced, in the
input's format and structure (wrapper keys, prefixes, optimizer state and other entries kept),
through a temporary file and an atomic rename; it never overwrites the input.
:func:`save_checkpoints` writes several such copies, all or none (``adapt`` with several
domains: one checkpoint per domain).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnscope.errors import CheckpointError
from bnscope.io._messages import _names, _reason
from bnscope.io.checkpoint import Checkpoint
from bnscope.io.outputs import atomic_path
from bnscope.io.statedict import _locate

__all__ = ["check_output", "default_output_path", "save_checkpoint", "save_checkpoints"]


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
    reshape: bool = False,
) -> Path:
    """Write ``ckpt`` to ``out`` with the state-dict entries in ``updates`` replaced.

    ``updates`` uses the original key names of :attr:`Checkpoint.state_dict` (with a prefix
    selection, the names without :attr:`Checkpoint.network_prefix`: they are written back
    under it); values (on any device) are cast to the original entry's dtype and must have
    its shape (``reshape=True`` lets them have another: the split checkpoint of
    ``adapt`` with several domains, whose statistics gain a domain dimension; refused for a
    pickled whole module, whose buffers keep their shapes).
    Everything else (the other networks' entries included)
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
    return save_checkpoints(ckpt, [(updates, out)], force=force, reshape=reshape)[0]


def save_checkpoints(
    ckpt: Checkpoint,
    outputs: Sequence[tuple[Mapping[str, torch.Tensor], str | Path]],
    *,
    force: bool = False,
    reshape: bool = False,
) -> list[Path]:
    """Write several copies of ``ckpt``, each with its own ``updates``, as
    :func:`save_checkpoint` writes one: ``outputs`` holds ``(updates, out)`` pairs. All or
    none: every update and path is checked before anything is written, every file is written
    to its temporary file before any is renamed into place, and a failure removes them all.
    Returns the paths written, in order."""
    paths = [Path(out) for _, out in outputs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise CheckpointError(
            "two outputs name the same file: " + _names([str(p) for p in paths]),
            "give each output= its own path",
        )
    writers = []
    for (updates, _), out_path in zip(outputs, paths, strict=True):
        writers.append(_writer(ckpt, dict(updates), reshape))
        check_output(ckpt.path, out_path, force=force)
    current = paths[0]
    try:
        with contextlib.ExitStack() as stack:
            for out_path, write in zip(paths, writers, strict=True):
                current = out_path
                tmp = stack.enter_context(atomic_path(out_path))
                with open(tmp, "wb") as handle:
                    write(handle)
            current = paths[-1]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot write {current}: {_reason(exc)}", _fix_write()) from exc
    return paths


def _writer(ckpt: Checkpoint, updates: dict[str, torch.Tensor], reshape: bool) -> Any:
    """``write(handle)``: ``ckpt`` with ``updates`` in its own format (checked here)."""
    if ckpt.format == "torchscript":
        raise CheckpointError(
            "TorchScript archives are inspected statically only; bnscope cannot rewrite them",
            "save the model's state_dict() and pass model=",
        )
    if reshape and ckpt.format == "module":
        raise CheckpointError(
            "a pickled whole module keeps the shapes of its buffers: bnscope cannot write "
            "statistics of another shape into it",
            "save the model's state_dict() and use that checkpoint",
        )
    new_values = _prepare_updates(ckpt.state_dict, updates, reshape=reshape)
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

        return write
    if ckpt.format in ("torch", "module"):
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

        def write_torch(f: Any) -> None:
            with _saved_locations(tags):
                torch.save(obj, f)

        return write_torch
    raise CheckpointError(
        f"unknown checkpoint format '{ckpt.format}'",
        "load the checkpoint with bnscope.io.checkpoint.load_checkpoint",
    )


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _prepare_updates(
    state_dict: Mapping[str, torch.Tensor],
    updates: Mapping[str, torch.Tensor],
    *,
    reshape: bool = False,
) -> dict[str, torch.Tensor]:
    """Check keys and shapes (any shape with ``reshape``), cast to the original dtypes on CPU
    (fresh, contiguous copies)."""
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
        if not reshape and tuple(new.shape) != tuple(original.shape):
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

"""Save a checkpoint back in its own format and structure, some state-dict entries replaced.

:func:`save_checkpoint` writes a copy of the input with some state-dict entries replaced, in the
input's format and structure (wrapper keys, prefixes, optimizer state and other entries kept),
through a temporary file and an atomic rename; it never overwrites the input. With ``freeze``
it also writes the named BatchNorm layers in the layout of a frozen BN layer
(:class:`bnscope.nn.FrozenBatchNorm`, torchvision's ``FrozenBatchNorm2d``): ``weight``,
``bias``, ``running_mean``, ``running_var`` and no ``num_batches_tracked``.
:func:`save_checkpoints` writes several such copies, all or none (``adapt`` with several
domains: one checkpoint per domain).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
    freeze: Collection[str] = (),
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

    ``freeze``: BatchNorm layers to write as frozen layers, each named by the prefix of its
    keys as ``updates`` names them (``"layer1.0.bn1."``, ``""`` for a state dict that is one
    layer). Each gets exactly the entries of :class:`bnscope.nn.FrozenBatchNorm` (torchvision's
    ``FrozenBatchNorm2d``): its ``num_batches_tracked`` entry is dropped, and a layer without
    ``weight``/``bias`` entries (``affine=False``) gets weight ones and bias zeros in the dtype
    of its ``running_mean``, placed before it and saved where it is saved; its module's
    version in the state dict's ``_metadata`` becomes 3, that of a frozen layer
    (:class:`bnscope.nn.FrozenBatchNorm`; detectron2 subtracts eps from ``running_var`` below
    3). A pickled whole module gets :func:`bnscope.nn.freeze_bn` applied to those layers
    instead.

    Returns:
        The path written.

    Raises:
        CheckpointError: An unknown key or wrong shape in ``updates``; ``out`` is the input,
            exists without ``force``, or is not writable; the format cannot be written; a
            ``freeze`` prefix without running statistics, or a layer of a whole module that
            :func:`bnscope.nn.freeze_bn` cannot convert.
    """
    return save_checkpoints(
        ckpt, [(updates, out)], force=force, reshape=reshape, freeze=freeze
    )[0]


def save_checkpoints(
    ckpt: Checkpoint,
    outputs: Sequence[tuple[Mapping[str, torch.Tensor], str | Path]],
    *,
    force: bool = False,
    reshape: bool = False,
    freeze: Collection[str] = (),
) -> list[Path]:
    """Write several copies of ``ckpt``, each with its own ``updates``, as
    :func:`save_checkpoint` writes one: ``outputs`` holds ``(updates, out)`` pairs. All or
    none: every update and path is checked before anything is written, every file is written
    to its temporary file before any is renamed into place, and a failure removes them all.
    Returns the paths written, in order. ``freeze`` applies to every output."""
    paths = [Path(out) for _, out in outputs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise CheckpointError(
            "two outputs name the same file: " + _names([str(p) for p in paths]),
            "give each output= its own path",
        )
    writers = []
    for (updates, _), out_path in zip(outputs, paths, strict=True):
        writers.append(_writer(ckpt, dict(updates), reshape, freeze))
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


def _writer(
    ckpt: Checkpoint, updates: dict[str, torch.Tensor], reshape: bool, freeze: Collection[str]
) -> Any:
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
    layout = _frozen_layout(ckpt.state_dict, freeze)
    for key in layout.drop:
        new_values.pop(key, None)
    # with a prefix selection the updates go back to the original (prefixed) keys
    selected = ckpt.network_prefix
    full_values = {selected + k: v for k, v in new_values.items()} if selected else new_values
    full_layout = layout.prefixed(selected)

    if ckpt.format == "safetensors":
        import safetensors.torch

        tensors = dict(ckpt.raw)  # every entry (a selection's state dict holds some)
        tensors.update(full_values)
        for key in full_layout.drop:
            del tensors[key]
        tensors.update(full_layout.added())
        payload = safetensors.torch.save(tensors, metadata=ckpt.metadata)

        def write(f: Any) -> None:
            f.write(payload)

        return write
    if ckpt.format in ("torch", "module"):
        if ckpt.format == "module":
            obj = _updated_module(ckpt.raw, new_values, layout)
        else:
            parts = ckpt._key_path
            if parts is None:
                parts = _locate(ckpt.raw, ckpt.key, str(ckpt.path)).parts if ckpt.key else ()
            obj = _rebuild(ckpt.raw, parts, full_values, full_layout)

        tags = dict(ckpt.locations)
        placed = {**new_values, **{k: v for k, (v, _) in layout.add.items()}}
        for name, value in placed.items():  # an entry keeps its (new: its layer's) location
            like = name if name in ckpt.state_dict else layout.add[name][1]
            where = ckpt.locations.get(_storage_ptr(ckpt.state_dict[like]))
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


@dataclass
class _FrozenLayout:
    """What writing layers as frozen BN changes: entries dropped (``num_batches_tracked``) and
    entries added (key -> (tensor, the key it goes before))."""

    drop: list[str] = field(default_factory=list)
    add: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # the prefixes, as given

    def prefixed(self, prefix: str) -> _FrozenLayout:
        if not prefix:
            return self
        return _FrozenLayout(
            [prefix + k for k in self.drop],
            {prefix + k: (t, prefix + before) for k, (t, before) in self.add.items()},
            [prefix + p for p in self.layers],
        )

    def added(self) -> dict[str, torch.Tensor]:
        return {k: t for k, (t, _) in self.add.items()}

    def before(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        out: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for key, (tensor, anchor) in self.add.items():
            out.setdefault(anchor, []).append((key, tensor))
        return out


def _frozen_layout(
    state_dict: Mapping[str, torch.Tensor], freeze: Collection[str]
) -> _FrozenLayout:
    """The entries to drop and add so that the layers keyed by the prefixes in ``freeze`` have
    exactly a frozen BN layer's entries."""
    layout = _FrozenLayout()
    for prefix in dict.fromkeys(freeze):
        mean_key, var_key = f"{prefix}running_mean", f"{prefix}running_var"
        if mean_key not in state_dict or var_key not in state_dict:
            raise CheckpointError(
                f"cannot write {prefix.rstrip('.') or 'the state dict'} as a frozen BN layer: "
                f"the checkpoint has no {mean_key} and {var_key}",
                "freeze only BatchNorm layers with running statistics",
            )
        layout.layers.append(prefix)
        mean = state_dict[mean_key]
        if f"{prefix}num_batches_tracked" in state_dict:
            layout.drop.append(f"{prefix}num_batches_tracked")
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            if f"{prefix}{name}" not in state_dict:
                value = torch.full(mean.shape, fill, dtype=mean.dtype, device="cpu")
                layout.add[f"{prefix}{name}"] = (value, mean_key)
    return layout


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


def _rebuild(
    container: Any,
    parts: tuple[str, ...],
    new_values: dict[str, torch.Tensor],
    layout: _FrozenLayout | None = None,
) -> Any:
    """A shallow copy of ``container`` with only the path to the state dict copied and updated.

    Dicts keep their type, key order and attributes (``_metadata``); all untouched entries are
    the same objects as in the input. Entries a frozen ``layout`` adds go before the entry it
    names; those it drops are left out.
    """
    if parts:
        head, rest = parts[0], parts[1:]
        copied = copy.copy(container)
        copied[head] = _rebuild(container[head], rest, new_values, layout)
        return copied
    if isinstance(container, nn.Module):
        return _updated_module(container, new_values, layout)
    copied = copy.copy(container)
    if layout is None or not layout.layers:
        for name, value in new_values.items():
            copied[name] = value
        return copied
    drop, before = set(layout.drop), layout.before()
    items = list(copied.items())
    copied.clear()
    for name, value in items:
        if name in drop:
            continue
        for new_name, tensor in before.get(name, ()):
            copied[new_name] = tensor
        copied[name] = new_values.get(name, value)
    metadata = getattr(container, "_metadata", None)
    if isinstance(metadata, dict):  # the frozen layers' module version, in a copy
        copied._metadata = _frozen_metadata(metadata, layout.layers)
    return copied


def _frozen_metadata(metadata: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """A copy of a state dict's ``_metadata`` in which each frozen layer's entry has the
    version of :class:`bnscope.nn.FrozenBatchNorm` (3, detectron2's: its ``running_var`` is
    used with eps added; detectron2 would subtract eps from BatchNorm's version 2)."""
    from bnscope.nn_frozen import FrozenBatchNorm

    out = copy.deepcopy(metadata)
    for prefix in layers:
        entry = out.get(prefix[:-1] if prefix.endswith(".") else prefix)
        if isinstance(entry, dict) and "version" in entry:
            entry["version"] = FrozenBatchNorm._version
    return out


def _updated_module(
    module: nn.Module, new_values: dict[str, torch.Tensor], layout: _FrozenLayout | None = None
) -> nn.Module:
    """A deep copy of ``module`` with the given state-dict entries overwritten in place, and
    the layers of a frozen ``layout`` replaced by frozen BN layers (:func:`bnscope.nn.freeze_bn`,
    without the memory of the replaced layers)."""
    from bnscope.nn_frozen import ORIGINAL, can_freeze, freeze_bn

    clone = copy.deepcopy(module)
    targets = clone.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in new_values.items():
            targets[name].copy_(value)
    if layout is None or not layout.layers:
        return clone
    names = []
    for prefix in layout.layers:
        name = prefix[:-1] if prefix.endswith(".") else prefix
        layer = clone.get_submodule(name)
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue  # a frozen layer already
        if not can_freeze(layer):
            raise CheckpointError(
                f"cannot write the whole module with frozen BN layers: {name or '(root)'} "
                f"({type(layer).__name__}) has a forward of its own or no running statistics",
                "save the model's state_dict() and run on that with model=: its entries are "
                "written in the frozen layout",
            )
        names.append(name)
    frozen = freeze_bn(clone, only=names)
    for layer in frozen.modules():
        layer.__dict__.pop(ORIGINAL, None)
    return frozen


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

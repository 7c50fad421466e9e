"""Load every checkpoint form into a :class:`Checkpoint`.

Supported inputs (docs/cli.md, section 7):

- ``torch.save`` files holding a state dict, or a dict wrapping one under one of
  :data:`~bnscope.io.statedict.WRAPPER_KEYS` (nested wrappers too, e.g.
  ``{"model": {"state_dict": ...}}``) or an EMA/SWA copy's under one of
  :data:`~bnscope.io.statedict.EMA_KEYS` (preferred when both are there);
- ``.safetensors`` files (also recognised by their header without the suffix);
- a pickled whole ``nn.Module`` (``torch.save(model)``), or a dict holding one: unpickling such
  a file runs arbitrary code, so it is loaded only with ``trust=True``; everything else is
  loaded with ``torch.load(..., weights_only=True)``;
- TorchScript archives, loaded with ``torch.jit.load`` for static inspection only.

Where the state dict lives inside the loaded object, and which networks it holds, is
:mod:`bnscope.io.statedict`'s; fitting it to a model is :mod:`bnscope.io.fitting`'s; writing it
back is :mod:`bnscope.io.saving`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnscope.errors import CheckpointError
from bnscope.extras import NetworkInfo
from bnscope.io._messages import _reason
from bnscope.io.statedict import (
    Network,
    _describe_networks,
    _has_prefix,
    _key_name,
    _list_prefixes,
    _locate,
    _members,
    _module_state,
    _normal_prefix,
    _parse_key,
    _select_prefix,
    raw_members,
)

__all__ = ["Checkpoint", "load_checkpoint"]

_FIX_TRUST = (
    "re-run with trust=True only if you trust its source, "
    "or save model.state_dict() instead"
)
_FIX_UNREADABLE = "check the path; the file may be damaged or not a checkpoint"
# Messages of torch's weights-only unpickler that mean "this needs a class or function that is
# not allow-listed" (as opposed to "these bytes are not a pickle at all").
_UNSAFE_PICKLE = re.compile(r"GLOBAL|safe_globals|allowlist|allowed global")
_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
# ... and "this is a pickle opcode it does not implement" (protocol 4 and 5's FRAME etc.).
_UNSUPPORTED_OP = re.compile(r"Unsupported operand \d+")


@dataclass
class Checkpoint:
    """A loaded checkpoint and where its state dict lives inside it.

    Attributes:
        path: The file it was loaded from.
        format: ``"torch"`` (``torch.save`` of a dict or state dict), ``"safetensors"``,
            ``"module"`` (a pickled whole ``nn.Module``) or ``"torchscript"``.
        raw: The object as loaded: the top-level dict, the ``nn.Module`` or the ScriptModule
            (for safetensors, the flat dict of tensors).
        key: The wrapper key path of the state dict, dotted for nested wrappers
            (``"model.state_dict"``), or ``None`` when the state dict is the top level; with
            a prefix selection ``PATH:PREFIX`` (``"state_dict:ema_model.module"``).
        state_dict: The located state dict with the original key names (with a prefix
            selection: the entries under :attr:`network_prefix`, that prefix removed).
        module: The module for formats ``"module"`` and ``"torchscript"``, and for a trusted
            ``"torch"`` dict that holds a whole module under :attr:`key`.
        metadata: The safetensors header metadata, if any.
        network_prefix: The prefix selected by ``key`` (``"ema_model.module."``), ``""``
            without one; :func:`save_checkpoint` writes updates back under it.
        networks: The networks found when there is more than one: several prefixes of the
            located state dict of which one names an EMA/SWA copy, and other state dicts next
            to it (timm's ``state_dict_ema``). Empty for a checkpoint with one network.
    """

    path: Path
    format: str
    raw: Any
    key: str | None
    state_dict: dict[str, torch.Tensor]
    module: nn.Module | None = None
    metadata: dict[str, str] | None = None
    _key_path: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    #: where ``torch.save`` put each storage that was not on the CPU ("cuda:0", ...), keyed by
    #: the address of the CPU storage it was loaded into: written back with the same tag
    locations: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    network_prefix: str = ""
    networks: tuple[Network, ...] = ()
    #: whether ``key`` was given (the networks were not chosen automatically)
    key_given: bool = False

    @property
    def trusted_module(self) -> bool:
        """True when the checkpoint holds a runnable, trusted (unpickled) ``nn.Module``.

        That is format ``"module"``, or a ``"torch"`` dict holding a whole module (which also
        needed ``trust=True`` to load). TorchScript modules are excluded.
        """
        return self.module is not None and self.format in ("module", "torch")

    def used_network(self, prefix: str = "") -> Network | None:
        """The network in use when ``prefix`` was stripped from :attr:`state_dict`'s keys to
        fit the model (what :func:`load_into_model` returned); ``None`` when it is none of
        :attr:`networks` (or there are none)."""
        full = self.network_prefix + prefix
        here = self._key_path or ()
        best: Network | None = None
        for net in self.networks:
            if net.path == here and full.startswith(net.prefix):
                if best is None or len(net.prefix) > len(best.prefix):
                    best = net
        return best

    def unused_ema(self, prefix: str = "") -> Network | None:
        """The first EMA/SWA copy among :attr:`networks` that is not the one in use."""
        used = self.used_network(prefix)
        return next((n for n in self.networks if n.ema and n is not used), None)

    def unused_raw(self, prefix: str = "") -> Network | None:
        """The raw network (not an EMA/SWA copy) among :attr:`networks` when an EMA/SWA copy
        is the one in use."""
        used = self.used_network(prefix)
        if used is None or not used.ema:
            return None
        return next((n for n in self.networks if not n.ema and n is not used), None)

    def ema_notice(self, prefix: str = "") -> str | None:
        """One line announcing the network that is not in use and the ``--key`` to use it:
        the raw weights when an EMA/SWA copy is used (the default: :data:`EMA_KEYS`), else an
        EMA copy left unused. The raw weights are announced only when the EMA copy was chosen
        automatically (no ``key``)."""
        raw = self.unused_raw(prefix)
        if raw is not None and raw.key is not None and not self.key_given:
            used = self.used_network(prefix)
            label = used.label if used is not None else "?"
            return (
                f"using the EMA/SWA copy '{label}'; this checkpoint also holds the raw weights "
                f"('{raw.label}', {_layers(raw.bn_layers)}): key={raw.key} to use them"
            )
        ema = self.unused_ema(prefix)
        if ema is None or ema.key is None:
            return None
        return (
            f"this checkpoint also holds an EMA copy ('{ema.label}', "
            f"{_layers(ema.bn_layers)}): key={ema.key} to use it"
        )

    def network_info(self, prefix: str = "") -> NetworkInfo:
        """Report keys: ``networks`` (each with ``key``, ``prefix``, ``bn_layers``, ``ema``,
        ``used``) and ``ema_key`` (the ``--key`` of an EMA copy not in use, or None); empty
        when the checkpoint holds one network."""
        if not self.networks:
            return {}
        used = self.used_network(prefix)
        ema = self.unused_ema(prefix)
        return {
            "networks": [n.to_dict(used=n is used) for n in self.networks],
            "ema_key": ema.key if ema is not None else None,
        }

    @property
    def class_names(self) -> list[str] | None:
        """The class names the checkpoint carries, in the order of the model's outputs, or
        ``None``: a list of names under ``classes`` or ``class_names``, a name -> index dict
        under ``class_to_idx`` (torchvision's ``ImageFolder.class_to_idx``), or an index ->
        name dict under ``idx_to_class`` or ``id2label``, in the top-level dict or a dict on
        the way to the state dict; for safetensors, a JSON list under the metadata key
        ``classes``. Entries that are not a complete, unique list of names are ignored."""
        if self.format == "safetensors":
            text = (self.metadata or {}).get("classes")
            if text is None:
                return None
            try:
                return _class_list(json.loads(text))
            except ValueError:
                return None
        if not isinstance(self.raw, dict):
            return None
        holders: list[Any] = [self.raw]
        node: Any = self.raw
        for part in self._key_path or ():
            node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                holders.append(node)
        for holder in holders:
            for key in CLASS_KEYS:
                names = _class_list(holder.get(key), mapping=key)
                if names is not None:
                    return names
        return None

    def default_network(self) -> Network | None:
        """Without a model to fit: the network to report on when :attr:`state_dict` holds
        several (the first EMA/SWA copy, as when fitting a model); ``None`` when it holds
        one."""
        if self.network_prefix:
            return None
        here = [n for n in self.networks if n.path == (self._key_path or ())]
        if len(here) < 2:
            return None
        return next((n for n in here if n.ema), here[0])

    def network_state(self, network: Network) -> dict[str, torch.Tensor]:
        """The entries of one network of :attr:`state_dict`, its prefix removed."""
        others = [
            n.prefix for n in self.networks if n.path == network.path and n.prefix != network.prefix
        ]
        return _members(self.state_dict, network.prefix, others)


def _layers(count: int) -> str:
    return f"{count} BN layer{'s' if count != 1 else ''}"


#: the entries a checkpoint may name its classes under (:attr:`Checkpoint.class_names`)
CLASS_KEYS = ("classes", "class_names", "class_to_idx", "idx_to_class", "id2label")


def _class_list(value: Any, mapping: str = "classes") -> list[str] | None:
    """``value`` as class names in output order, or ``None`` when it is not a complete,
    unique list of names: a list/tuple of strings, a name -> index dict (``class_to_idx``) or
    an index -> name dict (``idx_to_class``, ``id2label``; keys may be digit strings)."""
    names: list[Any]
    if isinstance(value, (list, tuple)):
        names = list(value)
    elif isinstance(value, dict) and mapping == "class_to_idx":
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value.values()):
            return None
        if sorted(value.values()) != list(range(len(value))):
            return None
        names = sorted(value, key=lambda name: value[name])
    elif isinstance(value, dict) and mapping in ("idx_to_class", "id2label"):
        try:
            index = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if sorted(index) != list(range(len(index))):
            return None
        names = [index[i] for i in range(len(index))]
    else:
        return None
    if not names or not all(isinstance(n, str) and n for n in names):
        return None
    if len(set(names)) != len(names):
        return None
    return [str(n) for n in names]


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | Path, *, key: str | None = None, trust: bool = False) -> Checkpoint:
    """Load a checkpoint file and locate its state dict.

    Args:
        path: A ``torch.save`` file, a ``.safetensors`` file or a TorchScript archive.
        key: Which entry holds the state dict (dotted for nested dicts, ``"a.b"``); found
            automatically when ``None`` (see :func:`locate_state_dict`). ``"PATH:PREFIX"``
            selects the entries under a key prefix of that state dict (``PATH`` may be empty).
        trust: Allow unpickling arbitrary Python objects (a whole ``nn.Module``). This runs
            code from the file, so it is off by default and files that need it are refused.

    Raises:
        CheckpointError: The file is missing, unreadable, needs ``trust``, or holds no state
            dict. Every failure of the underlying loaders surfaces as this error.
    """
    p = Path(path)
    size = _check_file(p)
    if p.suffix == ".safetensors" or _looks_like_safetensors(p, size):
        return _load_safetensors(p, key)
    if _is_torchscript_zip(p):
        return _load_torchscript(p, key)

    recorder = _LocationRecorder()
    obj = _torch_load(p, trust=trust, map_location=recorder)
    if isinstance(obj, nn.Module):
        if key is not None:
            raise CheckpointError(
                f"key={key} does not apply: {p} holds a whole nn.Module, not a dict",
                "leave out key=",
            )
        return Checkpoint(
            p, "module", obj, None, _module_state(obj, p), module=obj, locations=recorder.found
        )
    found = _locate(obj, key, str(p))
    parts, prefix = found.parts, found.prefix
    module = found.holder if isinstance(found.holder, nn.Module) else None
    return Checkpoint(
        p, "torch", obj, _key_name(parts, prefix), found.state_dict, module=module,
        _key_path=parts, locations=recorder.found, network_prefix=prefix,
        networks=_describe_networks(obj, parts, found.container), key_given=key is not None,
    )  # fmt: skip


class _LocationRecorder:
    """``map_location`` for ``torch.load``: every storage is loaded onto the CPU (bnscope
    never needs a GPU to read or write a checkpoint), and the device a storage was saved from
    is remembered when it was not the CPU, so that :func:`save_checkpoint` can write it back
    with the same location: a checkpoint saved from a GPU stays one, CPU tensors stay CPU."""

    def __init__(self) -> None:
        self.found: dict[int, str] = {}

    def __call__(self, storage: Any, location: str) -> Any:
        if location != "cpu" and storage.nbytes():
            self.found[storage.data_ptr()] = location
        return storage


def _check_file(p: Path) -> int:
    """Raise unless ``p`` is an existing, non-empty regular file; return its size."""
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}", "check the path")
    if p.is_dir():
        raise CheckpointError(
            f"{p} is a directory, not a checkpoint file", "pass the checkpoint file itself"
        )
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {_reason(exc)}", "check the path") from exc
    if size == 0:
        raise CheckpointError(_unreadable(p, "the file is empty"), _FIX_UNREADABLE)
    return size


def _looks_like_safetensors(p: Path, size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length and then ``{``."""
    if size < 10:
        return False
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _is_torchscript_zip(p: Path) -> bool:
    """A TorchScript archive is a zip with ``<name>/constants.pkl`` or a ``<name>/code/`` dir."""
    try:
        if not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError):
        return False
    for name in names:
        inner = name.split("/", 1)[1] if "/" in name else name
        if inner == "constants.pkl" or inner.startswith("code/"):
            return True
    return False


def _load_safetensors(p: Path, key: str | None) -> Checkpoint:
    path, prefix = _parse_key(key) if key is not None else ("", None)
    if key is not None and path and prefix is not None:
        raise CheckpointError(
            f"key={key} does not apply: safetensors files hold one flat state dict",
            f"leave out key=, or select a key prefix with key=:{prefix.rstrip('.')}",
        )
    try:
        import safetensors
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(p), device="cpu")
        with safetensors.safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata()
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {p} as a safetensors file: {_reason(exc)}", _FIX_UNREADABLE
        ) from exc
    state: dict[str, torch.Tensor] = tensors
    if key is not None:
        if prefix is None:  # a bare --key can only name a key prefix here
            prefix = _normal_prefix(path)
            if not _has_prefix(tensors, prefix):
                raise CheckpointError(
                    f"key={key} does not apply: safetensors files hold one flat state dict "
                    f"(key prefixes: {_list_prefixes(tensors)})",
                    "leave out key=, or pass key=:PREFIX with one of those prefixes",
                )
        state = _select_prefix(tensors, prefix, (), str(p)) if prefix else raw_members(tensors)
    return Checkpoint(
        p, "safetensors", tensors, _key_name((), prefix or ""), state,
        metadata=metadata or None, network_prefix=prefix or "",
        networks=_describe_networks(tensors, (), tensors), key_given=key is not None,
    )  # fmt: skip


def _load_torchscript(p: Path, key: str | None) -> Checkpoint:
    if key is not None:
        raise CheckpointError(
            f"key={key} does not apply: {p} is a TorchScript archive", "leave out key="
        )
    _check_zip_crc(p)
    try:
        module = torch.jit.load(str(p), map_location="cpu")
        state_dict = dict(module.state_dict())
    except Exception as exc:
        raise CheckpointError(_unreadable(p, _reason(exc)), _FIX_UNREADABLE) from exc
    return Checkpoint(p, "torchscript", module, None, state_dict, module=module)


@contextlib.contextmanager
def _quiet_torch_load() -> Iterator[None]:
    """torch.load's "Detected pickle protocol N" UserWarning would be a second stderr line
    next to bnscope's own message about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def _check_zip_crc(p: Path) -> None:
    """Verify every member's CRC-32 of a zip archive (torch.save's format, TorchScript).

    Neither torch.load nor torch.jit.load checks them: damaged bytes load silently as other
    weights (and would be copied into a written checkpoint), or, for damaged TorchScript code
    plus debug info, abort the process from C++. Costs one extra read of the file."""
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
    except NotImplementedError:
        return  # a zip feature Python's reader lacks (torch's reader ignores it): unchecked
    except Exception as exc:
        raise CheckpointError(_unreadable(p, _load_reason(p, exc)), _FIX_UNREADABLE) from exc
    if bad is not None:
        reason = f"damaged zip archive (CRC-32 mismatch in {bad})"
        raise CheckpointError(_unreadable(p, reason), _FIX_UNREADABLE)


def _torch_load(p: Path, *, trust: bool, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; unrestricted only when trusted and needed.
    A zip archive's CRC-32s are checked first. ``map_location`` must load onto the CPU."""
    try:
        is_zip = zipfile.is_zipfile(p)
    except Exception as exc:  # e.g. a damaged end record claiming several disks
        raise CheckpointError(_unreadable(p, _load_reason(p, exc)), _FIX_UNREADABLE) from exc
    if is_zip:
        _check_zip_crc(p)
    try:
        with _quiet_torch_load():
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        safe_loader = "Weights only load failed" in text
        if safe_loader and _UNSUPPORTED_OP.search(detail) and _parses_as_pickle(p):
            if not trust:
                raise CheckpointError(
                    f"{p} uses pickle opcodes (pickle protocol 4 or 5) that the safe loader "
                    "cannot check, so loading it may execute code",
                    "re-run with trust=True only if you trust its source, "
                    "or re-save it with torch.save's default pickle protocol",
                ) from exc
        elif not safe_loader or not _UNSAFE_PICKLE.search(detail):
            raise CheckpointError(_unreadable(p, _load_reason(p, exc)), _FIX_UNREADABLE) from exc
        elif not trust:
            found = _GLOBAL_NAME.search(detail)
            what = f" (found {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{p} contains pickled Python objects{what}, e.g. a whole nn.Module saved "
                "with torch.save(model), which execute code when loaded",
                _FIX_TRUST,
            ) from exc
    except Exception as exc:
        raise CheckpointError(_unreadable(p, _load_reason(p, exc)), _FIX_UNREADABLE) from exc
    try:
        with _quiet_torch_load():
            return torch.load(p, map_location=map_location, weights_only=False)
    except ImportError as exc:
        raise _missing_code(p, exc) from exc
    except Exception as exc:
        missing = _MISSING_ATTRIBUTE.search(str(exc))
        if isinstance(exc, AttributeError) and missing:
            name, module = missing.groups()
            raise CheckpointError(
                f"cannot unpickle {p}: the module '{module}' imported here has no '{name}', "
                "so it is not the code the checkpoint was saved with",
                f"make the {module} module that defines {name} importable first (run from "
                "its folder or add that folder to PYTHONPATH), or save model.state_dict() "
                "instead",
            ) from exc
        raise CheckpointError(
            f"cannot unpickle {p}: {_reason(exc)}",
            "make the code that defines the saved classes importable, "
            "or save model.state_dict() instead",
        ) from exc


#: pickle's message for a class missing from a module that did import
_MISSING_ATTRIBUTE = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def _missing_code(p: Path, exc: ImportError) -> CheckpointError:
    """A pickled whole module whose code (usually a local ``model.py``) cannot be imported:
    say which module and how to make it importable."""
    name = exc.name or ""
    if not name:
        return CheckpointError(
            f"cannot unpickle {p}: {_reason(exc)}",
            "make the code that defines the saved classes importable (run from its folder or "
            "add that folder to PYTHONPATH), or save model.state_dict() instead",
        )
    top = name.split(".")[0]
    where = f"{top}.py" if top == name else f"the package {top}/"
    return CheckpointError(
        f"cannot unpickle {p}: the model was saved with the Python module '{name}', which "
        "cannot be imported here",
        f"run from the folder that holds {where}, add that folder to PYTHONPATH, or pass "
        f"model=FOLDER/{top}.py:FACTORY (FOLDER then goes on the import path)"
        if top == name
        else f"run from the folder that holds {where} or add that folder to PYTHONPATH",
    )


def _parses_as_pickle(p: Path) -> bool:
    """Whether the pickle data torch's safe loader rejected is well-formed pickle opcodes.

    Only reads the opcodes (nothing is executed): ``data.pkl`` of a zip archive, else the
    legacy format's leading pickles (magic number, protocol, system info, object). Garbage
    and truncated pickles give False.
    """
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(names) != 1:
                    return False
                with zf.open(names[0]) as f:
                    for _ in pickletools.genops(f):
                        pass
            return True
        with p.open("rb") as f:
            for _ in range(4):
                for _ in pickletools.genops(f):
                    pass
                if not f.read(1):
                    break  # the end of the file: a plain pickle
                f.seek(-1, os.SEEK_CUR)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Message helpers


def _load_reason(p: Path, exc: BaseException) -> str:
    """Why ``torch.load`` failed, saying which container the bytes were read as."""
    try:
        with p.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
    except OSError:
        is_zip = False
    if is_zip:
        return f"damaged or truncated zip archive ({_reason(exc)})"
    return f"not a zip archive, and invalid or truncated pickle data ({_reason(exc)})"


def _unreadable(p: Path, reason: str) -> str:
    return f"cannot read {p} as a PyTorch, safetensors or TorchScript checkpoint: {reason}"

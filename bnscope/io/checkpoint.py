"""Load checkpoints, locate their state dict, and write them back atomically.

Supported inputs (docs/cli.md, section 7):

- ``torch.save`` files holding a state dict, or a dict wrapping one under one of
  :data:`WRAPPER_KEYS` (nested wrappers too, e.g. ``{"model": {"state_dict": ...}}``);
- ``.safetensors`` files (also recognised by their header without the suffix);
- a pickled whole ``nn.Module`` (``torch.save(model)``), or a dict holding one: unpickling such
  a file runs arbitrary code, so it is loaded only with ``trust=True``; everything else is
  loaded with ``torch.load(..., weights_only=True)``;
- TorchScript archives, loaded with ``torch.jit.load`` for static inspection only.

Key prefixes added by DataParallel/DDP (``module.``), Lightning (``model.``) and
``torch.compile`` (``_orig_mod.``) are kept in :attr:`Checkpoint.state_dict` and stripped only
when fitting a model whose own keys lack them (:func:`match_to_model`).

A checkpoint may hold more than one network: a Lightning module's state dict with ``model.*``
next to an EMA copy ``ema_model.module.*`` (and entries such as ``criterion.weight``), or timm's
top-level ``state_dict`` and ``state_dict_ema``. ``key`` selects one: a dotted path through
nested dicts, then optionally ``:PREFIX``, the entries of that state dict whose keys start with
``PREFIX.`` (``"state_dict:ema_model.module"``; the natural ``"state_dict.ema_model.module"``
works too). :attr:`Checkpoint.networks` describes the networks found, EMA/SWA copies by name;
:func:`load_into_model` picks the one that fits the model, preferring the raw weights over an
EMA copy of the same architecture.

:func:`save_checkpoint` writes a copy of the input with some state-dict entries replaced, in the
input's format and structure (wrapper keys, prefixes, optimizer state and other entries kept),
through a temporary file and an atomic rename; it never overwrites the input.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from torch import nn

from bnscope.errors import CheckpointError, ModelError
from bnscope.extras import NetworkDict, NetworkInfo

__all__ = [
    "KNOWN_PREFIXES",
    "WRAPPER_KEYS",
    "Checkpoint",
    "Network",
    "common_prefix",
    "default_output_path",
    "find_networks",
    "load_checkpoint",
    "load_into_model",
    "locate_state_dict",
    "match_to_model",
    "save_checkpoint",
    "strip_prefix",
]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
"""Keys under which training scripts commonly nest the state dict, tried in this order."""

KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by DataParallel/DDP, ``torch.compile`` and Lightning."""

_FIX_TRUST = (
    "re-run with trust=True only if you trust its source, "
    "or save model.state_dict() instead"
)
_FIX_UNREADABLE = "check the path; the file may be damaged or not a checkpoint"
_FIX_KEY = "pass key=NAME to say which entry holds the weights"
_FIX_MODEL = "check model= / model_kwargs= match the architecture the checkpoint was saved from"
_MAX_LISTED = 5
_MAX_KEYS_LISTED = 10
# Messages of torch's weights-only unpickler that mean "this needs a class or function that is
# not allow-listed" (as opposed to "these bytes are not a pickle at all").
_UNSAFE_PICKLE = re.compile(r"GLOBAL|safe_globals|allowlist|allowed global")
_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
# ... and "this is a pickle opcode it does not implement" (protocol 4 and 5's FRAME etc.).
_UNSUPPORTED_OP = re.compile(r"Unsupported operand \d+")
# A key or prefix component that clearly names an EMA or SWA copy of the weights: ema,
# model_ema, ema_model, state_dict_ema, swa_model, averaged_model, ...
_EMA_NAME = re.compile(r"(?:^|_)(?:ema|swa)(?:_|$)|^averaged_?model$", re.IGNORECASE)


@dataclass(frozen=True)
class Network:
    """One of several networks a checkpoint holds (see :attr:`Checkpoint.networks`).

    Attributes:
        key: The ``key`` (``--key``) value that selects it: ``"state_dict:ema_model.module"``
            for the entries under a prefix, ``"state_dict_ema"`` for a separate state dict.
            For the raw network that is found automatically, the key of its state dict
            (``None`` at the top level).
        prefix: Its key prefix within its state dict (``"ema_model.module."``); ``""`` for a
            whole state dict, or for the entries that belong to no EMA copy.
        bn_layers: How many BN layers (``*.running_mean`` with ``*.running_var``) it holds.
        ema: Whether its name says it is an EMA or SWA copy.
        path: The wrapper key path of the state dict it lives in.
    """

    key: str | None
    prefix: str
    bn_layers: int
    ema: bool = False
    path: tuple[str, ...] = field(default=(), repr=False)

    @property
    def label(self) -> str:
        """How reports name it: the prefix, or the key of a whole state dict."""
        return self.prefix or self.key or "(top level)"

    def to_dict(self, used: bool = False) -> NetworkDict:
        return {
            "key": self.key,
            "prefix": self.prefix,
            "bn_layers": self.bn_layers,
            "ema": self.ema,
            "used": used,
        }


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

    def ema_notice(self, prefix: str = "") -> str | None:
        """One line announcing an EMA copy that is not in use and the ``--key`` to use it."""
        ema = self.unused_ema(prefix)
        if ema is None or ema.key is None:
            return None
        layers = f"{ema.bn_layers} BN layer{'s' if ema.bn_layers != 1 else ''}"
        return (
            f"this checkpoint also holds an EMA copy ('{ema.label}', {layers}): "
            f"key={ema.key} to use it"
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

    def default_network(self) -> Network | None:
        """Without a model to fit: the network to report on when :attr:`state_dict` holds
        several (the first that is not an EMA copy); ``None`` when it holds one."""
        if self.network_prefix:
            return None
        here = [n for n in self.networks if n.path == (self._key_path or ())]
        if len(here) < 2:
            return None
        return next((n for n in here if not n.ema), here[0])

    def network_state(self, network: Network) -> dict[str, torch.Tensor]:
        """The entries of one network of :attr:`state_dict`, its prefix removed."""
        others = [
            n.prefix for n in self.networks if n.path == network.path and n.prefix != network.prefix
        ]
        return _members(self.state_dict, network.prefix, others)


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
        networks=_describe_networks(obj, parts, found.container),
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


def locate_state_dict(
    obj: Any, key: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the state dict inside a loaded checkpoint object.

    With ``key`` the entry at that (dotted) path is used; ``"PATH:PREFIX"`` takes the entries
    of that state dict under ``PREFIX.`` (prefix removed), and a dotted path that goes on
    past a state dict's level continues as such a prefix (``"state_dict.ema_model.module"``
    is ``"state_dict:ema_model.module"``). Otherwise, in this order:

    1. an ``nn.Module`` gives its ``state_dict()``;
    2. a dict whose values are all tensors is the state dict (key ``None``);
    3. the first of :data:`WRAPPER_KEYS` whose value yields a state dict by these rules
       (recursively, giving keys such as ``"model.state_dict"``);
    4. a dict with some tensor values and no usable wrapper key is taken as a state dict of
       its tensor entries (e.g. ``{"conv.weight": t, "epoch": 3}``), key ``None``.

    Returns:
        The state dict (the object itself where possible, so original key names and
        ``_metadata`` are kept) and the key path used (``"PATH:PREFIX"`` for a prefix).

    Raises:
        CheckpointError: ``key`` does not exist, or no state dict is found.
    """
    found = _locate(obj, key, "the checkpoint")
    return found.state_dict, _key_name(found.parts, found.prefix)


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
        state = _select_prefix(tensors, prefix, (), str(p))
    return Checkpoint(
        p, "safetensors", tensors, _key_name((), prefix or ""), state,
        metadata=metadata or None, network_prefix=prefix or "",
        networks=_describe_networks(tensors, (), tensors),
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


def _module_state(module: nn.Module, where: Any) -> dict[str, torch.Tensor]:
    """``module.state_dict()``; an unpickled module that is broken (a damaged or mismatched
    pickle of a whole model) is a one-line error."""
    try:
        return module.state_dict()
    except Exception as exc:
        raise CheckpointError(
            f"the nn.Module unpickled from {where} is broken: {_reason(exc)}",
            "re-save it from working code (preferably model.state_dict())",
        ) from exc


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
    except Exception as exc:
        raise CheckpointError(
            f"cannot unpickle {p}: {_reason(exc)}",
            "make the code that defines the saved classes importable, "
            "or save model.state_dict() instead",
        ) from exc


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


class _Located(NamedTuple):
    state_dict: dict[str, torch.Tensor]  # what was selected (entries under prefix, stripped)
    parts: tuple[str, ...]  # wrapper key path
    holder: Any  # the object at that path
    prefix: str  # the key prefix selected within the state dict, "" for none
    container: dict[str, torch.Tensor]  # the whole state dict at that path


def _locate(obj: Any, key: str | None, where: str) -> _Located:
    """Find the state dict (and the key prefix selected in it) or raise CheckpointError."""
    if key is not None:
        path, prefix = _parse_key(key)
        parts, value, rest = _walk_partial(obj, path)
        if rest and prefix is None and isinstance(value, Mapping):
            # "state_dict.model": the path goes on past a state dict: a key prefix within it
            found = _find(value, parts)
            if found is not None and _has_prefix(found[0], _normal_prefix(rest)):
                sd, parts, holder = found
                prefix = _normal_prefix(rest)
                return _Located(_select_prefix(sd, prefix, parts, where), parts, holder, prefix, sd)
        if rest:
            _walk_error(parts, value, rest, where)
        found = _find(value, parts)
        if found is None:
            what = f"entry '{path}' in {where}" if path else where
            raise CheckpointError(f"{what} holds {_describe(value)}, not a state dict", _FIX_KEY)
        sd, parts, holder = found
        if prefix:
            return _Located(_select_prefix(sd, prefix, parts, where), parts, holder, prefix, sd)
        return _Located(sd, parts, holder, "", sd)
    found = _find(obj, ())
    if found is not None:
        return _Located(found[0], found[1], found[2], "", found[0])
    if isinstance(obj, Mapping):
        if not obj:
            raise CheckpointError(f"no state dict found in {where}: it is an empty dict", _FIX_KEY)
        raise CheckpointError(
            f"no state dict found in {where}: top-level keys are {_list_keys(obj)}", _FIX_KEY
        )
    raise CheckpointError(
        f"no state dict found in {where}: it holds {_describe(obj)}",
        "save model.state_dict() (or a dict containing it) instead",
    )


def _find(
    obj: Any, parts: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], Any] | None:
    """The automatic search of :func:`locate_state_dict`; ``None`` when nothing is found."""
    if isinstance(obj, nn.Module):
        return _module_state(obj, parts), parts, obj
    if not isinstance(obj, Mapping) or not obj:
        return None
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, parts, obj  # type: ignore[return-value]
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj:
            found = _find(obj[wrapper], (*parts, wrapper))
            if found is not None:
                return found
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not tensors:
        return None
    subset: dict[str, torch.Tensor] = OrderedDict((k, obj[k]) for k in tensors)
    if hasattr(obj, "_metadata"):
        subset._metadata = obj._metadata  # type: ignore[attr-defined]
    return subset, parts, obj


def _walk(obj: Any, key: str, where: str) -> tuple[tuple[str, ...], Any]:
    """Follow a dotted key path; a literal key containing dots wins over splitting it."""
    parts, value, rest = _walk_partial(obj, key)
    if rest:
        _walk_error(parts, value, rest, where)
    return parts, value


def _walk_partial(obj: Any, key: str) -> tuple[tuple[str, ...], Any, str]:
    """Follow a dotted key path as far as it goes: (parts, value reached, rest not found)."""
    parts: list[str] = []
    value = obj
    rest = key
    while rest:
        if not isinstance(value, Mapping):
            break
        pieces = rest.split(".")
        for i in range(len(pieces), 0, -1):
            head = ".".join(pieces[:i])
            if head in value:
                parts.append(head)
                value = value[head]
                rest = ".".join(pieces[i:])
                break
        else:
            break
    return tuple(parts), value, rest


def _walk_error(parts: tuple[str, ...], value: Any, rest: str, where: str) -> NoReturn:
    at = f"entry '{_join(parts)}'" if parts else where
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"cannot look up '{rest}': {at} holds {_describe(value)}, not a dict", _FIX_KEY
        )
    piece = rest.split(".")[0]
    if value and all(isinstance(v, torch.Tensor) for v in value.values()):
        raise CheckpointError(
            f"no entry '{piece}' in {at}, and no key starts with '{_normal_prefix(rest)}': "
            f"it is a state dict with key prefixes {_list_prefixes(value)}",
            "pass key= with one of those prefixes (PATH:PREFIX, e.g. key=state_dict:model)",
        )
    level = "its keys" if parts else "top-level keys"
    raise CheckpointError(
        f"no entry '{piece}' in {at}: {level} are {_list_keys(value)}",
        "pass key= with one of those keys",
    )


def _parse_key(key: str) -> tuple[str, str | None]:
    """``"state_dict:ema_model.module"`` -> ``("state_dict", "ema_model.module.")``; a key
    without ``:`` -> ``(key, None)``; an empty prefix (``"state_dict:"``) -> ``""``."""
    if ":" not in key:
        return key, None
    path, _, prefix = key.rpartition(":")
    return path, _normal_prefix(prefix)


def _normal_prefix(prefix: str) -> str:
    """``"ema_model.module"`` -> ``"ema_model.module."`` (``""`` stays ``""``)."""
    prefix = prefix.strip().rstrip(".")
    return f"{prefix}." if prefix else ""


def _key_name(parts: tuple[str, ...], prefix: str) -> str | None:
    """The key that selects a state dict and a prefix in it: ``"state_dict:model"``."""
    path = _join(parts)
    if not prefix:
        return path
    return f"{path or ''}:{prefix.rstrip('.')}"


def _has_prefix(state_dict: Mapping[str, Any], prefix: str) -> bool:
    n = len(prefix)
    return bool(prefix) and any(
        isinstance(k, str) and k.startswith(prefix) and len(k) > n for k in state_dict
    )


def _select_prefix(
    state_dict: Mapping[str, Any], prefix: str, parts: tuple[str, ...], where: str
) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, prefix removed (``_metadata`` renamed to match)."""
    if not prefix:
        return dict(state_dict)
    if not _has_prefix(state_dict, prefix):
        at = f"the state dict under '{_join(parts)}' in {where}" if parts else f"{where}"
        raise CheckpointError(
            f"no key of {at} starts with '{prefix}': its key prefixes are "
            f"{_list_prefixes(state_dict)}",
            f"pass key={_join(parts) or ''}:PREFIX with one of those prefixes",
        )
    return _members(state_dict, prefix, ())


def _members(
    state_dict: Mapping[str, Any], prefix: str, others: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with it removed; for ``prefix == ""`` every entry not
    under one of ``others``. ``_metadata`` follows the keys."""
    n = len(prefix)
    if prefix:
        out: dict[str, torch.Tensor] = OrderedDict(
            (k[n:], v) for k, v in state_dict.items() if k.startswith(prefix) and len(k) > n
        )
    else:
        skip = tuple(o for o in others if o)
        out = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(skip))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        root = prefix[:-1]
        new_meta: OrderedDict[str, Any] = OrderedDict()
        for name, value in metadata.items():
            if prefix and name == root:
                new_meta[""] = value
            elif prefix and name.startswith(prefix):
                new_meta[name[n:]] = value
            elif not prefix and not (name + ".").startswith(tuple(o for o in others if o)):
                new_meta[name] = value
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def _key_groups(keys: Iterable[str]) -> list[str]:
    """The key prefixes of a state dict: each first component, extended by the known
    wrapper prefixes its entries all share (``"ema_model.module."``), in key order."""
    rests: dict[str, list[str]] = {}
    for k in keys:
        if isinstance(k, str) and "." in k:
            head, rest = k.split(".", 1)
            rests.setdefault(head, []).append(rest)
    groups = []
    for head, items in rests.items():
        # entries directly under the group (AveragedModel's n_averaged) do not stop the chain
        dotted = [r for r in items if "." in r]
        groups.append(f"{head}.{common_prefix(dotted)}")
    return groups


def _list_prefixes(state_dict: Mapping[str, Any]) -> str:
    groups = _key_groups(state_dict)
    if not groups:
        return "(none)"
    shown = ", ".join(groups[:_MAX_KEYS_LISTED])
    if len(groups) > _MAX_KEYS_LISTED:
        shown += f", ... ({len(groups) - _MAX_KEYS_LISTED} more)"
    return shown


def _bn_bases(keys: Iterable[str]) -> list[str]:
    """``"a.b."`` for every BN layer ``a.b`` (``*.running_mean`` with ``*.running_var``)."""
    keys = [k for k in keys if isinstance(k, str)]
    present = set(keys)
    bases = []
    for k in keys:
        if k == "running_mean" or k.endswith(".running_mean"):
            base = k[: -len("running_mean")]
            if base + "running_var" in present:
                bases.append(base)
    return bases


def _is_ema(name: str | None) -> bool:
    """Whether a key path or prefix names an EMA/SWA copy (by any of its components)."""
    if not name:
        return False
    return any(_EMA_NAME.search(part) for part in re.split(r"[.:]", name) if part)


def find_networks(state_dict: Mapping[str, Any], key: str | None = None) -> tuple[Network, ...]:
    """The networks one state dict holds under different key prefixes.

    Keys are grouped by prefix (the first component, extended by the wrapper prefixes all its
    entries share: ``ema_model.module.``); the groups with BN layers are networks when one of
    them names an EMA/SWA copy (``ema_model``, ``model_ema``, ``swa_model``, ...) and there
    is at least one other. The non-EMA groups form one network: under their prefix when there
    is one such group (``model.``), otherwise every entry not under an EMA prefix (prefix
    ``""``). Entries that belong to no network (``criterion.weight``) are left out.

    Args:
        state_dict: A flat state dict.
        key: The ``key`` that selected it in its checkpoint, to phrase :attr:`Network.key`.

    Returns:
        The networks, the raw one first, or ``()`` when the state dict holds one network.
    """
    return _networks_in(state_dict, key, ())


def _networks_in(
    state_dict: Mapping[str, Any], key: str | None, parts: tuple[str, ...]
) -> tuple[Network, ...]:
    bases = _bn_bases(state_dict)
    if not bases:
        return ()
    counted = [(g, sum(1 for b in bases if b.startswith(g))) for g in _key_groups(state_dict)]
    counted = [(g, n) for g, n in counted if n]
    emas = [(g, n) for g, n in counted if _is_ema(g)]
    raw = [(g, n) for g, n in counted if not _is_ema(g)]
    if not emas or len(counted) < 2:
        return ()
    nets: list[Network] = []
    if len(raw) == 1:
        group, n = raw[0]
        nets.append(Network(_sub_key(key, group), group, n, False, parts))
    elif raw:
        ema_prefixes = tuple(g for g, _ in emas)
        n = sum(1 for b in bases if not b.startswith(ema_prefixes))
        nets.append(Network(key, "", n, False, parts))
    for group, n in emas:
        nets.append(Network(_sub_key(key, group), group, n, True, parts))
    return tuple(nets)


def _sub_key(key: str | None, prefix: str) -> str:
    """The key selecting ``prefix`` within the state dict that ``key`` selected."""
    path, selected = _parse_key(key) if key else ("", None)
    full = (selected or "") + prefix
    return f"{path}:{full.rstrip('.')}"


def _describe_networks(
    obj: Any, parts: tuple[str, ...], container: Mapping[str, Any]
) -> tuple[Network, ...]:
    """:attr:`Checkpoint.networks`: the prefix networks of the located state dict, and the
    other state dicts with BN layers next to it or next to one of its wrappers."""
    key = _join(parts)
    nets = list(_networks_in(container, key, parts))
    siblings: list[Network] = []
    for depth in range(len(parts)):
        parent = obj
        for name in parts[:depth]:
            parent = parent[name]
        if not isinstance(parent, Mapping):
            continue
        for name, value in parent.items():
            if name == parts[depth] or not isinstance(name, str):
                continue
            if not isinstance(value, (Mapping, nn.Module)):
                continue
            try:
                found = _find(value, (*parts[:depth], name))
            except CheckpointError:
                continue
            if found is None:
                continue
            n = len(_bn_bases(found[0]))
            if n:
                where = _join(found[1])
                siblings.append(Network(where, "", n, _is_ema(where), found[1]))
    if not siblings:
        return tuple(nets)
    if not nets:
        n = len(_bn_bases(container))
        nets = [Network(key, "", n, _is_ema(key), parts)] if n else []
    return (*nets, *siblings)


# --------------------------------------------------------------------------------------------
# Prefixes and fitting a model


def common_prefix(keys: Iterable[str]) -> str:
    """The longest chain of :data:`KNOWN_PREFIXES` that every key starts with.

    ``["module._orig_mod.a", "module._orig_mod.b"]`` gives ``"module._orig_mod."``; ``""``
    when the keys share none (or there are no keys).
    """
    return "".join(_prefix_chain(keys))


def _prefix_chain(keys: Iterable[str]) -> list[str]:
    rest = list(keys)
    chain: list[str] = []
    if not rest:
        return chain
    while True:
        for prefix in KNOWN_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in rest):
                chain.append(prefix)
                rest = [k[len(prefix) :] for k in rest]
                break
        else:
            return chain


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A new dict with ``prefix`` removed from the keys that start with it (others unchanged).

    Order is kept. A ``_metadata`` attribute (module versions used by ``load_state_dict``) is
    carried over with its module paths renamed the same way.
    """
    metadata = getattr(state_dict, "_metadata", None)
    if not prefix:
        out: dict[str, torch.Tensor] = OrderedDict(state_dict) if metadata else dict(state_dict)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    n = len(prefix)
    items = ((k[n:] if k.startswith(prefix) else k, v) for k, v in state_dict.items())
    if metadata is None:
        return dict(items)
    out = OrderedDict(items)
    root = prefix[:-1] if prefix.endswith(".") else prefix
    new_meta: OrderedDict[str, Any] = OrderedDict()
    for name, value in metadata.items():
        if name == root:
            new_meta[""] = value
        elif name.startswith(prefix):
            new_meta[name[n:]] = value
        elif name == "" or prefix.startswith(name + "."):
            continue  # a wrapper around the stripped module: no longer in the key space
        else:
            new_meta[name] = value
    out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def match_to_model(
    state_dict: dict[str, torch.Tensor], model_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Rename checkpoint keys to fit a model by stripping known prefixes it does not use.

    The checkpoint's shared prefix chain (:func:`common_prefix`, e.g. ``"module._orig_mod."``)
    is stripped one link at a time from the front. The first stripping that makes the key
    sets equal wins; otherwise links are stripped until what remains of the chain is a prefix
    of the model's own chain, so a prefix the model's keys also have (say a model whose
    attribute is literally named ``model``) is kept.

    Returns:
        The renamed state dict (``state_dict`` itself when nothing is stripped) and the prefix
        stripped (``""`` if none).
    """
    model_list = list(model_keys)
    model_set = set(model_list)
    chain = _prefix_chain(state_dict.keys())
    if not chain or set(state_dict) == model_set:
        return state_dict, ""
    for i in range(1, len(chain) + 1):
        prefix = "".join(chain[:i])
        if {k[len(prefix) :] for k in state_dict} == model_set:
            return strip_prefix(state_dict, prefix), prefix
    model_chain = _prefix_chain(model_list)
    for i in range(len(chain) + 1):
        if chain[i:] == model_chain[: len(chain) - i]:
            break
    prefix = "".join(chain[:i])
    if not prefix:
        return state_dict, ""
    return strip_prefix(state_dict, prefix), prefix


def load_into_model(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, key: str | None = None
) -> str:
    """Load a checkpoint's state dict into ``model`` strictly, after :func:`match_to_model`.

    When the state dict holds several networks (:func:`find_networks`: a network and its EMA
    copy under other prefixes) and the whole does not fit, the network whose entries fit the
    model after stripping its prefix is loaded, and the other networks' entries and entries
    of no network (``criterion.weight``) are ignored; a model that fits the raw network and
    its EMA copy alike gets the raw one. Within the chosen network loading is still strict.

    Keys and shapes are checked before anything is copied, so a mismatch leaves the model
    untouched.

    Args:
        model: The model to load into.
        state_dict: The checkpoint's state dict (:attr:`Checkpoint.state_dict`).
        key: The ``key`` that selected ``state_dict`` (:attr:`Checkpoint.key`), to name the
            ``--key`` of a network in messages.

    Returns:
        The prefix stripped from the checkpoint's keys (``""`` if none): the chosen network's
        prefix when several networks are present, so that ``prefix + name`` are the keys of
        ``state_dict`` that were loaded.

    Raises:
        ModelError: Missing or unexpected keys, or shape mismatches (one line naming the first
            few of each and their counts, and the ``--key`` of a part that fits).
    """
    own = model.state_dict(keep_vars=True)
    renamed, prefix, note, fix = _choose_network(state_dict, own, key)
    missing = [k for k in own if k not in renamed and not _fillable(k, renamed)]
    unexpected = [k for k in renamed if k not in own]
    shapes = [
        f"{k}: checkpoint {list(renamed[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in renamed
        and isinstance(renamed[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and not nn.parameter.is_lazy(own[k])
        and renamed[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(_counted(missing, "missing key"))
        if unexpected:
            parts.append(_counted(unexpected, "unexpected key"))
        if shapes:
            parts.append(_counted(shapes, "shape mismatch", plural="shape mismatches"))
        raise ModelError(f"checkpoint does not fit the model{note}: " + ", ".join(parts), fix)
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint does not fit the model: {_reason(exc)}", _FIX_MODEL) from exc
    return prefix


def _fits(renamed: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """The same keys (a ``num_batches_tracked`` torch fills in may be absent)."""
    if any(k not in own for k in renamed):
        return False
    return all(k in renamed or _fillable(k, renamed) for k in own)


def _truncations(prefix: str) -> list[str]:
    """``"ema_model.module."`` -> ``["ema_model.", "ema_model.module."]``."""
    names = prefix.split(".")[:-1]
    return [".".join(names[:i]) + "." for i in range(1, len(names) + 1)]


def _choose_network(
    state_dict: dict[str, torch.Tensor], own: Mapping[str, Any], key: str | None
) -> tuple[dict[str, torch.Tensor], str, str, str]:
    """(renamed state dict, prefix stripped, note for errors, fix for errors)."""
    renamed, prefix = match_to_model(state_dict, own.keys())
    if _fits(renamed, own):
        return renamed, prefix, "", _FIX_MODEL
    nets = _networks_in(state_dict, key, ())
    stripped = f" (after stripping prefix '{prefix}')" if prefix else ""
    if not nets:
        for group in _key_groups(state_dict):
            for head in _truncations(group):
                if _fits(_members(state_dict, head, ()), own):  # plus entries of no network
                    fix = f"the model fits the entries under '{head}': pass key="
                    fix += f"{_sub_key(key, head)} to load only those"
                    note = f" (after stripping prefix '{head}')"
                    return strip_prefix(state_dict, head), head, note, fix
        return renamed, prefix, stripped, _FIX_MODEL

    # Several networks: every way of reading one of them, the raw network first.
    emas = tuple(n.prefix for n in nets if n.ema)
    options: list[tuple[dict[str, torch.Tensor], str, Network | None]] = []
    for net in nets:
        if net.prefix:
            for head in _truncations(net.prefix):
                options.append((_members(state_dict, head, ()), head, net))
        else:
            sub = _members(state_dict, "", emas)
            options.append((*match_to_model(sub, own.keys()), net))
    if not any(not n.prefix for n in nets):  # the raw network with what else is not EMA
        sub = _members(state_dict, "", emas)
        options.insert(1, (*match_to_model(sub, own.keys()), None))
    fitting = [o for o in options if _fits(o[0], own)]
    if fitting:
        raw = [o for o in fitting if o[2] is None or not o[2].ema]
        chosen = (raw or fitting)[0]
        label = chosen[2].label if chosen[2] is not None else chosen[1] or "(top level)"
        return chosen[0], chosen[1], f" (network '{label}')", _FIX_MODEL
    # None fits: strict within the closest network.
    best = max(options, key=lambda o: len(own.keys() & o[0].keys()))
    if not own.keys() & best[0].keys():
        return renamed, prefix, stripped, _FIX_MODEL
    label = best[2].label if best[2] is not None else best[1] or "(top level)"
    names = ", ".join(n.label for n in nets)
    note = f" (network '{label}', the closest of the checkpoint's networks {names})"
    return best[0], best[1], note, _FIX_MODEL


def _fillable(key: str, state_dict: Mapping[str, Any]) -> bool:
    """``num_batches_tracked`` absent from an old (version < 2) BN state dict is filled by torch.

    Without ``_metadata`` torch treats the version as unknown and fills it as well.
    """
    if not key.endswith("num_batches_tracked"):
        return False
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return True
    module = key.rsplit(".", 1)[0] if "." in key else ""
    version = metadata.get(module, {}).get("version")
    return version is None or version < 2


# --------------------------------------------------------------------------------------------
# Saving


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

        tensors = dict(ckpt.raw if selected else ckpt.state_dict)
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
    """Write through a temporary file in ``out``'s directory, fsync, then rename onto ``out``."""
    try:
        mode = out.stat().st_mode & 0o7777 if out.exists() else _default_mode()
        handle = tempfile.NamedTemporaryFile(
            dir=out.parent, delete=False, prefix=f".{out.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {_reason(exc)}", _fix_write()) from exc
    tmp = Path(handle.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"cannot write {out}: {_reason(exc)}", _fix_write()) from exc
    _fsync_dir(out.parent)


def _fix_write() -> str:
    return "check that the output= directory is writable and has free space"


def _default_mode() -> int:
    """Permissions a newly created file would get (temporary files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows opening directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
# Message helpers


def _join(parts: tuple[str, ...]) -> str | None:
    return ".".join(parts) if parts else None


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception message, shortened; the type name if it has none."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        if found:
            text = found.group(1)
    line = text.splitlines()[0].strip() if text else ""
    line = line.split(". ", 1)[0].rstrip(".")
    if not line:
        return type(exc).__name__
    if len(line) > 200:
        line = line[:197] + "..."
    return line


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


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping) and not obj:
        return "an empty dict"
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _list_keys(mapping: Mapping[Any, Any]) -> str:
    keys = [str(k) for k in mapping]
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    if len(keys) > _MAX_KEYS_LISTED:
        shown += f", ... ({len(keys) - _MAX_KEYS_LISTED} more)"
    return shown


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")


def _counted(items: list[str], noun: str, plural: str | None = None) -> str:
    word = noun if len(items) == 1 else (plural or noun + "s")
    return f"{len(items)} {word} ({_names(items)})"

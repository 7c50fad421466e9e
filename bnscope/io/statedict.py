"""Locate the state dict inside a loaded checkpoint object, and the networks it holds.

A checkpoint may hold more than one network: a Lightning module's state dict with ``model.*``
next to an EMA copy ``ema_model.module.*`` (and entries such as ``criterion.weight``), or timm's
top-level ``state_dict`` and ``state_dict_ema``. ``key`` selects one: a dotted path through
nested dicts, then optionally ``:PREFIX``, the entries of that state dict whose keys start with
``PREFIX.`` (``"state_dict:ema_model.module"``; the natural ``"state_dict.ema_model.module"``
works too). :attr:`~bnscope.io.checkpoint.Checkpoint.networks` describes the networks found,
EMA/SWA copies by name; :func:`~bnscope.io.fitting.load_into_model` picks the one that fits the
model, preferring the raw weights over an EMA copy of the same architecture.

Key prefixes added by DataParallel/DDP (``module.``), Lightning (``model.``) and
``torch.compile`` (``_orig_mod.``) are :data:`KNOWN_PREFIXES`; :func:`common_prefix` finds the
chain of them that a state dict's keys share.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import torch
from torch import nn

from bnscope.errors import CheckpointError
from bnscope.extras import NetworkDict
from bnscope.io._messages import _reason

__all__ = [
    "AVERAGED_COUNTERS",
    "EMA_KEYS",
    "KNOWN_PREFIXES",
    "WRAPPER_KEYS",
    "Network",
    "common_prefix",
    "find_networks",
    "locate_state_dict",
    "raw_members",
    "without_counters",
]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
"""Keys under which training scripts commonly nest the state dict, tried in this order."""

EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
"""Keys under which training scripts keep an EMA/SWA copy's state dict next to the model's
(timm's ``state_dict_ema``/``model_ema``, mmengine's ``ema_state_dict``, DiT-style ``ema``).
Found automatically, and tried before :data:`WRAPPER_KEYS` when they hold BN statistics: the
averaged weights are the ones usually evaluated and deployed, and the ones whose statistics
need recomputing (their running statistics are averages of the raw network's, not statistics
of the averaged weights). ``key`` picks the raw weights instead."""

AVERAGED_COUNTERS = ("n_averaged", "steps")
"""Entries that an averaged model's own state dict keeps next to ``module.*``:
``torch.optim.swa_utils.AveragedModel``'s ``n_averaged``, mmengine's averaged models' ``steps``.
They are not the network's, and are ignored when fitting it (and kept when writing)."""

KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by DataParallel/DDP, ``torch.compile`` and Lightning."""

_FIX_KEY = "pass key=NAME to say which entry holds the weights"
_MAX_KEYS_LISTED = 10
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


# --------------------------------------------------------------------------------------------
# Locating the state dict


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
        if prefix == "":  # "PATH:": the entries of no EMA/SWA copy (the raw network)
            return _Located(raw_members(sd), parts, holder, "", sd)
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
    # an EMA copy with BN statistics first (in mmengine's swapped layout: its state_dict),
    # then the wrapper keys, then an EMA copy without BN statistics (parameters only)
    swapped = ("state_dict",) if _swapped_ema(obj) else ()
    fallback = None
    for wrapper in dict.fromkeys((*swapped, *EMA_KEYS, *WRAPPER_KEYS)):
        if wrapper not in obj:
            continue
        found = _find(obj[wrapper], (*parts, wrapper))
        if found is None:
            continue
        if wrapper in EMA_KEYS and not _bn_bases(found[0]):
            fallback = fallback or found
            continue
        return found
    if fallback is not None:
        return fallback
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
    elif raw:  # selected by "PATH:" (every entry under no EMA prefix)
        ema_prefixes = tuple(g for g, _ in emas)
        n = sum(1 for b in bases if not b.startswith(ema_prefixes))
        nets.append(Network(f"{key or ''}:", "", n, False, parts))
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
                siblings.append(Network(where, "", n, _names_ema(obj, found[1]), found[1]))
    if not siblings:
        return tuple(nets)
    if not nets:
        n = len(_bn_bases(container))
        nets = [Network(key, "", n, _names_ema(obj, parts), parts)] if n else []
    return (*nets, *siblings)


def _swapped_ema(obj: Any) -> bool:
    """mmengine's EMAHook layout: ``state_dict`` next to an ``ema_state_dict`` of its averaged
    model (``module.*`` entries and a ``steps`` counter). The hook swaps the two networks when
    it saves, so that ``state_dict`` holds the averaged weights (the ones to deploy) and
    ``ema_state_dict`` the raw ones."""
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        return False
    ema = obj.get("ema_state_dict")
    if not isinstance(ema, Mapping) or "steps" not in ema:
        return False
    rest = [k for k in ema if k != "steps"]
    return bool(rest) and all(isinstance(k, str) and k.startswith("module.") for k in rest)


def _names_ema(obj: Any, parts: tuple[str, ...]) -> bool:
    """Whether the state dict at ``parts`` of the checkpoint ``obj`` is an EMA/SWA copy: by its
    name (:func:`_is_ema`), except in mmengine's swapped layout (:func:`_swapped_ema`)."""
    if parts in (("state_dict",), ("ema_state_dict",)) and _swapped_ema(obj):
        return parts == ("state_dict",)
    return _is_ema(_join(parts))


def raw_members(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` under no EMA/SWA prefix (:func:`find_networks`): the raw
    network and entries of no network; all of it when it holds one network."""
    emas = tuple(n.prefix for n in _networks_in(state_dict, None, ()) if n.ema)
    return _members(state_dict, "", emas)


# --------------------------------------------------------------------------------------------
# Prefixes


def common_prefix(keys: Iterable[str]) -> str:
    """The longest chain of :data:`KNOWN_PREFIXES` that every key starts with.

    ``["module._orig_mod.a", "module._orig_mod.b"]`` gives ``"module._orig_mod."``; ``""``
    when the keys share none (or there are no keys).
    """
    return "".join(_prefix_chain(keys))


def _prefix_chain(keys: Iterable[str]) -> list[str]:
    rest = without_counters(keys)
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


def without_counters(keys: Iterable[str]) -> list[str]:
    """The keys without an averaged model's counters (:data:`AVERAGED_COUNTERS`, at the top
    level) when every other key is under one prefix: ``["module.a", "n_averaged"]`` ->
    ``["module.a"]``. Other key lists are returned whole."""
    keys = list(keys)
    rest = [k for k in keys if k not in AVERAGED_COUNTERS]
    if len(rest) == len(keys) or not rest:
        return keys
    heads = {k.split(".", 1)[0] for k in rest}
    return rest if len(heads) == 1 and all("." in k for k in rest) else keys


# --------------------------------------------------------------------------------------------
# Message helpers


def _join(parts: tuple[str, ...]) -> str | None:
    return ".".join(parts) if parts else None


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

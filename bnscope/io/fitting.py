"""Fit a checkpoint's state dict to a model: strip the prefixes it lacks, pick the network.

Key prefixes added by DataParallel/DDP (``module.``), Lightning (``model.``) and
``torch.compile`` (``_orig_mod.``) are kept in :attr:`~bnscope.io.checkpoint.Checkpoint.state_dict`
and stripped only when fitting a model whose own keys lack them (:func:`match_to_model`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bnscope.errors import ModelError
from bnscope.io._messages import _names, _reason
from bnscope.io.statedict import (
    Network,
    _key_groups,
    _members,
    _networks_in,
    _prefix_chain,
    _sub_key,
    without_counters,
)

__all__ = ["load_into_model", "match_to_model", "strip_prefix"]

_FIX_MODEL = "check model= / model_kwargs= match the architecture the checkpoint was saved from"


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
    if set(state_dict) == model_set:
        return state_dict, ""
    chain = _prefix_chain(state_dict.keys())
    if not chain:
        return state_dict, ""
    # an averaged model's own state dict: its counters (n_averaged) are not the network's
    counters = set(state_dict) - set(without_counters(state_dict.keys())) - model_set
    if counters:
        kept: dict[str, torch.Tensor] = OrderedDict(
            (k, v) for k, v in state_dict.items() if k not in counters
        )
        if hasattr(state_dict, "_metadata"):
            kept._metadata = state_dict._metadata  # type: ignore[attr-defined]
        state_dict = kept
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
    its EMA/SWA copy alike gets the copy (the weights usually evaluated and deployed; select
    the raw network with ``key``). Within the chosen network loading is still strict. An
    averaged model's own state dict (``AveragedModel``: ``module.*`` and ``n_averaged``) loads
    its ``module.*`` entries; the counter is ignored. So is the ``num_batches_tracked`` entry
    of a BN layer that is frozen in the model (``FrozenBatchNorm2d``: no count), as frozen
    layers themselves ignore it.

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
    ignored = [k for k in renamed if _ignored(k, own)]
    unexpected = [k for k in renamed if k not in own and k not in ignored]
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
    if ignored:  # copied, so that the caller's state dict (and its _metadata) stay as they are
        renamed = copy.copy(renamed)
        for k in ignored:
            del renamed[k]
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint does not fit the model: {_reason(exc)}", _FIX_MODEL) from exc
    return prefix


def _fits(renamed: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """The same keys (a ``num_batches_tracked`` torch fills in may be absent, and one of a
    layer the model has frozen may be present)."""
    if any(k not in own and not _ignored(k, own) for k in renamed):
        return False
    return all(k in renamed or _fillable(k, renamed) for k in own)


def _ignored(key: str, own: Mapping[str, Any]) -> bool:
    """A ``num_batches_tracked`` entry of a layer that is frozen in the model (running
    statistics and no count: torchvision's, detectron2's, timm's and bnscope's frozen BN
    layers drop that entry when they load a BatchNorm state dict); it is not loaded."""
    suffix = "num_batches_tracked"
    if not key.endswith(suffix) or key in own:
        return False
    return f"{key[: -len(suffix)]}running_mean" in own


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
    if fitting:  # the EMA/SWA copy when it fits (EMA_KEYS: the weights usually deployed)
        averaged = [o for o in fitting if o[2] is not None and o[2].ema]
        chosen = (averaged or fitting)[0]
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
# Message helpers


def _counted(items: list[str], noun: str, plural: str | None = None) -> str:
    word = noun if len(items) == 1 else (plural or noun + "s")
    return f"{len(items)} {word} ({_names(items)})"

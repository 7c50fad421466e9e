"""One helper for "the model is exactly as before": modes, momentum, eps, parameters, buffers
and hook dictionaries of every module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module, skip_buffers: set[str] = frozenset()) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, mod in model.named_modules():
        state[f"{name}#training"] = mod.training
        for attr in ("momentum", "eps", "track_running_stats"):
            if hasattr(mod, attr):
                state[f"{name}#{attr}"] = getattr(mod, attr)
        for hook_dict in HOOK_DICTS:
            state[f"{name}#{hook_dict}"] = len(getattr(mod, hook_dict, {}) or {})
        for pname, p in mod.named_parameters(recurse=False):
            state[f"{name}.{pname}"] = (p.detach().clone(), p.requires_grad, p.device)
        for bname, b in mod.named_buffers(recurse=False):
            key = f"{name}.{bname}" if name else bname
            if key not in skip_buffers:
                state[key] = (b.detach().clone(), b.device)
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple) and isinstance(value[0], torch.Tensor):
            assert value[0].dtype == other[0].dtype, key
            assert torch.equal(value[0], other[0]) or (
                value[0].is_floating_point()
                and torch.equal(value[0].isnan(), other[0].isnan())
                and torch.equal(value[0].nan_to_num(), other[0].nan_to_num())
            ), key
            assert value[1:] == other[1:], key
        else:
            assert value == other, key

"""The network inside training wrappers: DDP, DataParallel, ``torch.compile``, SWA and EMA copies.

A training loop rarely holds the bare network: ``DistributedDataParallel(model)``,
``torch.compile(model)``, ``torch.optim.swa_utils.AveragedModel(model)`` or an EMA copy such as
timm's ``ModelEmaV2``/``ModelEmaV3`` (``self.module = deepcopy(model)``). bnscope collects
statistics of the network itself:

- DDP's forward would broadcast buffers and prepare gradient reduction on every call (a
  collective per batch, which hangs when the ranks run different numbers of batches);
- a compiled module's graph would be traced around bnscope's hooks;
- layer names should be the network's own (``0.running_mean``, not ``module.0.running_mean``),
  so that they match the network's state dict wherever it is saved.

:func:`unwrap` follows these wrappers to the network. The wrappers' own state (``n_averaged``
of an ``AveragedModel``, ``steps`` of mmengine's averaged models, an EMA's ``decay``) is left
alone. Anything else is run as given: a module whose forward adds work of its own around an
inner module (preprocessing, a second head) must run through that forward.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["unwrap"]

#: the class name (of the wrapper or a base class) of an EMA/SWA copy that keeps the network
#: as its only child ``module``: timm's ModelEmaV2/V3, torch's AveragedModel, mmengine's
#: BaseAveragedModel/ExponentialMovingAverage, and similar wrappers
_AVERAGED_CLASS = re.compile(r"Ema|EMA|Averag|MovingAverage")


def _is_averaging_wrapper(model: nn.Module) -> bool:
    """An EMA/SWA copy that only holds the network: its class (or a base class) is named like
    one (:data:`_AVERAGED_CLASS`), its only child is ``module``, and it has no parameters of its
    own (counters such as ``n_averaged`` are buffers)."""
    if not any(_AVERAGED_CLASS.search(cls.__name__) for cls in type(model).__mro__[:-2]):
        return False
    children = list(model._modules)
    if children != ["module"] or not isinstance(model._modules["module"], nn.Module):
        return False
    return not any(p is not None for p in model._parameters.values())


def _inner(model: nn.Module) -> nn.Module | None:
    """The module one wrapper holds, or None when ``model`` is not a known wrapper."""
    from torch.optim.swa_utils import AveragedModel

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)):
        inner = model.module
        return inner if isinstance(inner, nn.Module) else None
    orig = model._modules.get("_orig_mod")
    if orig is not None and type(model).__name__ == "OptimizedModule":  # torch.compile
        return orig
    if _is_averaging_wrapper(model):
        return model._modules["module"]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``model``'s training wrappers, however nested (``model`` itself when
    it is not wrapped): ``DistributedDataParallel``/``DataParallel`` and
    ``torch.optim.swa_utils.AveragedModel`` give their ``.module``, a ``torch.compile`` result
    its ``_orig_mod``, and an EMA copy that holds the network as its only child ``module`` (timm's
    ``ModelEmaV2``/``ModelEmaV3``, mmengine's ``ExponentialMovingAverage``) that child."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = _inner(model)
        if inner is None:
            return model
        model = inner
    return model

"""Frozen BatchNorm: BN as a fixed per-channel affine transform, for fine-tuning.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", section 4 ("Batch in Training and
Testing", *use population batch in training*): when the normalization batch is small or not
i.i.d., training with batch statistics and testing with population statistics disagree; using
fixed population statistics during (the last part of) training, "FrozenBN", removes that
inconsistency. The usual recipe is: recompute exact population statistics (Precise BN,
``bnscope precise``), then freeze them. Object detectors have long trained their backbones this
way: torchvision's ``torchvision.ops.FrozenBatchNorm2d`` and detectron2's
``detectron2.layers.FrozenBatchNorm2d`` are such layers (read for their layout and arithmetic;
no code taken).

A frozen layer computes, per channel c,

    y = (x - running_mean) * weight / sqrt(running_var + eps) + bias
      = x * scale + shift,   scale = weight * rsqrt(running_var + eps),
                             shift = bias - running_mean * scale,

as one scale-and-shift, whatever the mode: ``train()`` changes nothing, no statistics are ever
updated, and the layer has no parameters (an optimizer cannot move it); gradients flow to the
input.

Design decisions (where the usual descriptions leave room):

* **The state dict is torchvision's.** Four buffers, ``weight``, ``bias``, ``running_mean``
  and ``running_var``, an attribute ``eps``, no ``num_batches_tracked``. Loading a state dict
  that has ``num_batches_tracked`` (one saved from BatchNorm) accepts it and ignores it, as
  torchvision's and detectron2's layers do; so a BatchNorm checkpoint loads strictly into a
  frozen model, and a frozen checkpoint (``bnscope precise --freeze``) loads strictly into
  this class, torchvision's or detectron2's. The module's state-dict version is 3, that of
  detectron2's layer, whose ``running_var`` is used with ``eps`` added as here (detectron2
  subtracts ``eps`` from the ``running_var`` of a state dict saved with a lower version, such
  as BatchNorm's 2; torchvision reads no version).
* **Arithmetic and dtypes are torchvision's.** ``scale`` and ``shift`` are computed in the
  buffers' dtype, then ``x * scale + shift`` follows PyTorch's type promotion: float16 or
  bfloat16 input with float32 buffers gives a float32 output, as torchvision's
  ``FrozenBatchNorm2d`` does (detectron2 casts back to the input's dtype instead). The same
  operations in the same order give the same bits as torchvision's layer.
* **Dims.** :class:`FrozenBatchNorm` takes any input of at least 2 dims with the channels on
  dim 1; :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d` and :class:`FrozenBatchNorm3d`
  check the rank as the BatchNorm class of the same name does.
* **Conversion** (:func:`freeze_bn`): every ``_BatchNorm`` whose forward is BatchNorm's own
  (``BatchNorm1d/2d/3d``, initialized ``LazyBatchNorm*``, ``SyncBatchNorm``, subclasses that do
  not override ``forward``, and bnscope's :class:`~bnscope.nn.GhostBatchNorm`, which is plain
  BatchNorm in eval mode) becomes the frozen layer of its dimensionality (``SyncBatchNorm``:
  the generic :class:`FrozenBatchNorm`; a frozen layer needs no synchronization) holding the
  same statistics, ``eps`` and affine transform; ``affine=False`` gives weight ones and bias
  zeros. A subclass with its own forward (timm's ``BatchNormAct2d``: BN, then dropout and an
  activation; :class:`~bnscope.nn.PriorBatchNorm`) is refused with an error naming it: a plain
  affine would silently drop what its forward adds, and leaving it as it is would keep it
  updating its statistics in training, which is what freezing is meant to stop. ``only=``
  converts the other layers (timm users have ``timm.layers.freeze_batch_norm_2d``, whose
  ``FrozenBatchNormAct2d`` has the same four buffers). A layer without running statistics
  (``track_running_stats=False``) has nothing to freeze: it is left as it is, with a warning
  (an error when ``only=`` names it).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_bn",
    "unfreeze_bn",
    "can_freeze",
]

#: attribute (outside the state dict and module tree) holding the module that freeze_bn
#: replaced, so that unfreeze_bn can put that very object back
ORIGINAL = "_frozen_original"

#: which modules :func:`freeze_bn` converts: module names (as in ``named_modules()``) or a
#: predicate ``(name, module) -> bool``
Selection = Iterable[str] | Callable[[str, nn.Module], bool] | None


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine transform: y = x * scale + shift per channel,
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.

    Wu & Johnson (2021), section 4 ("FrozenBN"); the layout of torchvision's
    ``FrozenBatchNorm2d``: buffers ``weight``, ``bias``, ``running_mean``, ``running_var``
    (initialized to 1, 0, 0, 1), attribute ``eps``, no parameters, no ``num_batches_tracked``
    (ignored when a state dict has it). Train and eval mode compute the same thing. See the
    module docstring for dtypes.

    This class accepts input of any rank >= 2 (channels on dim 1); the ``1d``/``2d``/``3d``
    subclasses check the rank like the BatchNorm class of the same name.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    eps: float
    #: the state-dict version of detectron2's FrozenBatchNorm2d whose running_var is used with
    #: eps added, as here: detectron2 subtracts eps from the running_var of an older version
    _version = 3

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if (
            isinstance(num_features, bool)
            or not isinstance(num_features, numbers.Integral)
            or num_features < 1
        ):
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        super().__init__()
        self.eps = float(eps)
        make = {"device": device, "dtype": dtype}
        n = int(num_features)
        self.register_buffer("weight", torch.ones(n, **make))
        self.register_buffer("bias", torch.zeros(n, **make))
        self.register_buffer("running_mean", torch.zeros(n, **make))
        self.register_buffer("running_var", torch.ones(n, **make))

    @property
    def num_features(self) -> int:
        """Channels (the length of ``running_mean``)."""
        return int(self.running_mean.numel())

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a BatchNorm state dict's count means nothing to a frozen layer (load_state_dict
        # hands modules its own copy of the dict, so removing the entry is safe)
        state_dict.pop(f"{prefix}num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` of y = x * scale + shift, in the buffers' dtype:
        scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.running_mean.shape[0]:
            raise ValueError(
                f"expected {self.running_mean.shape[0]} channels on dim 1, got input of shape "
                f"{tuple(input.shape)}"
            )
        scale, shift = self.scale_shift()
        shape = (1, -1) + (1,) * (input.dim() - 2)
        return input * scale.reshape(shape) + shift.reshape(shape)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``[N, C]`` or ``[N, C, L]`` input (like ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``[N, C, H, W]`` input (like ``nn.BatchNorm2d``; the
    layout and arithmetic of ``torchvision.ops.FrozenBatchNorm2d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``[N, C, D, H, W]`` input (like ``nn.BatchNorm3d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


# --------------------------------------------------------------------------- conversion

_FROZEN_FOR: tuple[tuple[type[nn.Module], type[FrozenBatchNorm]], ...] = (
    (nn.BatchNorm3d, FrozenBatchNorm3d),
    (nn.BatchNorm2d, FrozenBatchNorm2d),
    (nn.BatchNorm1d, FrozenBatchNorm1d),
)
_PLAIN_FOR: dict[type[FrozenBatchNorm], type[_BatchNorm]] = {
    FrozenBatchNorm3d: nn.BatchNorm3d,
    FrozenBatchNorm2d: nn.BatchNorm2d,
    FrozenBatchNorm1d: nn.BatchNorm1d,
}


def _ghost_dims() -> tuple[tuple[type[nn.Module], type[FrozenBatchNorm]], ...]:
    from .nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

    return (
        (GhostBatchNorm3d, FrozenBatchNorm3d),
        (GhostBatchNorm2d, FrozenBatchNorm2d),
        (GhostBatchNorm1d, FrozenBatchNorm1d),
    )


def _bn_forward(module: nn.Module) -> bool:
    """Whether the module's forward is BatchNorm's own in eval mode (so a frozen layer computes
    what it computes with its running statistics)."""
    from .nn import GhostBatchNorm

    return type(module).forward in (
        _BatchNorm.forward,
        nn.SyncBatchNorm.forward,
        GhostBatchNorm.forward,  # plain BatchNorm in eval mode
    )


def can_freeze(module: nn.Module) -> bool:
    """Whether :func:`freeze_bn` converts ``module``: a BatchNorm layer whose forward is
    BatchNorm's own, initialized, with running statistics."""
    if not isinstance(module, _BatchNorm) or not _bn_forward(module):
        return False
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if has_uninit is not None and has_uninit():
        return False
    return module.running_mean is not None and module.running_var is not None


def _frozen_class(module: nn.Module) -> type[FrozenBatchNorm]:
    for plain, frozen in _FROZEN_FOR + _ghost_dims():
        if isinstance(module, plain):
            return frozen
    return FrozenBatchNorm


def _selector(only: Selection, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """``only`` as a predicate on (name, module); names are checked against the model (a
    shared module is selected by any of its names)."""
    if only is None:
        return lambda name, module: True
    if callable(only):
        return only
    names = {only} if isinstance(only, str) else set(only)
    aliases: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), set()).add(name)
        if name in names and not _has_statistics_slots(module):
            raise ValueError(
                f"only= names {_label(name, module)}, which is not a BatchNorm layer"
            )
    unknown = sorted(names - set().union(*aliases.values()))
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5])
        raise ValueError(
            f"only= names no module of the model: {shown}; use names as in "
            "model.named_modules()"
        )
    return lambda name, module: bool(aliases.get(id(module), {name}) & names)


def _has_statistics_slots(module: nn.Module) -> bool:
    """A BatchNorm layer, or a frozen one (``running_mean`` among its buffers)."""
    return isinstance(module, _BatchNorm) or "running_mean" in module._buffers


def _label(name: str, module: nn.Module) -> str:
    return f"{name or '(root)'} ({type(module).__name__})"


def _plan_freeze(model: nn.Module, only: Selection) -> dict[int, FrozenBatchNorm]:
    """The frozen layer for each module to convert (by id), every problem raised before
    anything is changed."""
    chosen = _selector(only, model)
    explicit = only is not None and not callable(only)
    custom: list[str] = []
    plans: dict[int, FrozenBatchNorm] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or not chosen(name, module):
            continue
        has_uninit = getattr(module, "has_uninitialized_params", None)
        if has_uninit is not None and has_uninit():
            raise ValueError(
                f"{_label(name, module)} has uninitialized lazy parameters; run one forward "
                "before freeze_bn"
            )
        if not _bn_forward(module):
            custom.append(_label(name, module))
            continue
        if module.running_mean is None or module.running_var is None:
            message = (
                f"{_label(name, module)} has no running statistics "
                "(track_running_stats=False): nothing to freeze"
            )
            if explicit:
                raise ValueError(message + "; leave it out of only=")
            warnings.warn(message + "; left as it is by freeze_bn", stacklevel=3)
            continue
        plans[id(module)] = _frozen_copy(module)
    if custom:
        more = f" and {len(custom) - 3} more" if len(custom) > 3 else ""
        raise ValueError(
            f"{', '.join(custom[:3])}{more} {'has' if len(custom) == 1 else 'have'} a forward "
            "of its own (e.g. BN followed by an activation): a frozen affine layer would drop "
            "what it adds; pass only= the other BatchNorm layers (for timm's BatchNormAct2d: "
            "timm.layers.freeze_batch_norm_2d)"
        )
    return plans


def _frozen_copy(module: _BatchNorm) -> FrozenBatchNorm:
    """The frozen layer of ``module``: its very running statistics tensors, its weight and bias
    detached (the same storage; ones and zeros when ``affine=False``), its eps and mode."""
    mean, var = module.running_mean, module.running_var
    assert mean is not None and var is not None  # checked by _plan_freeze
    frozen = _frozen_class(module)(module.num_features, eps=module.eps, device="meta")
    weight = module.weight.detach() if module.weight is not None else torch.ones_like(mean)
    bias = module.bias.detach() if module.bias is not None else torch.zeros_like(mean)
    frozen._buffers.update(
        {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    )
    frozen.training = module.training
    frozen.__dict__[ORIGINAL] = module
    return frozen


def freeze_bn(model: nn.Module, *, only: Selection = None) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a :class:`FrozenBatchNorm` with the same
    statistics and affine transform (Wu & Johnson 2021, "FrozenBN").

    ``BatchNorm1d``/``2d``/``3d`` (and :class:`~bnscope.nn.GhostBatchNorm1d`/``2d``/``3d``)
    become :class:`FrozenBatchNorm1d`/``2d``/``3d``; ``SyncBatchNorm`` and other BatchNorm
    classes with BatchNorm's own forward the generic :class:`FrozenBatchNorm`. Each frozen
    layer holds the layer's very ``running_mean``/``running_var`` tensors, its weight and bias
    detached (same storage; ones and zeros for ``affine=False``), its ``eps``, device, dtype
    and training flag; ``num_batches_tracked`` and ``momentum`` have no meaning there. Its
    outputs equal the BatchNorm layer's in eval mode, in either mode. The replaced module is
    remembered (outside the state dict) so that :func:`unfreeze_bn` puts that very object back.
    Forward hooks of the replaced module do not carry over. A module shared at several places
    is converted once and stays shared.

    Works in place on ``model``'s children and returns the model; when ``model`` itself is a
    BatchNorm layer the returned object is the new module, so always use the return value.

    ``only``: module names (as in ``model.named_modules()``; a shared module may be named by
    any of its names) or a predicate ``only(name, module) -> bool``; the other layers are left
    as they are. Frozen layers already present are left as they are.

    Raises :class:`ValueError` before changing anything: for a BatchNorm subclass with a
    forward of its own (e.g. timm's ``BatchNormAct2d``, BN + activation; leave it out with
    ``only=``), an uninitialized lazy BatchNorm, a name in ``only`` that is no module or no
    BatchNorm layer, or a layer without running statistics named in ``only`` (without
    ``only`` such a layer is left as it is, with a warning).
    """
    from .nn import _replace

    plans = _plan_freeze(model, only)
    return _replace(model, lambda module, name: plans.get(id(module), module), {})


def _affine_identity(frozen: FrozenBatchNorm) -> bool:
    return bool(torch.all(frozen.weight == 1)) and bool(torch.all(frozen.bias == 0))


def _unfrozen(frozen: FrozenBatchNorm, name: str) -> nn.Module:
    """The trainable BatchNorm of ``frozen`` (see :func:`unfreeze_bn`)."""
    original = frozen.__dict__.get(ORIGINAL)
    mean, var = frozen.running_mean, frozen.running_var
    if original is None:
        plain = _PLAIN_FOR.get(type(frozen))
        if plain is None:  # a generic FrozenBatchNorm built directly: no dimensionality known
            return frozen
        bn = plain(frozen.num_features, eps=frozen.eps, device="meta")
        bn._parameters["weight"] = nn.Parameter(frozen.weight.detach())
        bn._parameters["bias"] = nn.Parameter(frozen.bias.detach())
        tracked = torch.zeros((), dtype=torch.long, device=mean.device)
        bn._buffers.update({"running_mean": mean, "running_var": var})
        bn._buffers["num_batches_tracked"] = tracked
        bn.training = frozen.training
        return bn
    bn = cast(_BatchNorm, original)
    if bn.affine:
        with torch.no_grad():  # the same Parameter objects (an optimizer keeps them)
            assert bn.weight is not None and bn.bias is not None
            bn.weight.data = frozen.weight.detach()
            bn.bias.data = frozen.bias.detach()
    elif not _affine_identity(frozen):
        raise ValueError(
            f"{_label(name, frozen)}: its BatchNorm had affine=False, but the frozen weight and "
            "bias are no longer 1 and 0; the BatchNorm layer cannot hold them"
        )
    bn._buffers["running_mean"] = mean
    bn._buffers["running_var"] = var
    count = bn._buffers.get("num_batches_tracked")
    if count is not None and count.device != mean.device:
        bn._buffers["num_batches_tracked"] = count.to(mean.device)
    bn.eps = frozen.eps
    bn.training = frozen.training
    return bn


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn`: give back trainable BatchNorm layers with the frozen layers'
    current statistics, weight, bias and eps.

    A layer :func:`freeze_bn` made becomes the object it replaced again (its class, momentum,
    ``track_running_stats``, ``num_batches_tracked`` and its very weight and bias
    ``Parameter`` objects, now holding the frozen values), so an optimizer built before
    freezing keeps working. A :class:`FrozenBatchNorm1d`/``2d``/``3d`` built directly (or
    loaded from a checkpoint) becomes ``nn.BatchNorm1d``/``2d``/``3d`` with ``affine=True``
    (weight and bias as parameters), momentum 0.1 and ``num_batches_tracked`` 0; a generic
    :class:`FrozenBatchNorm` built directly has no dimensionality and is left as it is.
    Statistics, weight and bias are the frozen layer's tensors (no copy); training flag,
    device and dtype are kept. Returns the model (the root may be replaced, so use the return
    value).

    Raises :class:`ValueError` before changing anything when a layer converted from an
    ``affine=False`` BatchNorm no longer has weight 1 and bias 0 (that BatchNorm could not
    hold them).
    """
    from .nn import _replace

    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm) and ORIGINAL in module.__dict__:
            original = cast(_BatchNorm, module.__dict__[ORIGINAL])
            if not original.affine and not _affine_identity(module):
                _unfrozen(module, name)  # raises the error
    return _replace(
        model,
        lambda module, name: _unfrozen(module, name)
        if isinstance(module, FrozenBatchNorm)
        else module,
        {},
    )

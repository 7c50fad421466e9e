"""Split BatchNorm: one set of running statistics per domain, shared affine parameters.

Multi-domain models keep separate BN statistics for each domain and share every weight:
Chang et al. (2019), "Domain-Specific Batch Normalization for Unsupervised Domain Adaptation"
(CVPR); Xie et al. (2020), "Adversarial Examples Improve Image Recognition" (AdvProp, CVPR),
whose auxiliary BN normalizes adversarial examples; Wu & Johnson (2021), "Rethinking 'Batch' in
BatchNorm", section 5 (one BN population per domain). :class:`SplitBatchNorm` is BatchNorm
whose running statistics are chosen by a domain index; ``bnscope adapt --domain`` (and
:func:`bnscope.adapt_domains`) estimates one set per domain, and ``--split`` writes them in
this module's layout.

Design decisions:

* **Buffer layout.** ``running_mean`` and ``running_var`` have shape ``[D, C]`` (row d is
  domain d's statistics) and ``num_batches_tracked`` shape ``[D]``; ``weight`` and ``bias``
  (shape ``[C]``) are shared. State-dict keys are those of ``nn.BatchNorm*d``, so a plain
  checkpoint's keys map one to one onto a split model's, row d taking domain d's values
  (:func:`load_domain_statistics`), and a split checkpoint never loads silently into a plain
  model (the shapes differ).
* **Selecting a domain.** The ``domain`` attribute (an index, 0 by default) or a ``domain=``
  argument of ``forward``; :func:`use_domain` sets it on every split layer of a model for a
  block and restores each layer's own value afterwards, :func:`set_domain` sets it for good.
* **Each domain is plain BatchNorm.** Training mode normalizes with batch statistics and
  updates the selected row exactly as ``nn.BatchNorm*d`` updates its buffers (EMA with the
  unbiased batch variance, momentum m; ``momentum=None`` is the cumulative average over that
  domain's own count); eval mode normalizes with the selected row. The other rows are never
  touched. Both go through :func:`torch.nn.functional.batch_norm`, the kernel of BatchNorm.
* **Running statistics are always tracked** (there is nothing to split otherwise); a BatchNorm
  with ``track_running_stats=False`` is left alone by :func:`convert_to_split_bn`.
* **Not a ``_BatchNorm``**: bnscope's analyses (precise, adapt, inspect, ghost) measure plain
  BN layers; take a domain back to plain BN with :func:`revert_split_bn` to analyse it.
* A ``SyncBatchNorm`` converted to a split layer normalizes with the local batch (no
  cross-process synchronization), as :func:`bnscope.nn.convert_to_ghost` does.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "SplitBatchNorm",
    "SplitBatchNorm1d",
    "SplitBatchNorm2d",
    "SplitBatchNorm3d",
    "convert_to_split_bn",
    "revert_split_bn",
    "load_domain_statistics",
    "use_domain",
    "set_domain",
    "splittable",
]

# Attribute (outside the state dict and module tree) holding the module that
# convert_to_split_bn replaced, so that revert_split_bn can put that very object back.
_ORIGINAL = "_split_original"


def _check_count(num_domains: object) -> int:
    if (
        isinstance(num_domains, bool)
        or not isinstance(num_domains, numbers.Integral)
        or int(num_domains) < 1
    ):
        raise ValueError(f"num_domains must be an integer >= 1, got {num_domains!r}")
    return int(num_domains)


def _check_domain(domain: object, num_domains: int) -> int:
    if (
        isinstance(domain, bool)
        or not isinstance(domain, numbers.Integral)
        or not 0 <= int(domain) < num_domains
    ):
        raise ValueError(
            f"domain must be an integer index in [0, {num_domains}) (num_domains={num_domains}), "
            f"got {domain!r}"
        )
    return int(domain)


class SplitBatchNorm(nn.Module):
    """BatchNorm with one set of running statistics per domain and shared ``weight``/``bias``.

    ``running_mean``/``running_var`` are ``[num_domains, num_features]``, ``num_batches_tracked``
    is ``[num_domains]``; the ``domain`` attribute (or ``forward(x, domain=d)``) selects the row
    a forward uses: in training mode the forward is BatchNorm's (batch statistics, row d's EMA
    updated), in eval mode it normalizes with row d (see the module docstring).

    This class accepts input of any rank >= 2; the ``1d``/``2d``/``3d`` subclasses check the
    rank like the matching BatchNorm class.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d = _check_count(num_domains)
        self.num_features = num_features
        self.num_domains = d
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = True
        self._domain = 0
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        shape = (d, num_features)
        self.register_buffer("running_mean", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(shape, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.zeros(d, dtype=torch.long, device=device))

    @property
    def domain(self) -> int:
        """The index of the statistics a forward uses (validated on assignment)."""
        return self._domain

    @domain.setter
    def domain(self, value: int) -> None:
        self._domain = _check_domain(value, self.num_domains)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, domain={self.domain}"
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, domain: int | None = None) -> Tensor:
        self._check_input_dim(input)
        d = self.domain if domain is None else _check_domain(domain, self.num_domains)
        mean, var = self.running_mean[d], self.running_var[d]  # views: updates reach the rows
        if not self.training:
            return F.batch_norm(input, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = self.num_batches_tracked[d]
        tracked.add_(1)
        if self.momentum is None:  # the cumulative average of this domain's batches
            factor = 1.0 / float(tracked)
        return F.batch_norm(input, mean, var, self.weight, self.bias, True, factor, self.eps)


class SplitBatchNorm1d(SplitBatchNorm):
    """:class:`SplitBatchNorm` for ``[N, C]`` or ``[N, C, L]`` input (like ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class SplitBatchNorm2d(SplitBatchNorm):
    """:class:`SplitBatchNorm` for ``[N, C, H, W]`` input (like ``nn.BatchNorm2d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SplitBatchNorm3d(SplitBatchNorm):
    """:class:`SplitBatchNorm` for ``[N, C, D, H, W]`` input (like ``nn.BatchNorm3d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


# --------------------------------------------------------------------------- domains


def _split_layers(model: nn.Module) -> list[SplitBatchNorm]:
    return [m for m in model.modules() if isinstance(m, SplitBatchNorm)]


def set_domain(model: nn.Module, domain: int) -> None:
    """Select ``domain`` in every :class:`SplitBatchNorm` of ``model`` (``model`` may be one)."""
    layers = _split_layers(model)
    for layer in layers:  # validate every layer before changing any
        _check_domain(domain, layer.num_domains)
    for layer in layers:
        layer.domain = domain


@contextlib.contextmanager
def use_domain(model: nn.Module, domain: int) -> Iterator[nn.Module]:
    """Within the block, every :class:`SplitBatchNorm` of ``model`` uses ``domain``; afterwards
    (also on an error) each layer has its own earlier domain again.

    >>> with use_domain(model, 1):
    ...     logits = model(x)            # normalized with domain 1's statistics
    """
    layers = _split_layers(model)
    before = [layer.domain for layer in layers]
    try:
        set_domain(model, domain)
        yield model
    finally:
        for layer, d in zip(layers, before, strict=True):
            layer.domain = d


def load_domain_statistics(
    model: nn.Module,
    statistics: Mapping[int, Mapping[str, Tensor]] | Sequence[Mapping[str, Tensor]],
) -> nn.Module:
    """Fill the rows of every :class:`SplitBatchNorm` in ``model`` from per-domain state dicts.

    ``statistics`` maps a domain index to the state dict of the *plain* model with that
    domain's statistics (a per-domain checkpoint's state dict, e.g. what ``bnscope adapt
    --domain`` writes, or :func:`bnscope.ops.domains.domain_state_dict`); a sequence gives
    domain i its i-th state dict. For the split layer at module path ``P`` row d receives
    ``P.running_mean``, ``P.running_var`` and, when present, ``P.num_batches_tracked`` of state
    dict d (cast to the buffers' dtype and device); other keys are ignored and domains not
    given keep their rows. Strict otherwise: a missing key or a wrong shape raises
    :class:`ValueError` before anything is written. Returns ``model``.
    """
    given = dict(enumerate(statistics)) if not isinstance(statistics, Mapping) else statistics
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SplitBatchNorm)]
    writes: list[tuple[Tensor, Tensor]] = []
    missing: list[str] = []
    for domain, state in given.items():
        for name, layer in layers:
            d = _check_domain(domain, layer.num_domains)
            base = f"{name}." if name else ""
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                value = state.get(base + key)
                if value is None:
                    if key != "num_batches_tracked":
                        missing.append(f"{base}{key} (domain {d})")
                    continue
                row = getattr(layer, key)[d]
                if tuple(value.shape) != tuple(row.shape):
                    raise ValueError(
                        f"{base}{key} of domain {d} has shape {list(value.shape)}, the split "
                        f"layer's row has {list(row.shape)}"
                    )
                writes.append((row, value))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise ValueError(f"the state dicts lack the statistics of split layers: {shown}")
    with torch.no_grad():
        for row, value in writes:
            row.copy_(value)
    return model


# --------------------------------------------------------------------------- conversion

_SPLIT_FOR: tuple[tuple[type[_BatchNorm], type[SplitBatchNorm]], ...] = (
    (nn.SyncBatchNorm, SplitBatchNorm),
    (nn.BatchNorm3d, SplitBatchNorm3d),
    (nn.BatchNorm2d, SplitBatchNorm2d),
    (nn.BatchNorm1d, SplitBatchNorm1d),
)
_PLAIN_FOR: dict[type[SplitBatchNorm], type[_BatchNorm]] = {
    SplitBatchNorm1d: nn.BatchNorm1d,
    SplitBatchNorm2d: nn.BatchNorm2d,
    SplitBatchNorm3d: nn.BatchNorm3d,
}


def _split_class_for(module: nn.Module) -> type[SplitBatchNorm] | None:
    return next((new for plain, new in _SPLIT_FOR if isinstance(module, plain)), None)


def splittable(module: nn.Module) -> bool:
    """Whether :func:`convert_to_split_bn` converts ``module``: a ``BatchNorm{1,2,3}d`` or
    ``SyncBatchNorm`` (or a subclass that keeps their forward) with running statistics and
    initialized parameters."""
    if _split_class_for(module) is None:
        return False
    bn = cast(_BatchNorm, module)
    if type(module).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return False
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if has_uninit is not None and has_uninit():
        return False
    return bool(bn.track_running_stats) and bn.running_mean is not None


def _to_split(module: nn.Module, name: str, num_domains: int) -> nn.Module:
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if isinstance(module, _BatchNorm) and has_uninit is not None and has_uninit():
        raise ValueError(
            f"{name or 'root'} ({type(module).__name__}) has uninitialized lazy parameters; "
            "run one forward before convert_to_split_bn"
        )
    cls = _split_class_for(module)
    if cls is None:
        return module
    if not splittable(module):
        if type(module).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
            warnings.warn(
                f"{name or 'root'} ({type(module).__name__}) overrides forward; "
                "left as it is by convert_to_split_bn",
                stacklevel=3,
            )
        return module  # no running statistics: nothing to split
    bn = cast(_BatchNorm, module)
    mean = cast(Tensor, bn.running_mean)
    split = cls(bn.num_features, num_domains, device="meta")
    split.eps, split.momentum, split.affine = bn.eps, bn.momentum, bn.affine
    split._parameters = bn._parameters.copy()  # the very Parameter objects: optimizers work on
    with torch.no_grad():
        split._buffers["running_mean"] = mean.detach().unsqueeze(0).repeat(num_domains, 1)
        var = cast(Tensor, bn.running_var).detach()
        split._buffers["running_var"] = var.unsqueeze(0).repeat(num_domains, 1)
        tracked = bn._buffers.get("num_batches_tracked")
        split._buffers["num_batches_tracked"] = (
            tracked.detach().reshape(1).repeat(num_domains)
            if tracked is not None
            else torch.zeros(num_domains, dtype=torch.long, device=mean.device)
        )
    split.training = bn.training
    split.__dict__[_ORIGINAL] = module
    return split


def _from_split(module: nn.Module, domain: int) -> nn.Module:
    if not isinstance(module, SplitBatchNorm):
        return module
    d = _check_domain(domain, module.num_domains)
    original = module.__dict__.get(_ORIGINAL)
    if original is None:
        plain_cls = _PLAIN_FOR.get(type(module))
        if plain_cls is None:  # a generic SplitBatchNorm built directly: no BN class to go to
            return module
        original = plain_cls(module.num_features, device="meta")
    bn = cast(_BatchNorm, original)
    bn._parameters = module._parameters.copy()
    with torch.no_grad():
        bn._buffers["running_mean"] = module.running_mean[d].clone()
        bn._buffers["running_var"] = module.running_var[d].clone()
        bn._buffers["num_batches_tracked"] = module.num_batches_tracked[d].clone()
    bn.num_features, bn.eps, bn.momentum = module.num_features, module.eps, module.momentum
    bn.affine, bn.track_running_stats = module.affine, True
    bn.training = module.training
    return bn


def convert_to_split_bn(model: nn.Module, num_domains: int) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` in ``model`` by a
    :class:`SplitBatchNorm1d`/``2d``/``3d`` (a :class:`SplitBatchNorm` for ``SyncBatchNorm``)
    with ``num_domains`` domains, each starting from the layer's running statistics (and
    ``num_batches_tracked``).

    Works in place on ``model``'s children and returns the model; when ``model`` itself is a
    BatchNorm the returned object is the new module, so always use the return value. Each
    replacement holds the *same* ``weight`` and ``bias`` Parameter objects (an optimizer keeps
    working), new ``[D, C]`` statistics buffers on the same device with the same dtype, and the
    same ``eps``, ``momentum``, ``affine`` and training flag; every layer starts on domain 0.
    The replaced module is remembered (outside the state dict) so that :func:`revert_split_bn`
    puts that very object back. Forward hooks registered on the replaced module do not carry
    over. Modules shared at several places stay shared.

    Left alone: layers with ``track_running_stats=False`` (nothing to split), BatchNorm
    subclasses that override ``forward`` (a warning names them, e.g. fused ``BNReLU2d``), frozen
    BN layers and split layers already present.

    Raises :class:`ValueError` for a bad ``num_domains`` or an uninitialized lazy BatchNorm.
    """
    from .nn import _replace

    d = _check_count(num_domains)
    return _replace(model, lambda m, name: _to_split(m, name, d), {})


def revert_split_bn(model: nn.Module, domain: int) -> nn.Module:
    """Plain BatchNorm again, holding ``domain``'s statistics: the inverse of
    :func:`convert_to_split_bn` for one domain.

    Each split layer :func:`convert_to_split_bn` made becomes the object it replaced again,
    with the shared ``weight``/``bias`` Parameters, copies of row ``domain`` of its statistics
    (``num_batches_tracked`` included), its settings and training flag. A
    :class:`SplitBatchNorm1d`/``2d``/``3d`` built directly becomes ``nn.BatchNorm1d``/``2d``/
    ``3d``; a plain :class:`SplitBatchNorm` built directly has no BatchNorm counterpart and is
    left as it is. Returns the model (the root may be replaced, so use the return value).
    Raises :class:`ValueError` when ``domain`` is not an index of every split layer."""
    from .nn import _replace

    for layer in _split_layers(model):
        _check_domain(domain, layer.num_domains)
    return _replace(model, lambda m, name: _from_split(m, domain), {})

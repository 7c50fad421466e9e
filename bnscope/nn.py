"""Ghost Batch Normalization and Sequential Normalization as drop-in PyTorch modules.

Ghost BN (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", NeurIPS) normalizes a large
training batch in small "ghost" batches of ``ghost_size`` samples, each with its own batch
statistics, so that the noise of the normalization matches that of a small batch.
SeqNorm (Dimitriou & Arandjelovic 2020, "Sequential Normalization: Embracing Smaller Sample
Sizes for Normalization") is GroupNorm without affine followed by Ghost BN.
:class:`PriorBatchNorm` and :func:`convert_to_prior_bn` (test-time statistics mixed with the
source statistics, Schneider et al. 2020) are defined in :mod:`bnscope.nn_prior`,
:class:`FrozenBatchNorm`, :func:`freeze_bn` and :func:`unfreeze_bn` (BN as a fixed affine
transform for fine-tuning, Wu & Johnson 2021) in :mod:`bnscope.nn_frozen`, and
:class:`SplitBatchNorm` with :func:`convert_to_split_bn` (one set of running statistics per
domain) in :mod:`bnscope.nn_split`; all are re-exported here.

Design decisions (where the usual descriptions leave room):

* **Running statistics are those of plain BatchNorm.** A training forward updates
  ``running_mean``/``running_var``/``num_batches_tracked`` once, with the statistics of the
  *whole* batch, through the same :func:`torch.nn.functional.batch_norm` kernel that
  :class:`torch.nn.BatchNorm2d` uses (EMA with the unbiased variance; ``momentum=None`` is the
  cumulative average). Turning ghost normalization on or off therefore never changes what
  evaluation uses, and the buffers equal those of plain BN fed the same batches.
* **Chunks.** The batch is split along dim 0 into ``B // g`` chunks of ``g`` samples plus a
  remainder of ``B % g`` samples, which is normalized on its own unless it would hold a single
  value per channel (one sample and no spatial dims); then it joins the previous chunk. With
  ``g >= B`` the whole batch is one chunk and the module is exactly BatchNorm (``eps=0``, which
  ``F.batch_norm`` refuses in training, is accepted and normalizes by hand). When every
  chunk would hold one value per channel (``g == 1`` on ``[N, C]`` input) the forward raises
  :class:`ValueError`, as BatchNorm does for a batch of one such value.
* **Evaluation is plain BatchNorm** (the inherited ``_BatchNorm.forward``): running statistics
  when they exist, any batch size. Without running statistics (``track_running_stats=False``)
  evaluation uses the statistics of the whole batch, as BatchNorm does, not ghost chunks.
* **Dims.** :class:`GhostBatchNorm` accepts any input of at least 2 dims (``[N, C]``,
  ``[N, C, L]``, ``[N, C, H, W]``, ``[N, C, D, H, W]``, ...). :class:`GhostBatchNorm1d`,
  :class:`GhostBatchNorm2d` and :class:`GhostBatchNorm3d` check dims like the BatchNorm class
  of the same name; :func:`convert_to_ghost` uses them for ``BatchNorm{1,2,3}d``.
* **Float16/bfloat16** ghost statistics are computed in float32 and the output cast back.
* **One chunk normalization.** :func:`normalize_chunks` (per-sample moments, chunk moments
  from them by the law of total variance, one fused scale-and-shift; differentiable) is what
  the module's training forward and :func:`bnscope.ghost_analysis` both run.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SeqNorm",
    "convert_to_ghost",
    "revert_ghost",
    "ghost_chunk_sizes",
    "normalize_chunks",
    "ChunkStats",
    "PriorBatchNorm",
    "PriorBatchNorm1d",
    "PriorBatchNorm2d",
    "PriorBatchNorm3d",
    "PriorSyncBatchNorm",
    "convert_to_prior_bn",
    "revert_prior_bn",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_bn",
    "unfreeze_bn",
    "can_freeze",
    "SplitBatchNorm",
    "SplitBatchNorm1d",
    "SplitBatchNorm2d",
    "SplitBatchNorm3d",
    "convert_to_split_bn",
    "revert_split_bn",
    "load_domain_statistics",
    "use_domain",
    "set_domain",
]

# Attribute (outside the state dict and module tree) holding the module that convert_to_ghost
# replaced, so that revert_ghost can put that very object back.
_ORIGINAL = "_ghost_original"


def _check_ghost_size(ghost_size: object) -> int:
    if isinstance(ghost_size, bool) or not isinstance(ghost_size, numbers.Integral):
        raise ValueError(
            f"ghost_size must be a positive integer (samples per ghost batch), "
            f"got {ghost_size!r} of type {type(ghost_size).__name__}"
        )
    if int(ghost_size) < 1:
        raise ValueError(
            f"ghost_size must be a positive integer (samples per ghost batch), got {ghost_size}"
        )
    return int(ghost_size)


def _split(batch: int, ghost_size: int, values_per_sample: int) -> tuple[int, int]:
    """``(full, tail)``: ``full`` chunks of ``ghost_size`` samples, then one of ``tail`` (maybe 0).

    The tail is ``batch % ghost_size``, or ``ghost_size + 1`` when a one-value remainder joins
    the last full chunk. ``ghost_size >= batch`` gives ``(0, batch)``: one chunk.
    """
    if ghost_size >= batch:
        return 0, batch
    full, rem = divmod(batch, ghost_size)
    if rem * values_per_sample == 1:
        return full - 1, ghost_size + 1
    return full, rem


def ghost_chunk_sizes(batch: int, ghost_size: int, values_per_sample: int = 1) -> list[int]:
    """Sizes (in samples, in batch order) of the ghost batches a training forward normalizes.

    ``values_per_sample`` is the number of elements per sample and channel (``H*W`` for
    ``[N, C, H, W]`` input, 1 for ``[N, C]``); it decides whether a one-sample remainder is
    normalized on its own (more than one value) or joins the previous chunk.

    >>> ghost_chunk_sizes(10, 4), ghost_chunk_sizes(9, 4), ghost_chunk_sizes(9, 4, 16)
    ([4, 4, 2], [4, 5], [4, 4, 1])
    """
    g = _check_ghost_size(ghost_size)
    if batch < 0 or values_per_sample < 0:
        raise ValueError("batch and values_per_sample must be non-negative")
    full, tail = _split(batch, g, values_per_sample)
    return [g] * full + ([tail] if tail else [])


@dataclass(frozen=True)
class ChunkStats:
    """Statistics of one ghost-normalized call: per chunk (``mean``/``var``, [K, C], biased)
    and per sample (``sample_mean``/``sample_var`` over the spatial positions, [N, C])."""

    mean: torch.Tensor
    var: torch.Tensor
    sample_mean: torch.Tensor
    sample_var: torch.Tensor


def normalize_chunks(
    x: torch.Tensor,
    sizes: list[int],
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ChunkStats]:
    """Normalize each chunk of ``x`` ([N, C, ...]) with its own mean and biased variance, then
    apply the affine transform when ``weight``/``bias`` are given.

    Per-sample moments over the spatial positions come first (one contiguous reduction); a
    chunk's moments follow exactly from them (law of total variance: var_k = mean_i(v_i +
    (m_i - mu_k)^2), every sample having the same number of positions), and the output is one
    fused scale-and-shift, so a ghost forward costs about what BatchNorm's own does."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n, c = work.shape[0], work.shape[1]
    flat = work.reshape(n, c, -1)
    v_i, m_i = _sample_moments(flat)
    means, variances, scales, shifts = [], [], [], []
    start = 0
    for size, count in _runs(sizes):  # chunks of equal size, as [count, size, C] views
        stop = start + size * count
        m = m_i[start:stop].view(count, size, c)
        v = v_i[start:stop].view(count, size, c)
        mean_k = m.mean(1)
        dev = m - mean_k.unsqueeze(1)
        var_k = (v + dev * dev).mean(1)
        scale = torch.rsqrt(var_k + eps)
        if weight is not None:
            scale = scale * weight.to(work.dtype)
        shift = -mean_k * scale
        if bias is not None:
            shift = shift + bias.to(work.dtype)
        means.append(mean_k)
        variances.append(var_k)
        scales.append(scale.unsqueeze(1).expand(count, size, c).reshape(count * size, c))
        shifts.append(shift.unsqueeze(1).expand(count, size, c).reshape(count * size, c))
        start = stop
    if len(means) == 1:
        mean_k, var_k, scale, shift = means[0], variances[0], scales[0], shifts[0]
    else:
        mean_k, var_k = torch.cat(means), torch.cat(variances)
        scale, shift = torch.cat(scales), torch.cat(shifts)
    y = torch.addcmul(shift.unsqueeze(2), flat, scale.unsqueeze(2))
    return y.reshape(x.shape).to(x.dtype), ChunkStats(mean_k, var_k, m_i, v_i)


def _sample_moments(flat: Tensor) -> tuple[Tensor, Tensor]:
    """(biased variance, mean) of ``flat`` [N, C, L] over L. On the GPU one Welford pass
    (``torch.var_mean``); on the CPU two passes (mean, then the mean of squared deviations),
    which its kernels run several times faster than ``var_mean`` over a row, at the same
    precision (the deviations are taken from the row's own mean)."""
    if flat.device.type != "cpu":
        return torch.var_mean(flat, dim=2, correction=0)
    m_i = flat.mean(2)
    d = flat - m_i.unsqueeze(2)
    return d.square_().mean(2), m_i


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """``(size, count)`` for each run of equal consecutive chunk sizes."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs


class GhostBatchNorm(_BatchNorm):
    """BatchNorm that normalizes each training batch in ghost batches of ``ghost_size`` samples.

    Hoffer, Hubara & Soudry (2017), "Train longer, generalize better: closing the generalization
    gap in large batch training of neural networks". Each chunk of ``ghost_size`` consecutive
    samples (dim 0) is normalized with its own mean and biased variance, then the affine
    transform is applied. A remainder chunk is normalized on its own unless it holds a single
    value per channel, in which case it joins the previous chunk.

    The running statistics are updated once per training forward with the whole batch, exactly
    as :class:`torch.nn.BatchNorm2d` would, and evaluation is plain BatchNorm; see the module
    docstring. Parameters, buffers and state-dict keys are those of ``nn.BatchNorm*d``, so
    state dicts load either way.

    This class accepts input of any rank >= 2; the ``1d``/``2d``/``3d`` subclasses check the
    rank like the matching BatchNorm class.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        g = _check_ghost_size(ghost_size)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.ghost_size = g

    @property
    def ghost_size(self) -> int:
        """Samples per ghost batch (validated on assignment)."""
        return self._ghost_size

    @ghost_size.setter
    def ghost_size(self, value: int) -> None:
        self._ghost_size = _check_ghost_size(value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        batch = input.shape[0]
        spatial = math.prod(input.shape[2:])
        full, tail = _split(batch, self.ghost_size, spatial)
        if full == 0 and self.eps > 0:  # one chunk: exactly BatchNorm, running stats included
            return super().forward(input)
        if (full and self.ghost_size * spatial == 1) or tail * spatial == 1:
            raise ValueError(
                f"ghost_size={self.ghost_size} on input of shape {tuple(input.shape)} gives ghost "
                "batches of one value per channel; use ghost_size >= 2 or a larger batch"
            )
        self._update_running_stats(input)
        return self._ghost_normalize(input, full, tail)

    def _update_running_stats(self, input: Tensor) -> None:
        """One whole-batch update of the buffers, mirroring ``_BatchNorm.forward``."""
        if not self.track_running_stats:
            return
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if self.running_mean is None and self.running_var is None:
            return
        # The buffer update does not depend on eps; F.batch_norm refuses eps <= 0 in training.
        eps = self.eps if self.eps > 0 else 1e-5
        with torch.no_grad():
            F.batch_norm(
                input.detach(), self.running_mean, self.running_var, None, None, True, factor, eps
            )

    def _ghost_normalize(self, input: Tensor, full: int, tail: int) -> Tensor:
        sizes = [self.ghost_size] * full + ([tail] if tail else [])
        out, _ = normalize_chunks(input, sizes, self.eps, self.weight, self.bias)
        return out


class GhostBatchNorm1d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``[N, C]`` or ``[N, C, L]`` input (like ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class GhostBatchNorm2d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``[N, C, H, W]`` input (like ``nn.BatchNorm2d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class GhostBatchNorm3d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``[N, C, D, H, W]`` input (like ``nn.BatchNorm3d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class SeqNorm(nn.Module):
    """Sequential Normalization: GroupNorm (no affine) followed by Ghost BN (with affine).

    Dimitriou & Arandjelovic (2020), "Sequential Normalization: Embracing Smaller Sample Sizes
    for Normalization". ``gn`` normalizes each sample over ``num_groups`` channel groups and has
    no parameters; ``gbn`` is a :class:`GhostBatchNorm` (any input rank >= 2) holding the affine
    parameters and running statistics, so the state-dict keys are ``gbn.weight``, ``gbn.bias``,
    ``gbn.running_mean``, ``gbn.running_var`` and ``gbn.num_batches_tracked``. Both stages use
    ``eps``. In evaluation the GroupNorm stage still uses per-sample statistics and the BN stage
    its running statistics.
    """

    gn: nn.GroupNorm
    gbn: GhostBatchNorm

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        ghost_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        g = _check_ghost_size(ghost_size)
        if (
            isinstance(num_groups, bool)
            or not isinstance(num_groups, numbers.Integral)
            or num_groups < 1
            or num_features % num_groups
        ):
            raise ValueError(
                f"num_groups must be a positive integer dividing num_features={num_features}, "
                f"got {num_groups!r}"
            )
        self.gn = nn.GroupNorm(int(num_groups), num_features, eps=eps, affine=False)
        self.gbn = GhostBatchNorm(
            num_features,
            g,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor) -> Tensor:
        return self.gbn(self.gn(input))


# --------------------------------------------------------------------------- conversion

_GHOST_FOR: tuple[tuple[type[_BatchNorm], type[GhostBatchNorm]], ...] = (
    (nn.SyncBatchNorm, GhostBatchNorm),
    (nn.BatchNorm3d, GhostBatchNorm3d),
    (nn.BatchNorm2d, GhostBatchNorm2d),
    (nn.BatchNorm1d, GhostBatchNorm1d),
)
_PLAIN_FOR: dict[type[GhostBatchNorm], type[_BatchNorm]] = {
    GhostBatchNorm1d: nn.BatchNorm1d,
    GhostBatchNorm2d: nn.BatchNorm2d,
    GhostBatchNorm3d: nn.BatchNorm3d,
}
_CONFIG = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training")


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very parameter/buffer/child objects and the BN settings of ``src``."""
    dst._parameters = src._parameters.copy()
    dst._buffers = src._buffers.copy()
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst._modules = src._modules.copy()
    for attr in _CONFIG:
        setattr(dst, attr, getattr(src, attr))


def _ghost_class_for(module: nn.Module) -> type[GhostBatchNorm] | None:
    if isinstance(module, GhostBatchNorm):
        return None
    for plain, ghost in _GHOST_FOR:
        if isinstance(module, plain):
            return ghost
    return None


def _to_ghost(module: nn.Module, name: str, ghost_size: int) -> nn.Module:
    if isinstance(module, GhostBatchNorm):
        if _ORIGINAL in module.__dict__:
            module.ghost_size = ghost_size
        return module
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if isinstance(module, _BatchNorm) and has_uninit is not None and has_uninit():
        raise ValueError(
            f"{name or 'root'} ({type(module).__name__}) has uninitialized lazy parameters; "
            "run one forward before convert_to_ghost"
        )
    cls = _ghost_class_for(module)
    if cls is None:
        return module
    allowed = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
    if type(module).forward not in allowed:
        warnings.warn(
            f"{name or 'root'} ({type(module).__name__}) overrides forward; "
            "left as it is by convert_to_ghost",
            stacklevel=3,
        )
        return module
    # a BN class of _GHOST_FOR, whose forward was checked above
    ghost = cls(cast(_BatchNorm, module).num_features, ghost_size, device="meta")
    _move_state(module, ghost)
    ghost.__dict__[_ORIGINAL] = module
    return ghost


def _from_ghost(module: nn.Module) -> nn.Module:
    if not isinstance(module, GhostBatchNorm):
        return module
    original = module.__dict__.get(_ORIGINAL)
    if original is None:
        plain_cls = _PLAIN_FOR.get(type(module))
        if plain_cls is None:  # a generic GhostBatchNorm built directly: no BN class to go to
            return module
        original = plain_cls(module.num_features, device="meta")
    _move_state(module, original)
    return original


def _replace(model: nn.Module, swap, memo: dict[int, nn.Module], prefix: str = "") -> nn.Module:
    if id(model) in memo:
        return memo[id(model)]
    new = swap(model, prefix)
    memo[id(model)] = new
    for name, child in list(new._modules.items()):
        if child is not None:
            full = f"{prefix}.{name}" if prefix else name
            new._modules[name] = _replace(child, swap, memo, full)
    return new


def convert_to_ghost(model: nn.Module, ghost_size: int) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` in ``model`` by Ghost BN.

    Hoffer et al. (2017), "Train longer, generalize better". Works in place on ``model``'s
    children and returns the model; when ``model`` itself is a BatchNorm the returned object
    is the new module, so always use the return value.

    Each replacement is a :class:`GhostBatchNorm1d`/``2d``/``3d`` (a :class:`GhostBatchNorm`
    for ``SyncBatchNorm``) that holds the *same* ``Parameter`` and buffer objects (so an
    existing optimizer keeps working) and the same ``eps``, ``momentum``, ``affine``,
    ``track_running_stats`` and training flag. The replaced module is remembered (outside the
    state dict) so that :func:`revert_ghost` puts that very object back. Forward hooks
    registered on the replaced module do not carry over to the ghost module. Modules shared
    at several places stay shared.

    Left alone: BatchNorm subclasses that override ``forward`` (a warning names them, e.g.
    fused ``BNReLU2d``) and ``GhostBatchNorm`` modules already present; of those, the ones an
    earlier ``convert_to_ghost`` made take the new ``ghost_size``. A ``SyncBatchNorm`` turned
    ghost normalizes and updates its buffers with the local batch only (no cross-process sync).

    Raises :class:`ValueError` for a bad ``ghost_size`` or an uninitialized lazy BatchNorm.
    """
    g = _check_ghost_size(ghost_size)
    return _replace(model, lambda m, name: _to_ghost(m, name, g), {})


def revert_ghost(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_to_ghost`: put back the original BatchNorm modules.

    Each module :func:`convert_to_ghost` made becomes the object it replaced again, now holding
    the ghost module's current parameters, buffers, settings and training flag. A
    ``GhostBatchNorm1d``/``2d``/``3d`` built directly becomes ``nn.BatchNorm1d``/``2d``/``3d``
    with its parameters and buffers; a plain :class:`GhostBatchNorm` built directly (e.g. the
    one inside :class:`SeqNorm`) has no BatchNorm counterpart and is left as it is. Returns the
    model (the root may be replaced, so use the return value).
    """
    return _replace(model, lambda m, name: _from_ghost(m), {})


# Frozen BN (a fixed per-channel affine, Wu & Johnson 2021) and test-time BN adaptation with a
# source prior (Schneider et al. 2020) live in their own modules; imported last, because their
# conversion functions use _move_state, _replace and the GhostBatchNorm classes above.
from .nn_frozen import (  # noqa: E402
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    can_freeze,
    freeze_bn,
    unfreeze_bn,
)
from .nn_prior import (  # noqa: E402
    PriorBatchNorm,
    PriorBatchNorm1d,
    PriorBatchNorm2d,
    PriorBatchNorm3d,
    PriorSyncBatchNorm,
    convert_to_prior_bn,
    revert_prior_bn,
)

# One set of running statistics per domain (Chang et al. 2019; Xie et al. 2020) lives in its own
# module too; its conversion functions use _replace above.
from .nn_split import (  # noqa: E402
    SplitBatchNorm,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    SplitBatchNorm3d,
    convert_to_split_bn,
    load_domain_statistics,
    revert_split_bn,
    set_domain,
    use_domain,
)

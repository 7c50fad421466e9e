"""Test-time BN adaptation with a source prior, as drop-in PyTorch modules.

Schneider, Rusak, Eck, Bringmann, Brendel & Bethge (2020), "Improving robustness against common
corruptions by covariate shift adaptation" (NeurIPS), section 3: at test time each batch is
normalized with its own statistics mixed with the source (training) statistics, the source
counting as a prior of N pseudo samples,

    lambda = N / (N + n),  mu = lambda mu_s + (1 - lambda) mu_b,
    var = lambda var_s + (1 - lambda) var_b,

where mu_b and var_b are the batch's mean and *biased* variance per channel over the batch and
spatial dims (what training-mode BN normalizes with) and n is the number of samples in the batch
(``input.shape[0]``; spatial positions do not count, so the prior weighs the same for any image
size). N = 0 is plain test-batch statistics (the "norm" baseline of TENT and later papers),
N = inf the source model. This is the module to ship; ``bnscope adapt --eval-data`` measures
it (``--online-prior``, ``--online-priors``), docs/statistics.md section 4.2.

Design decisions:

* **The stored statistics are never written.** Eval mode reads ``running_mean``/``running_var``
  and mixes them with each batch's statistics; the buffers, ``num_batches_tracked`` and the
  momentum are left alone, so a converted model's state dict is exactly the source's.
* **Train mode is the wrapped BN**: the forward of ``nn.BatchNorm{1,2,3}d`` (batch statistics,
  EMA updates) or of ``nn.SyncBatchNorm`` (synchronized across processes). A layer without
  running statistics (``track_running_stats=False``) normalizes with batch statistics in eval
  mode too, as BatchNorm does.
* **Test-batch statistics are local**: a converted ``SyncBatchNorm`` mixes its own process's
  batch, never synchronized (each rank predicts on its own batch).
* **Gradients** flow through the batch statistics as in training-mode BN (for entropy
  minimization on top of it); the prior term is a constant.
* **Float16/bfloat16** input is normalized in float32 and cast back.
* **A batch of one value per channel** (``[1, C]`` input) with N = 0 would normalize every value
  to 0: the forward raises :class:`ValueError`, as training-mode BatchNorm does; with N > 0 the
  prior supplies the variance. An empty batch gives an empty output.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "PriorBatchNorm",
    "PriorBatchNorm1d",
    "PriorBatchNorm2d",
    "PriorBatchNorm3d",
    "PriorSyncBatchNorm",
    "convert_to_prior_bn",
    "revert_prior_bn",
    "check_prior",
    "prior_weight",
]

# Attribute (outside the state dict and module tree) holding the module that convert_to_prior_bn
# replaced, so that revert_prior_bn can put that very object back.
_ORIGINAL = "_prior_original"


def check_prior(prior: object) -> float:
    """``prior`` as a float: a real number >= 0 (``math.inf`` allowed), else :class:`ValueError`."""
    if (
        isinstance(prior, bool)
        or not isinstance(prior, numbers.Real)
        or math.isnan(float(prior))
        or float(prior) < 0
    ):
        raise ValueError(
            "prior must be a number >= 0 (pseudo samples of the source statistics; "
            f"0 = test-batch statistics, inf = the source model), got {prior!r}"
        )
    return float(prior)


def prior_weight(prior: float, n: int) -> float:
    """lambda = N / (N + n), the weight of the source statistics: 1 for N = inf, 0 for N = 0
    and n > 0, and 1 when N + n = 0 (no sample and no prior: nothing but the source)."""
    if math.isinf(prior) or prior + n == 0:
        return 1.0
    return prior / (prior + n)


class PriorBatchNorm(_BatchNorm):
    """BatchNorm that, in eval mode, normalizes each batch with its own statistics mixed with
    the running (source) statistics by lambda = N / (N + n) (Schneider et al. 2020, §3).

    ``prior`` is N, in pseudo samples (>= 0, ``math.inf`` allowed); n is the batch's sample
    count ``input.shape[0]``. The running statistics are read, never written, in eval mode;
    train mode is plain BatchNorm. Parameters, buffers and state-dict keys are those of
    ``nn.BatchNorm*d`` (``prior`` is an attribute, not state), so state dicts load either way.
    See the module docstring for the details.

    This class accepts input of any rank >= 2; the ``1d``/``2d``/``3d`` subclasses are also
    instances of the matching BatchNorm class and check the rank as it does.
    """

    def __init__(
        self,
        num_features: int,
        prior: float,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        n_prior = check_prior(prior)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.prior = n_prior

    @property
    def prior(self) -> float:
        """N, the source statistics' weight in pseudo samples (validated on assignment)."""
        return self._prior

    @prior.setter
    def prior(self, value: float) -> None:
        self._prior = check_prior(value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prior={self.prior:g}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        source_mean, source_var = self.running_mean, self.running_var
        n = input.shape[0]
        if self.training or source_mean is None or source_var is None or n == 0:
            return super().forward(input)
        lam = prior_weight(self.prior, n)
        if lam == 1.0:  # N = inf: exactly the source model
            return super().forward(input)
        if lam == 0.0 and input.numel() == input.shape[1]:
            raise ValueError(
                f"prior=0 on input of shape {tuple(input.shape)}: test-batch statistics of one "
                "value per channel; use a prior > 0 or a larger batch"
            )
        work = input if input.dtype in (torch.float32, torch.float64) else input.float()
        dims = [0, *range(2, input.dim())]
        var_b, mean_b = torch.var_mean(work, dim=dims, correction=0)
        mean = lam * source_mean.to(work.dtype) + (1.0 - lam) * mean_b
        var = lam * source_var.to(work.dtype) + (1.0 - lam) * var_b
        # one fused scale-and-shift, as BatchNorm's eval kernel does; unlike F.batch_norm it
        # lets gradients flow into the batch statistics
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(work.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(work.dtype)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = torch.addcmul(shift.view(shape), work, scale.view(shape))
        return out.to(input.dtype)


class PriorBatchNorm1d(PriorBatchNorm, nn.BatchNorm1d):
    """:class:`PriorBatchNorm` for ``[N, C]`` or ``[N, C, L]`` input (an ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        nn.BatchNorm1d._check_input_dim(self, input)


class PriorBatchNorm2d(PriorBatchNorm, nn.BatchNorm2d):
    """:class:`PriorBatchNorm` for ``[N, C, H, W]`` input (an ``nn.BatchNorm2d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        nn.BatchNorm2d._check_input_dim(self, input)


class PriorBatchNorm3d(PriorBatchNorm, nn.BatchNorm3d):
    """:class:`PriorBatchNorm` for ``[N, C, D, H, W]`` input (an ``nn.BatchNorm3d``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        nn.BatchNorm3d._check_input_dim(self, input)


class PriorSyncBatchNorm(PriorBatchNorm, nn.SyncBatchNorm):
    """:class:`PriorBatchNorm` made from ``nn.SyncBatchNorm``: train mode is SyncBatchNorm's
    synchronized forward; eval mode mixes the local batch's statistics with the prior."""

    def __init__(
        self,
        num_features: int,
        prior: float,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, prior, eps, momentum, affine, track_running_stats, device, dtype
        )
        self.process_group = process_group


# --------------------------------------------------------------------------- conversion

_PRIOR_FOR: tuple[tuple[type[_BatchNorm], type[PriorBatchNorm]], ...] = (
    (nn.SyncBatchNorm, PriorSyncBatchNorm),
    (nn.BatchNorm3d, PriorBatchNorm3d),
    (nn.BatchNorm2d, PriorBatchNorm2d),
    (nn.BatchNorm1d, PriorBatchNorm1d),
)
_PLAIN_FOR: dict[type[PriorBatchNorm], type[_BatchNorm]] = {
    PriorSyncBatchNorm: nn.SyncBatchNorm,
    PriorBatchNorm3d: nn.BatchNorm3d,
    PriorBatchNorm2d: nn.BatchNorm2d,
    PriorBatchNorm1d: nn.BatchNorm1d,
}


def _move(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very parameters, buffers, children and BN settings of ``src`` (and a
    SyncBatchNorm's process group)."""
    from .nn import _move_state

    _move_state(src, dst)
    if hasattr(src, "process_group") and isinstance(dst, nn.SyncBatchNorm):
        dst.process_group = src.process_group


def _to_prior(module: nn.Module, name: str, prior: float) -> nn.Module:
    if isinstance(module, PriorBatchNorm):
        if _ORIGINAL in module.__dict__:
            module.prior = prior
        return module
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if isinstance(module, _BatchNorm) and has_uninit is not None and has_uninit():
        raise ValueError(
            f"{name or 'root'} ({type(module).__name__}) has uninitialized lazy parameters; "
            "run one forward before convert_to_prior_bn"
        )
    cls = next((new for plain, new in _PRIOR_FOR if isinstance(module, plain)), None)
    if cls is None:
        return module
    if type(module).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        warnings.warn(
            f"{name or 'root'} ({type(module).__name__}) overrides forward; "
            "left as it is by convert_to_prior_bn",
            stacklevel=3,
        )
        return module
    new = cls(cast(_BatchNorm, module).num_features, prior, device="meta")
    _move(module, new)
    new.__dict__[_ORIGINAL] = module
    return new


def _from_prior(module: nn.Module) -> nn.Module:
    if not isinstance(module, PriorBatchNorm):
        return module
    original = module.__dict__.get(_ORIGINAL)
    if original is None:
        plain_cls = _PLAIN_FOR.get(type(module))
        if plain_cls is None:  # a generic PriorBatchNorm built directly: no BN class to go to
            return module
        original = plain_cls(module.num_features, device="meta")
    _move(module, original)
    return original


def convert_to_prior_bn(model: nn.Module, prior: float) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` in ``model`` by its
    :class:`PriorBatchNorm` counterpart with ``prior`` pseudo samples (Schneider et al. 2020).

    Works in place on ``model``'s children and returns the model; when ``model`` itself is a
    BatchNorm the returned object is the new module, so always use the return value.

    Each replacement (:class:`PriorBatchNorm1d`/``2d``/``3d``, :class:`PriorSyncBatchNorm`)
    holds the *same* ``Parameter`` and buffer objects (an optimizer keeps working, the state
    dict keeps its keys: the converted model loads the original checkpoint and its state dict
    loads into the original model) and the same ``eps``, ``momentum``, ``affine``,
    ``track_running_stats`` and training flag. The replaced module is remembered (outside the
    state dict) so that :func:`revert_prior_bn` puts that very object back. Forward hooks
    registered on the replaced module do not carry over. Modules shared at several places stay
    shared. Only eval mode changes: call ``model.eval()`` to predict with the prior.

    Left alone: BatchNorm subclasses that override ``forward`` (a warning names them, e.g.
    fused ``BNReLU2d``) and ``PriorBatchNorm`` modules already present; of those, the ones an
    earlier ``convert_to_prior_bn`` made take the new ``prior``.

    Raises :class:`ValueError` for a bad ``prior`` or an uninitialized lazy BatchNorm.
    """
    from .nn import _replace

    n_prior = check_prior(prior)
    return _replace(model, lambda m, name: _to_prior(m, name, n_prior), {})


def revert_prior_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_to_prior_bn`: put back plain BatchNorm of the original class.

    Each module :func:`convert_to_prior_bn` made becomes the object it replaced again, holding
    the current parameters, buffers, settings and training flag. A :class:`PriorBatchNorm1d`/
    ``2d``/``3d`` or :class:`PriorSyncBatchNorm` built directly becomes ``nn.BatchNorm1d``/
    ``2d``/``3d`` or ``nn.SyncBatchNorm``; a plain :class:`PriorBatchNorm` built directly has
    no BatchNorm counterpart and is left as it is. Returns the model (the root may be
    replaced, so use the return value).
    """
    from .nn import _replace

    return _replace(model, lambda m, name: _from_prior(m), {})

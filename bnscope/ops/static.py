"""Static inspection: BN findings from buffers alone, with no model code and no data.

BN layers are found from buffer names (``*.running_mean`` with ``*.running_var``, and
optionally ``*.num_batches_tracked``, ``*.weight``, ``*.bias``), so any state dict, safetensors
file or TorchScript archive can be checked. With a live module, momentum and eps come from the
modules; otherwise PyTorch's defaults (momentum 0.1, eps 1e-5) are assumed and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import findings
from ..extras import StaticExtra, StaticReport
from ..records import Finding, Report, StaticLayer, layer_label
from .conventions import tf_momentum

DEFAULT_MOMENTUM = 0.1
DEFAULT_EPS = 1e-5

#: ema-warmup is reported when the EMA still gives its initial value at least this weight.
WARMUP_WEIGHT = 0.01
#: a channel has "tiny variance" when running_var < TINY_VAR_FACTOR * eps (eps then dominates
#: the denominator) or its eval-mode gain |gamma|/sqrt(var+eps) exceeds TINY_GAIN.
TINY_VAR_FACTOR = 10.0
TINY_GAIN = 100.0
#: a channel is "dead" when |gamma| is below this.
DEAD_GAMMA = 1e-5


@dataclass(frozen=True, kw_only=True)
class BNBuffers:
    """The tensors of one BN layer as found in a state dict (names are the layer prefix)."""

    name: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    momentum: float | None = None
    momentum_known: bool = False
    eps: float | None = None
    frozen: bool = False


def find_bn_buffers(state_dict: Mapping[str, Any]) -> list[BNBuffers]:
    """BN layers of a state dict, in the dict's (module) order, found from buffer names."""
    layers: list[BNBuffers] = []
    for key, value in state_dict.items():
        if not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        name = key[: -len("running_mean")].rstrip(".")
        prefix = f"{name}." if name else ""
        var = state_dict.get(prefix + "running_var")
        if not isinstance(value, torch.Tensor) or not isinstance(var, torch.Tensor):
            continue
        if value.ndim != 1 or var.shape != value.shape:
            continue

        def opt(suffix: str, _prefix: str = prefix) -> torch.Tensor | None:
            t = state_dict.get(_prefix + suffix)
            return t if isinstance(t, torch.Tensor) else None

        weight = opt("weight")
        bias = opt("bias")
        if weight is not None and weight.shape != value.shape:
            weight = None
        if bias is not None and bias.shape != value.shape:
            bias = None
        layers.append(
            BNBuffers(
                name=layer_label(name),
                running_mean=value,
                running_var=var,
                num_batches_tracked=opt("num_batches_tracked"),
                weight=weight,
                bias=bias,
            )
        )
    return layers


def module_bn_buffers(model: nn.Module) -> list[BNBuffers]:
    """BN layers of a live module with their real momentum and eps (tracked layers only),
    frozen ones (``FrozenBatchNorm2d``) included and marked. The tensors come back on the
    CPU, read from the model's device in one transfer."""
    from ..engine.capture import is_frozen_batchnorm
    from ..engine.sync import fetch

    found: list[tuple[str, nn.Module, list[torch.Tensor | None]]] = []
    for name, mod in model.named_modules():
        frozen = is_frozen_batchnorm(mod)
        if not (frozen or isinstance(mod, nn.modules.batchnorm._BatchNorm)):
            continue
        tensors = {**mod._parameters, **mod._buffers}
        if tensors.get("running_mean") is None or tensors.get("running_var") is None:
            continue
        names = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
        parts = [tensors.get(n) for n in names]
        found.append((name, mod, [p.detach() if p is not None else None for p in parts]))
    host = iter(fetch([p for _, _, parts in found for p in parts if p is not None]))
    out: list[BNBuffers] = []
    for name, mod, parts in found:
        mean, var, tracked, weight, bias = (next(host) if p is not None else None for p in parts)
        assert mean is not None and var is not None
        frozen = not isinstance(mod, nn.modules.batchnorm._BatchNorm)
        eps = getattr(mod, "eps", None)
        out.append(
            BNBuffers(
                name=layer_label(name),
                running_mean=mean,
                running_var=var,
                num_batches_tracked=tracked,
                weight=weight,
                bias=bias,
                momentum=mod.momentum if isinstance(mod, nn.modules.batchnorm._BatchNorm) else None,
                momentum_known=True,
                eps=float(eps) if isinstance(eps, (int, float)) else None,
                frozen=frozen,
            )
        )
    return out


def _layer_record(buf: BNBuffers, momentum: float | None, eps: float | None) -> StaticLayer:
    if buf.momentum_known:
        m, m_assumed = buf.momentum, False
    elif momentum is not None:
        m, m_assumed = momentum, False
    else:
        m, m_assumed = DEFAULT_MOMENTUM, True
    if buf.eps is not None:
        e, e_assumed = buf.eps, False
    elif eps is not None:
        e, e_assumed = eps, False
    else:
        e, e_assumed = DEFAULT_EPS, True

    mean = buf.running_mean.detach().to(torch.float64).cpu()
    var = buf.running_var.detach().to(torch.float64).cpu()
    n = int(buf.num_batches_tracked.item()) if buf.num_batches_tracked is not None else None
    if n is None:
        init_weight = None
    elif m is None:  # cumulative moving average: the init is gone after the first update
        init_weight = 1.0 if n == 0 else 0.0
    else:
        init_weight = (1.0 - m) ** n

    nonfinite = int((~torch.isfinite(mean)).sum() + (~torch.isfinite(var)).sum())
    negative = int((var < 0).sum())
    gamma = buf.weight.detach().to(torch.float64).cpu() if buf.weight is not None else None
    if gamma is not None:
        nonfinite += int((~torch.isfinite(gamma)).sum())
    if buf.bias is not None:
        nonfinite += int((~torch.isfinite(buf.bias.detach().to(torch.float64))).sum())

    finite_var = torch.where(torch.isfinite(var) & (var >= 0), var, torch.nan)
    gamma_abs = gamma.abs() if gamma is not None else torch.ones_like(var)
    gain = gamma_abs / torch.sqrt(finite_var + e)
    dead = gamma_abs < DEAD_GAMMA if gamma is not None else torch.zeros_like(var, dtype=torch.bool)
    tiny = ((finite_var < TINY_VAR_FACTOR * e) | (gain > TINY_GAIN)) & ~dead

    def rng(t: torch.Tensor) -> tuple[float, float]:
        good = t[torch.isfinite(t)]
        if good.numel() == 0:
            return math.nan, math.nan
        return float(good.min()), float(good.max())

    mean_min, mean_max = rng(mean)
    var_min, var_max = rng(var)
    gain_min, gain_max = rng(gain) if gamma is not None else (None, None)
    return StaticLayer(
        name=buf.name,
        num_features=int(mean.numel()),
        num_batches_tracked=n,
        momentum=m,
        momentum_assumed=m_assumed,
        eps=e,
        eps_assumed=e_assumed,
        ema_init_weight=init_weight,
        affine=gamma is not None,
        mean_min=mean_min,
        mean_max=mean_max,
        var_min=var_min,
        var_max=var_max,
        gain_min=gain_min,
        gain_max=gain_max,
        dead_channels=int(dead.sum()),
        tiny_var_channels=int(tiny.sum()),
        nonfinite_values=nonfinite,
        negative_var_channels=negative,
        frozen=buf.frozen,
    )


def _is_initial(buf: BNBuffers) -> bool:
    mean = buf.running_mean.detach()
    var = buf.running_var.detach()
    return bool(torch.all(mean == 0)) and bool(torch.all(var == 1))


def static_findings(
    layers: list[StaticLayer], buffers: list[BNBuffers], recompute_fix: str
) -> list[Finding]:
    """The static findings (see docs/statistics.md) for the given layer records;
    ``momentum-convention`` only where the momentum is known (model code, or ``momentum=``),
    never for PyTorch's default assumed without it."""
    if not layers:
        return [findings.no_batchnorm()]
    out: list[Finding] = []
    for rec, buf in zip(layers, buffers, strict=True):
        if rec.nonfinite_values or rec.negative_var_channels:
            out.append(
                findings.non_finite(
                    rec.name, rec.nonfinite_values, rec.negative_var_channels, recompute_fix
                )
            )
        n = rec.num_batches_tracked
        if (n is None or n == 0) and _is_initial(buf):
            out.append(findings.never_updated(rec.name, n, recompute_fix))
        elif rec.ema_init_weight is not None and rec.ema_init_weight >= WARMUP_WEIGHT and n:
            out.append(
                findings.ema_warmup(
                    rec.name, n, rec.ema_init_weight, rec.momentum, rec.momentum_assumed,
                    recompute_fix,
                )
            )  # fmt: skip
        if rec.tiny_var_channels:
            out.append(
                findings.tiny_variance(
                    rec.name, rec.tiny_var_channels, rec.num_features, rec.var_min,
                    rec.gain_max, recompute_fix,
                )
            )  # fmt: skip
        if rec.dead_channels:
            out.append(
                findings.dead_channel(rec.name, rec.dead_channels, rec.num_features, DEAD_GAMMA)
            )
        meant = None if rec.momentum_assumed or rec.frozen else tf_momentum(rec.momentum)
        if meant is not None and rec.momentum is not None:
            out.append(findings.momentum_convention(rec.name, rec.momentum, meant, "static"))
    return out


def static_inspect(
    source: Mapping[str, Any] | nn.Module,
    *,
    momentum: float | None = None,
    eps: float | None = None,
    checkpoint: str | None = None,
    recompute_fix: str | None = None,
    extra: StaticExtra | None = None,
) -> StaticReport:
    """Static BN report of a state dict or a module: per-layer records and findings.

    ``momentum`` and ``eps`` override PyTorch's defaults (0.1 and 1e-5) for a state dict; a
    module's own values are always used. ``recompute_fix`` is the command suggested to recompute
    statistics (default: a generic ``bnscope precise`` line).
    """
    if isinstance(source, nn.Module):
        buffers = module_bn_buffers(source)
    else:
        buffers = find_bn_buffers(source)
    layers = [_layer_record(b, momentum, eps) for b in buffers]
    fix = recompute_fix or "recompute the statistics: bnscope precise CKPT --model SPEC --data DATA"
    found = static_findings(layers, buffers, fix)
    info: StaticExtra = {
        "momentum_assumed": any(rec.momentum_assumed for rec in layers),
        "eps_assumed": any(rec.eps_assumed for rec in layers),
    }
    info.update(extra or {})
    return Report(
        command="inspect",
        checkpoint=checkpoint,
        layers=tuple(layers),
        findings=tuple(found),
        extra=info,
    )

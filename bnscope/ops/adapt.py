"""Adaptive BN: BN statistics re-estimated on target-domain data, optionally with a prior.

Li et al. (2016), "Revisiting Batch Normalization For Practical Domain Adaptation" (AdaBN):
replace the source statistics by the target domain's population statistics. Schneider et al.
(2020), "Improving robustness against common corruptions by covariate shift adaptation", §3:
mix them with the source statistics as a prior of N pseudo samples,

    lambda = N / (N + n),  mu = lambda mu_s + (1 - lambda) mu_t,
    var = lambda var_s + (1 - lambda) var_t,

with n the number of target samples used (N = 0: pure target statistics). Target statistics are
pooled over every element of every batch in float64 (never an average of per-batch variances,
never an EMA of the last batches), exactly as Precise BN does.

Partial adaptation (docs/statistics.md, section 4.1): ``only="mean"`` or ``only="var"`` writes
one of the two statistics and keeps the other bit for bit; ``first_layers=K`` adapts the first K
BN layers in module order (the report's ``#``) and keeps the statistics of the rest, which are
still measured (status ``kept``). Robustness studies use both to find where a shift lives.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import findings
from ..engine import sync
from ..engine.capture import LayerStats
from ..engine.collect import Call, Collection, Progress, collect
from ..engine.labels import label_mix
from ..engine.stats import log_var_ratio, normalized_mean_shift
from ..errors import UsageError
from ..extras import AdaptExtra, AdaptReport
from ..records import AdaptLayer, Finding, Report, Status
from .precise import (
    frozen_kept_reason,
    label_findings,
    layer_eps,
    momentum_findings,
    population_stats,
    usage_findings,
    writable,
    write_stats,
)

#: a layer gets a ``domain-shift`` finding when the median over channels of the symmetric KL
#: between source and target Gaussians exceeds this (0.1 ~ a mean shift of 0.32 sigma, or a
#: variance ratio of about 1.6, in every channel).
SHIFT_KL = 0.1


def symmetric_kl(
    mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """KL(N_a || N_b) + KL(N_b || N_a) per channel:
    0.5 * ((var_a + d^2) / var_b + (var_b + d^2) / var_a) - 1 with d = mu_a - mu_b."""
    d2 = (mu_a - mu_b) ** 2
    return 0.5 * ((var_a + d2) / var_b + (var_b + d2) / var_a) - 1.0


def mix_with_prior(
    mu_s: torch.Tensor,
    var_s: torch.Tensor,
    mu_t: torch.Tensor,
    var_t: torch.Tensor,
    prior: float,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Schneider et al. (2020): lambda = N/(N+n); returns (mu, var, lambda)."""
    if prior < 0:
        raise UsageError(f"prior must be >= 0, got {prior}", "e.g. prior=16")
    lam = prior / (prior + n) if prior + n > 0 else 0.0
    return lam * mu_s + (1 - lam) * mu_t, lam * var_s + (1 - lam) * var_t, lam


#: the values of ``only``: which statistic partial adaptation writes
ONLY = ("mean", "var")
#: ``AdaptLayer.adapted`` of a layer that received both statistics
BOTH = "mean+var"


def check_source_prior(prior: object) -> None:
    """``prior=`` of :func:`adapt_bn` (and :func:`~bnscope.ops.domains.adapt_domains`): a
    number of pseudo samples >= 0."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not prior >= 0:
        raise UsageError(f"prior= must be a number >= 0, got {prior!r}", "e.g. prior=16")


def check_only(only: object) -> str | None:
    """``only`` validated: None (both statistics), ``"mean"`` or ``"var"``."""
    if only is None or (isinstance(only, str) and only in ONLY):
        return only
    raise UsageError(
        f"only= must be mean or var (or not given, for both statistics), got {only!r}",
        "e.g. only=mean",
    )


def check_first_layers(first_layers: object) -> int | None:
    """``first_layers`` validated: None (every layer) or an integer >= 1."""
    if first_layers is None:
        return None
    if (
        isinstance(first_layers, bool)
        or not isinstance(first_layers, numbers.Integral)
        or int(first_layers) < 1
    ):
        raise UsageError(
            f"first_layers= must be an integer >= 1 (BN layers in module order), got "
            f"{first_layers!r}",
            "e.g. first_layers=3",
        )
    return int(first_layers)


def check_online_prior(value: object, name: str = "online_prior") -> float:
    """A test-time prior N (:class:`bnscope.nn.PriorBatchNorm`): a number >= 0, ``inf``
    allowed (the source model), as a float; ``name`` is the parameter the error names."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            value = text
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or math.isnan(float(value))
        or float(value) < 0
    ):
        raise UsageError(
            f"{name}= must be a number >= 0 (pseudo samples; 0 = test-batch statistics, inf = "
            f"the source model), got {value!r}",
            f"e.g. {name}=16",
        )
    return float(value)


def parse_priors(priors: str | Iterable[float] | None) -> list[float] | None:
    """Validate the test-time priors of a sweep (a comma-separated string or numbers, ``inf``
    allowed): sorted, unique, each >= 0; None stays None."""
    if priors is None:
        return None
    items: list[Any]
    if isinstance(priors, str):
        items = [p for p in priors.replace(" ", "").split(",") if p]
    else:
        items = list(priors)
    if not items:
        raise UsageError("online_priors= is empty", "e.g. online_priors=0,16,64,256")
    values = []
    for item in items:
        try:
            values.append(check_online_prior(item, "online_priors"))
        except UsageError:
            raise UsageError(
                f"online_priors= must be comma-separated numbers >= 0 (inf allowed), got "
                f"{priors!r}",
                "e.g. online_priors=0,16,64,256",
            ) from None
    return sorted(set(values))


def _shift_records(
    collection: Collection,
    target: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weights: dict[str, float],
    include_frozen: bool = False,
    adapted: dict[str, str] | None = None,
    kept: str | None = None,
) -> tuple[list[AdaptLayer], dict[str, dict[str, Any]]]:
    """Per-layer shift records (module order) and the tensors behind them, computed on the
    buffers' device and read back in one transfer. ``adapted``: what each written layer
    received (default: both statistics of every updated layer); an updated layer missing from
    it gets status ``kept`` with the reason ``kept``."""
    keys = ("source_mean", "source_var", "target_mean", "target_var", "d_mu", "d_var", "kl")
    names = [name for name in collection.layers if name in target]
    parts: list[torch.Tensor] = []
    for name in names:
        layer = collection.layers[name]
        mu_t, var_t = target[name]
        mu_s = layer.running_mean.detach().to(torch.float64)
        var_s = layer.running_var.detach().to(torch.float64)
        eps = layer_eps(layer.module)
        d_mu = normalized_mean_shift(mu_s, mu_t, var_t, eps)
        d_var = log_var_ratio(var_s, var_t, eps)
        kl = symmetric_kl(mu_s, var_s + eps, mu_t, var_t + eps)
        summary = torch.stack(
            [d_mu.max(), d_mu.median(), d_var.max(), d_var.median(), kl.max(), kl.median()]
        )
        parts += [mu_s, var_s, mu_t, var_t, d_mu, d_var, kl, summary]
    host = iter(sync.fetch(parts))
    arrays: dict[str, dict[str, Any]] = {}
    summaries: dict[str, list[float]] = {}
    for name in names:
        arrays[name] = {key: next(host) for key in keys}
        summaries[name] = next(host).tolist()
    records: list[AdaptLayer] = []
    for name, st in collection.layers.items():
        if name not in summaries:
            records.append(
                AdaptLayer(
                    name=name,
                    num_features=st.num_features,
                    status=Status.NOT_CALLED,
                    reason="never ran on the target data; kept",
                )
            )
            continue
        status, reason = _status(st, include_frozen)
        received: str | None = None
        if status == Status.UPDATED:
            received = BOTH if adapted is None else adapted.get(name)
            if received is None:
                status, reason = Status.KEPT, kept
        d_mu_max, d_mu_median, d_var_max, d_var_median, kl_max, kl_median = summaries[name]
        records.append(
            AdaptLayer(
                name=name,
                num_features=st.num_features,
                status=status,
                reason=reason,
                calls=st.calls,
                calls_per_forward=st.max_calls_per_forward,
                samples=st.samples,
                adapted=received,
                weight_source=None if status == Status.KEPT else weights[name],
                d_mu_max=d_mu_max,
                d_mu_median=d_mu_median,
                d_var_max=d_var_max,
                d_var_median=d_var_median,
                kl_max=kl_max,
                kl_median=kl_median,
            )
        )
    for sk in collection.skipped:
        records.append(
            AdaptLayer(
                name=sk.name, num_features=sk.num_features, status=Status.SKIPPED, reason=sk.reason
            )
        )
    return collection.in_module_order(records), arrays


def _status(st: LayerStats, include_frozen: bool) -> tuple[Status, str | None]:
    if not st.frozen:
        return Status.UPDATED, None
    if include_frozen:
        return Status.UPDATED, f"frozen BN ({type(st.module).__name__}): re-estimated"
    return Status.FROZEN, frozen_kept_reason(st.module)


def shift_findings(records: list[AdaptLayer], threshold: float = SHIFT_KL) -> list[Finding]:
    """``domain-shift`` for layers whose median symmetric KL exceeds ``threshold``."""
    return [
        findings.domain_shift(
            rec.name, rec.kl_median, rec.kl_max or 0.0, rec.d_mu_median or 0.0,
            rec.d_var_median or 0.0, rec.status == Status.FROZEN,
        )
        for rec in records
        if rec.kl_median is not None and rec.kl_median > threshold
    ]  # fmt: skip


def adapt_bn(
    model: nn.Module,
    target_data: Iterable[Any],
    prior: float = 0,
    batches: int | None = None,
    *,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    only_training: bool = False,
    shift_threshold: float = SHIFT_KL,
    process_group: Any = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    include_frozen: bool = False,
    only: str | None = None,
    first_layers: int | None = None,
) -> AdaptReport:
    """Re-estimate every BN layer's statistics on ``target_data`` and write them in place.

    Target population statistics (pooled, float64) are mixed with the model's current running
    statistics as a prior of ``prior`` pseudo samples (lambda = N/(N+n), n = target samples the
    layer saw). Returns an ``adapt`` report: per-layer :class:`~bnscope.records.AdaptLayer`
    (where in the network the domain differs), ``domain-shift`` findings for layers whose
    median symmetric KL exceeds ``shift_threshold``, and source/target tensors in ``arrays``.
    The model's modes, momentum and hooks are restored; ``num_batches_tracked`` of an adapted
    layer counts the new statistics (docs/statistics.md, section 3.1: with ``momentum=None``
    the batches they stand for, prior included; otherwise advanced so that (1-m)^T is the
    weight the mixed statistics still give the EMA's initial value, never less). Frozen BN
    layers (``FrozenBatchNorm2d``) are measured and reported with status ``"frozen"``; with
    ``include_frozen=True`` they are adapted too (AdaBN for a frozen detection backbone).

    Partial adaptation (docs/statistics.md, section 4.1): ``only="mean"`` writes only the
    mixed means and ``only="var"`` only the mixed variances, the other statistic and
    ``num_batches_tracked`` staying bit-identical; ``first_layers=K`` adapts the first K BN
    layers in module order (the report's ``#``: every BN layer counts, whatever its status)
    and keeps the rest (status ``kept``, still measured). Each record's ``adapted`` says which
    statistics the layer received; the written ones equal those of full adaptation.

    Under ``torch.distributed`` each rank passes its share of the target data; statistics and
    sample counts are pooled over all ranks (see :func:`~bnscope.engine.collect.collect`;
    ``process_group`` as there), so every rank writes the same statistics.
    """
    check_source_prior(prior)
    only = check_only(only)
    first_layers = check_first_layers(first_layers)
    collection = collect(
        model,
        target_data,
        batches=batches,
        call=call,
        device=device,
        progress=progress,
        only_training=only_training,
        process_group=process_group,
        amp=amp,
        channels_last=channels_last,
        input_key=input_key,
        include_frozen=include_frozen,
    )
    target = population_stats(collection)
    mixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weights: dict[str, float] = {}
    for name, (mu_t, var_t) in target.items():
        st = collection.layers[name]
        mu_s = st.running_mean.detach().to(torch.float64)
        var_s = st.running_var.detach().to(torch.float64)
        mu, var, lam = mix_with_prior(mu_s, var_s, mu_t, var_t, float(prior), st.samples)
        mixed[name] = (mu, var)
        weights[name] = lam
    chosen = writable(collection, mixed, include_frozen)
    kept = None
    if first_layers is not None:
        first = set(collection.order[:first_layers])
        chosen = {k: v for k, v in chosen.items() if k in first}
        kept = f"kept: after the first {first_layers} BN layer{'s' if first_layers > 1 else ''}"
    adapted = dict.fromkeys(chosen, only or BOTH)
    records, arrays = _shift_records(
        collection, target, weights, include_frozen, adapted=adapted, kept=kept
    )
    if only is None:
        write_stats(collection, chosen, weights)
    else:
        _write_one(collection, chosen, only)
    mix = label_mix(collection.labels)
    found = (
        shift_findings(records, shift_threshold)
        + usage_findings(records, "adapt")
        + momentum_findings(collection, "adapt")
        + label_findings(mix)
    )
    extra: AdaptExtra = {
        "batches": collection.batches,
        "samples": collection.samples,
        "label_mix": mix,
        "prior": prior,
        "shift_threshold": shift_threshold,
        "only": only,
        "first_layers": first_layers,
    }
    if collection.world_size > 1:
        extra["world_size"] = collection.world_size
    return Report(
        command="adapt",
        checkpoint=None,
        layers=tuple(records),
        findings=tuple(found),
        extra=extra,
        arrays=arrays,
    )


def _write_one(
    collection: Collection, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], only: str
) -> None:
    """Copy the mixed means (``only="mean"``) or variances (``"var"``) into the BN buffers.
    The other statistic and ``num_batches_tracked`` are not touched: half of the layer's
    statistics are still the EMA's, and the count speaks for both (docs/statistics.md, 4.1)."""
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            st = collection.layers[name]
            if only == "mean":
                st.running_mean.copy_(mean)
            else:
                st.running_var.copy_(var)

"""Precise BN: replace running statistics with the exact population statistics of a fixed model.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §3: the EMA of batch statistics is a
poor estimate of the population statistics of the *final* model; Precise BN recomputes them over
many batches with the model fixed. bnscope pools every element of every call in float64
(:mod:`bnscope.engine.stats`), so the result equals mu = sum(x)/N, var = sum((x - mu)^2)/N over
all the data, independent of the batch split — unlike the average of per-batch variances that
fvcore's ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn`` compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .. import findings
from ..engine import sync
from ..engine.collect import Call, Collection, Progress, collect
from ..engine.labels import label_mix
from ..engine.stats import log_var_ratio, normalized_mean_shift
from ..engine.wrappers import unwrap
from ..extras import LabelMixDict, PreciseExtra, PreciseReport
from ..records import AdaptLayer, Finding, PreciseLayer, Report, Status
from .conventions import tf_momentum

ARRAY_KEYS = ("old_mean", "old_var", "new_mean", "new_var", "d_mu", "d_var")

#: ``non-iid-batches`` (labels, docs/statistics.md section 2.8) is raised when the batches'
#: class mix varies like that of fewer than this fraction of their samples drawn
#: independently (the chi-square ratio above 1 / NON_IID_LABEL_RATIO)...
NON_IID_LABEL_RATIO = 0.5
#: ... and a random shuffle would give such a chi-square with probability below this
NON_IID_LABEL_P = 1e-3


def frozen_kept_reason(module: nn.Module) -> str:
    return (
        f"frozen BN ({type(module).__name__}): measured against the data, statistics kept; "
        "include_frozen=True re-estimates it"
    )


def layer_records(
    collection: Collection,
    new_stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    include_frozen: bool = False,
) -> tuple[list[PreciseLayer], dict[str, dict[str, Any]]]:
    """Per-layer change records (module order) and the old/new tensors behind them (CPU).

    ``new_stats`` must be on the devices of the layers' buffers (:func:`population_stats`).
    Everything is computed on that device and read back in one transfer. Frozen BN layers
    are measured like any layer; unless ``include_frozen`` their status is ``"frozen"``
    (statistics kept)."""
    records: list[PreciseLayer] = []
    names = [name for name in collection.layers if name in new_stats]
    parts: list[torch.Tensor] = []
    for name in names:
        st = collection.layers[name]
        mean, var = new_stats[name]
        old_mean = st.running_mean.detach().to(torch.float64)
        old_var = st.running_var.detach().to(torch.float64)
        eps = layer_eps(st.module)
        d_mu = normalized_mean_shift(old_mean, mean, var, eps)
        d_var = log_var_ratio(old_var, var, eps)
        summary = torch.stack([d_mu.max(), d_mu.median(), d_var.max(), d_var.median()])
        parts += [old_mean, old_var, mean, var, d_mu, d_var, summary]
    host = iter(sync.fetch(parts))
    arrays: dict[str, dict[str, Any]] = {}
    summaries: dict[str, list[float]] = {}
    for name in names:
        arrays[name] = {key: next(host) for key in ARRAY_KEYS}
        summaries[name] = next(host).tolist()
    for name, st in collection.layers.items():
        mod = st.module
        if name in summaries:
            mu_max, mu_med, var_max, var_med = summaries[name]
            status, reason = Status.UPDATED, None
            if st.frozen:
                status, reason = (
                    (Status.UPDATED, f"frozen BN ({type(mod).__name__}): re-estimated")
                    if include_frozen
                    else (Status.FROZEN, frozen_kept_reason(mod))
                )
            rec = PreciseLayer(
                name=name,
                num_features=st.num_features,
                status=status,
                reason=reason,
                calls=st.calls,
                calls_per_forward=st.max_calls_per_forward,
                samples=st.samples,
                elements=st.acc.count,
                d_mu_max=mu_max,
                d_mu_median=mu_med,
                d_var_max=var_max,
                d_var_median=var_med,
            )
        else:
            rec = PreciseLayer(
                name=name,
                num_features=st.num_features,
                status=Status.NOT_CALLED,
                reason="never ran on the data; statistics kept",
            )
        records.append(rec)
    for sk in collection.skipped:
        records.append(
            PreciseLayer(
                name=sk.name, num_features=sk.num_features, status=Status.SKIPPED, reason=sk.reason
            )
        )
    return collection.in_module_order(records), arrays


def usage_findings(
    records: Sequence[PreciseLayer | AdaptLayer], operation: str
) -> list[Finding]:
    """``not-called`` and ``reused`` findings from collection records (``operation``: precise,
    adapt or inspect, whose advice for an unused layer differs)."""
    out: list[Finding] = []
    for rec in records:
        if rec.status == Status.NOT_CALLED:
            out.append(findings.not_called(rec.name, operation))
        elif rec.calls_per_forward > 1:
            out.append(findings.reused(rec.name, rec.calls_per_forward))
    return out


def momentum_findings(collection: Collection, operation: str) -> list[Finding]:
    """``momentum-convention`` for every collected, non-frozen BN layer (module order) whose
    ``momentum`` looks like TF/Keras's (:func:`bnscope.ops.conventions.tf_momentum`,
    docs/statistics.md section 11.1); ``operation`` (precise or adapt) words the fix. Read
    after the collection, which restored every module's momentum."""
    out: list[Finding] = []
    for name in collection.order:
        st = collection.layers.get(name)
        if st is None or st.frozen or not isinstance(st.module, nn.modules.batchnorm._BatchNorm):
            continue
        momentum = st.module.momentum
        meant = tf_momentum(momentum)
        if meant is not None and momentum is not None:
            out.append(findings.momentum_convention(name, momentum, meant, operation))
    return out


def label_findings(mix: LabelMixDict | None) -> list[Finding]:
    """``non-iid-batches`` when the labelled batches' class mix is far from random batches':
    effective size below :data:`NON_IID_LABEL_RATIO` of the batch size, with a chi-square
    p-value below :data:`NON_IID_LABEL_P` (docs/statistics.md, section 2.8). Nothing without
    labels, with one batch or with one class."""
    if mix is None or mix["ratio"] is None or mix["p_value"] is None:
        return []
    effective = mix["effective_size"]
    if effective is None or effective >= NON_IID_LABEL_RATIO * mix["mean_batch_size"]:
        return []
    if mix["p_value"] >= NON_IID_LABEL_P:
        return []
    return [
        findings.non_iid_labels(
            mix["mean_batch_size"], effective, mix["batches"], mix["classes"],
            mix["single_class_batches"], mix["p_value"],
        )
    ]  # fmt: skip


def layer_eps(module: nn.Module) -> float:
    """The layer's eps (1e-5, PyTorch's default, for a frozen layer without one)."""
    eps = getattr(module, "eps", None)
    return float(eps) if isinstance(eps, (int, float)) else 1e-5


def writable(
    collection: Collection,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    include_frozen: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The statistics to write: frozen BN layers only when ``include_frozen``."""
    return {k: v for k, v in stats.items() if include_frozen or not collection.layers[k].frozen}


def population_stats(collection: Collection) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 (mean, biased var) per layer that ran at least once, on the device of the
    layer's buffers (one copy for all layers when the run used another device)."""
    called = [(name, st) for name, st in collection.layers.items() if st.called]
    tensors = [t for _, st in called for t in (st.acc.population_mean, st.acc.population_var)]
    devices = [st.running_mean.device for _, st in called for _ in range(2)]
    moved = sync.to_devices(tensors, devices)
    return {name: (moved[2 * i], moved[2 * i + 1]) for i, (name, _) in enumerate(called)}


#: the weight below which an EMA's initial value counts as gone when bnscope recomputed the
#: statistics: float64's unit roundoff (docs/statistics.md, section 3.1)
INIT_WEIGHT_GONE = 2.0**-53
INT64_MAX = 2**63 - 1


def tracked_advance(momentum: float | None, source_weight: float) -> int:
    """How many EMA updates to add to ``num_batches_tracked`` of a layer with ``momentum``
    whose new statistics weigh its old ones by ``source_weight`` (lambda; 0 for Precise BN),
    so that the EMA's weight on its initial value, (1-m)^T, stays exact
    (docs/statistics.md, section 3.1).

    The old statistics gave the initial value the weight (1-m)^T; the new ones give it
    lambda * (1-m)^T. With lambda = 0 that is nothing: advance by the smallest j with
    (1-m)^j <= :data:`INIT_WEIGHT_GONE`. With lambda > 0: by the largest j with
    (1-m)^j >= lambda, so that the weight T + j implies is never below the true one. A
    momentum of 0 (an EMA that never moves) or outside (0, 1] gives 0: no T expresses it.
    ``momentum=None`` layers are counted by :func:`cumulative_tracked` instead."""
    if momentum is None or not 0 < momentum <= 1 or not 0 <= source_weight < 1:
        return 0
    if momentum == 1:  # the EMA is the last batch: one update erases the initial value
        return 1 if source_weight == 0 else 0
    keep = 1.0 - momentum
    step = math.log1p(-momentum)  # log(1 - m) < 0
    target = source_weight or INIT_WEIGHT_GONE
    j = math.log(target) / step
    if keep == 1.0:  # 1 - m rounds to 1, and so does (1 - m)^T for every T
        return INT64_MAX if source_weight == 0 else 0
    if j >= INT64_MAX:
        return INT64_MAX
    if source_weight == 0:  # the smallest j with keep^j <= U, the logarithms' rounding fixed
        j = math.ceil(j)
        while j > 0 and keep ** (j - 1) <= target:
            j -= 1
        while keep**j > target:
            j += 1
    else:  # the largest j with keep^j >= lambda
        j = max(math.floor(j), 0)
        while j > 0 and keep**j < target:
            j -= 1
        while keep ** (j + 1) >= target:
            j += 1
    return min(j, INT64_MAX)


def cumulative_tracked(calls: int, source_weight: float) -> int:
    """``num_batches_tracked`` of a ``momentum=None`` layer (a cumulative average with factor
    1/T) whose new statistics stand for ``calls`` batches plus, with a prior weighing
    ``source_weight`` (lambda = N / (N + n)), N pseudo samples: T = round(calls / (1 - lambda)),
    so further training continues the average with the weight of one more batch
    (docs/statistics.md, section 3.1)."""
    if calls <= 0 or not 0 <= source_weight < 1:
        return 0
    return min(max(1, round(calls / (1.0 - source_weight))), INT64_MAX)


def write_stats(
    model_layers: Collection,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    source_weights: dict[str, float] | None = None,
) -> None:
    """Copy new statistics into the BN buffers (cast to their dtype and device) and count
    them in ``num_batches_tracked`` where the layer has one: a ``momentum=None`` layer gets
    :func:`cumulative_tracked`, any other is advanced by :func:`tracked_advance`
    (``source_weights``: lambda per layer, 0 when absent). Nothing else changes; nothing is
    read from the device."""
    weights = source_weights or {}
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            st = model_layers.layers[name]
            st.running_mean.copy_(mean)
            st.running_var.copy_(var)
            tracked = st.module._buffers.get("num_batches_tracked")
            if tracked is None or not isinstance(st.module, nn.modules.batchnorm._BatchNorm):
                continue
            lam = weights.get(name, 0.0)
            momentum = st.module.momentum
            if momentum is None:
                tracked.fill_(cumulative_tracked(st.calls, lam))
            else:
                step = tracked_advance(momentum, lam)
                if step:  # saturating add: T + step, at most INT64_MAX
                    tracked.clamp_(max=INT64_MAX - step).add_(step)


def precise_bn(
    model: nn.Module,
    data: Iterable[Any],
    batches: int | None = None,
    *,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    only_training: bool = False,
    process_group: Any = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    include_frozen: bool = False,
) -> PreciseReport:
    """Recompute every BN layer's running statistics exactly and write them in place.

    Population statistics over ``batches`` batches (all of ``data`` when None) with the model
    fixed and BN normalizing with batch statistics. Frozen BN layers (``FrozenBatchNorm2d``:
    no batch-statistics mode) are measured and reported with status ``"frozen"``; with
    ``include_frozen=True`` they normalize with batch statistics during collection, like the
    others, and get population statistics written too. Layers that never ran keep their
    statistics (``not-called``); ``track_running_stats=False`` layers are skipped; with
    ``only_training=True`` so are layers in eval mode. Every module's mode, momentum and hooks
    are as before. ``num_batches_tracked`` of an updated layer counts the new statistics
    (docs/statistics.md, section 3.1): with ``momentum=None`` it becomes the number of calls
    the cumulative average now stands for; otherwise it advances until the EMA's weight on its
    initial value, (1-m)^T, is below 2^-53 (the statistics no longer hold any of it), so
    ``ema-warmup`` does not report recomputed statistics. Returns a ``precise`` report: per-layer
    :class:`~bnscope.records.PreciseLayer` records (old vs new), with the old and new tensors in
    ``report.arrays``.

    Under ``torch.distributed`` each rank passes its share of the data (``batches`` per rank):
    float64 sufficient statistics are all-reduced once at the end, so every rank writes the
    same, exact population statistics of the union (``process_group``: see
    :func:`~bnscope.engine.collect.collect`).

    ``model`` may be wrapped for training: ``DistributedDataParallel``, ``DataParallel``,
    ``torch.compile``, ``torch.optim.swa_utils.AveragedModel`` or an EMA copy such as timm's
    ``ModelEmaV3``. The network inside is run and updated (:func:`~bnscope.engine.wrappers.unwrap`;
    layers are named as in its own state dict); the wrapper's state (``n_averaged``) is left
    alone. For an averaged model this is what ``swa_utils.update_bn`` is for: statistics of the
    averaged weights, here exact population statistics.
    """
    model = unwrap(model)
    collection = collect(
        model,
        data,
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
    stats = population_stats(collection)
    records, arrays = layer_records(collection, stats, include_frozen)
    write_stats(collection, writable(collection, stats, include_frozen))
    mix = label_mix(collection.labels)
    found = (
        usage_findings(records, "precise")
        + momentum_findings(collection, "precise")
        + label_findings(mix)
    )
    extra: PreciseExtra = {
        "batches": collection.batches,
        "samples": collection.samples,
        "label_mix": mix,
    }
    if collection.world_size > 1:
        extra["world_size"] = collection.world_size
    return Report(
        command="precise",
        checkpoint=None,
        layers=tuple(records),
        findings=tuple(found),
        extra=extra,
        arrays=arrays,
    )

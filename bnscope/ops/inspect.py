"""Dynamic inspection: why is the model worse in eval() than in train()?

With the model and its training data, :func:`inspect` measures, per BN layer, how far the
running statistics (an EMA) are from the population statistics of the model as it is, and
whether that gap is more than the EMA's own noise; how much batch statistics scatter at the
data's batch size; whether outputs with batch statistics and with running statistics disagree
(the train/test gap); and how the layers are used (not called, reused).

Staleness (docs/statistics.md, section 5). Per channel, with sigma = sqrt(var_pop + eps):
d_mu = |mu_EMA - mu_pop| / sigma and d_var = |log((var_EMA + eps) / (var_pop + eps))|. An EMA
mu <- (1-m) mu + m mu_B of an unchanging model fed i.i.d. batches is itself a random variable:
in the stationary state Var(mu_EMA) = m / (2 - m) Var(mu_B) (a geometric sum of independent
batch means with weights m (1-m)^k), and with ``momentum=None`` (cumulative average over T
batches) Var(mu_B) / T. The z-score z = (mu_EMA - mu_pop) / sqrt(that variance) is about
N(0, 1) per channel when the EMA is merely noisy; its root mean square over channels well above
1 means the EMA describes another model than this one: the weights kept changing while it
averaged (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3), the EMA never warmed up,
or it was estimated on other data. The variance z-score compares running_var with the mean of
the unbiased batch variances (what an EMA of them converges to, below var_pop by the spread of
batch means) in units of sqrt(m / (2 - m) Var(var_B)).

Passes (docs/statistics.md, section 6.1). The data is read twice, and every forward runs the
model passed in, not a copy of it (:func:`bnscope.engine.runner.placed` moves it to ``device``
for the run when needed and gives every parameter and buffer slot its own tensor back):

1. Collection (the Precise BN engine, :func:`bnscope.engine.collect.collect`): BN layers
   normalize with batch statistics, everything else is in eval mode, and the engine reads each
   call's batch moments without writing the model's buffers. This forward *is* the
   batch-statistics variant: its outputs are kept with a fingerprint of each batch, up to
   :data:`PAIR_BUDGET` bytes (:class:`_Pairing`).
2. Comparison, every module in eval mode, per batch: one forward with the running statistics,
   then one with the population ("precise") statistics, which
   :func:`bnscope.engine.evaluate.using_statistics` puts into the non-frozen BN layers'
   ``running_mean``/``running_var`` buffer slots for that forward only (the layers' own
   tensors are put back, untouched, afterwards). The batch-statistics output is the kept one
   when the fingerprints match; otherwise one more forward under
   :func:`bnscope.engine.evaluate.batch_stats_mode` (BN layers in training mode on clones of
   their buffers, so their EMA update never reaches the model's tensors).
3. Only when the data came back in another order than in pass 1: the running- and
   batch-statistics forwards again, paired batch by batch.

So 3 forwards per batch when the order repeats and the output was kept; otherwise 4, or 5
when the order changes only after the first batch (``extra["forwards"]`` counts them). One
more per batch in pass 2 when eps matters for this model (the conversion checks,
:mod:`bnscope.ops.conventions`): the running statistics with every BN layer's eps of the other
framework's convention (:func:`bnscope.engine.evaluate.using_eps`), to see which fits.
Every module's mode, every parameter and every buffer of the model are as before on return,
also when a forward raises.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from statistics import median
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import findings
from ..engine import sync
from ..engine.capture import is_batchnorm, is_frozen_batchnorm
from ..engine.collect import (
    Call,
    Collection,
    Progress,
    check_batches,
    collect,
    expected_batches,
)
from ..engine.evaluate import (
    Evaluation,
    Scores,
    batch_kind,
    batch_stats_mode,
    check_label_range,
    eval_mode,
    forward_errors,
    labelled_batches,
    logits_of,
    read_scores,
    relative_difference,
    using_eps,
    using_statistics,
)
from ..engine.labels import label_mix
from ..engine.packed import Packed
from ..engine.runner import make_runner, placed
from ..engine.stats import MomentAccumulator
from ..errors import DataError
from ..extras import (
    EpsCheckDict,
    InspectExtra,
    InspectReport,
    InspectVerdict,
    StaticReport,
    VariantMetrics,
)
from ..records import Finding, InspectLayer, PreciseLayer, Report, Status
from .conventions import (
    eps_outcome,
    eps_sensitive,
    fit_var_convention,
    gain_ratio,
    other_eps,
    tf_momentum,
)
from .precise import (
    label_findings,
    layer_eps,
    layer_records,
    population_stats,
    usage_findings,
)
from .static import static_inspect

F64 = torch.float64

#: a layer's gap is "material" when the median over channels of d_mu or d_var exceeds this
MATERIAL_GAP = 0.05
#: ... and "stale" when, in addition, the RMS z-score against EMA noise exceeds this
STALE_Z = 3.0
#: train-test-gap when top-1 agreement between batch-statistics and running-statistics
#: outputs falls below this, or accuracy differs by more than TRAIN_TEST_ACCURACY
TRAIN_TEST_AGREEMENT = 0.95
TRAIN_TEST_ACCURACY = 0.02
#: per layer, how many batch means are kept for the distribution figure
TRACE_BATCHES = 256
#: channels per layer whose batch means are kept (the most stale ones, chosen afterwards)
TRACE_CHANNELS = 4
#: bytes of collection-forward outputs kept for pairing with the second pass (per process):
#: outputs and fingerprints, packed (:class:`bnscope.engine.packed.Packed`)
PAIR_BUDGET = 1 << 30


@dataclass
class _Spread:
    """Spread of per-call batch statistics of one layer (float64, on the layer's device), plus
    the first :data:`TRACE_BATCHES` batch means for the figure. Fed by the collection pass:
    the rows the engine records are the batch means and variances of each call."""

    means: MomentAccumulator
    uvars: MomentAccumulator
    trace: list[torch.Tensor] = field(default_factory=list)
    traced: int = 0

    def add_rows(self, means: torch.Tensor, variances: torch.Tensor, n: int) -> None:
        """Rows of batch means and biased variances ([r, C], float64): their spread across
        calls, each call one observation (the unbiased variance n/(n-1) var_B for the
        variances)."""
        unbiased = variances * (n / (n - 1)) if n > 1 else variances
        zero = torch.zeros_like(means)
        self.means.add_rows(means, zero, 1)
        self.uvars.add_rows(unbiased, zero, 1)
        if self.traced < TRACE_BATCHES:
            keep = means[: TRACE_BATCHES - self.traced].float().clone()
            self.trace.append(keep)
            self.traced += keep.shape[0]


class _Pairing:
    """The outputs of the collection forward (BN with batch statistics, everything else in
    eval mode: exactly the "batch statistics" variant) kept for the second pass, so that pass
    needs only the running- and population-statistics forwards. Each kept batch carries a
    fingerprint of its inputs (per-sample float64 sums); the second pass pairs batch i with
    kept output i only while the fingerprints agree: the first pair is checked at once (a data
    order that is not repeated turns pairing off), the others on the device, folded into one
    flag that is read at the end (a mismatch there makes :func:`inspect` recompute the
    comparison in a third pass). Outputs and fingerprints are packed into a few large tensors
    (:class:`~bnscope.engine.packed.Packed`: no tensor per batch, no heap fragmentation), up to
    :data:`PAIR_BUDGET` bytes; later batches, and batches whose outputs differ in dtype, device
    or classes from the first, get their own forward. What the second pass has used is let go
    as it goes, and everything when pairing turns off."""

    def __init__(self) -> None:
        self.outputs = Packed()
        self.prints = Packed()
        self.full = False
        self.enabled = True
        self.mismatch: torch.Tensor | None = None  # any later pair differed (device bool)
        self.host_mismatch = False

    @property
    def kept(self) -> int:
        return len(self.outputs)

    def keep(self, index: int, batch: Any, logits: torch.Tensor) -> None:
        if self.full or index != len(self.outputs):
            self.full = True
            return
        prints = _fingerprint(batch)
        size = (
            logits.shape[0] * self.outputs.row_bytes(logits)
            + prints.shape[0] * self.prints.row_bytes(prints)
        )
        if (
            self.outputs.nbytes + self.prints.nbytes + size > PAIR_BUDGET
            or not self.outputs.matches(logits)
            or not self.prints.matches(prints)
        ):
            self.full = True
            return
        self.outputs.append(logits)
        self.prints.append(prints)

    def _disable(self) -> None:
        self.enabled = False
        self.outputs.release_all()  # nothing kept is used any more
        self.prints.release_all()

    def stored(self, index: int, batch: Any) -> torch.Tensor | None:
        """The kept batch-statistics output for the second pass's batch ``index``, or None
        (not kept, or pairing is off). Batches come in order: what comes before is let go."""
        if not self.enabled or index >= len(self.outputs):
            return None
        kept, then = self.outputs.get(index), self.prints.get(index)
        if kept is None or then is None:
            return None
        now = _fingerprint(batch)
        if now.shape != then.shape:
            if index == 0:
                self._disable()
                return None
            self.host_mismatch = True
        else:
            same = (now == then).all()
            if index == 0:  # the one read that decides whether pairing is on
                if not sync.fetch_values([same])[0]:
                    self._disable()
                    return None
            elif self.mismatch is None:
                self.mismatch = ~same
            else:
                self.mismatch |= ~same
        self.outputs.release_through(index)  # used once: let it go (kept stays valid)
        self.prints.release_through(index)
        return kept

    def all_matched(self) -> bool:
        """Whether every paired batch had the same inputs (one read)."""
        if self.host_mismatch:
            return False
        if self.mismatch is None:
            return True
        return not bool(sync.fetch([self.mismatch])[0])


def _fingerprint(batch: Any) -> torch.Tensor:
    """Per-sample float64 sums of every tensor in the batch (inputs and labels), one vector."""
    parts = []
    for t in _tensors(batch):
        if t.ndim == 0:
            parts.append(t.detach().reshape(1).to(F64))
        else:
            parts.append(t.detach().reshape(t.shape[0], -1).sum(1, dtype=F64))
    if not parts:
        return torch.zeros(0, dtype=F64)
    return torch.cat([p.to(parts[0].device) for p in parts])


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _z_rms(gap: torch.Tensor, noise_var: torch.Tensor, scale: torch.Tensor) -> float | None:
    """sqrt(mean_c z_c^2) with z_c = gap_c / sqrt(noise_var_c); channels whose noise is zero
    relative to ``scale`` (a single batch, constant channels) are left out."""
    ok = noise_var > 1e-12 * scale
    if not bool(ok.any()):
        return None
    z2 = gap[ok] ** 2 / noise_var[ok]
    return float(z2.mean().sqrt())


def _spread_arrays(collection: Any, spreads: dict[str, _Spread]) -> dict[str, dict[str, Any]]:
    """Every layer's spread figures, trace and ``num_batches_tracked`` on the host, read in
    one transfer."""
    keys = ("var_mu_b", "mean_uvar", "var_uvar", "trace", "tracked")
    parts: list[torch.Tensor] = []
    names = [name for name, sp in spreads.items() if sp.means.count]
    for name in names:
        sp = spreads[name]
        mod = collection.layers[name].module
        tracked = mod._buffers.get("num_batches_tracked")
        parts += [
            sp.means.population_var,
            sp.uvars.population_mean,
            sp.uvars.population_var,
            torch.cat(sp.trace) if sp.trace else sp.means.mean.new_zeros(0, sp.means.num_features),
            (tracked if tracked is not None else torch.zeros((), dtype=torch.long)).reshape(1),
        ]
    host = iter(sync.fetch(parts))
    return {name: {key: next(host) for key in keys} for name in names}


def _ema_factor(module: _BatchNorm, tracked: torch.Tensor | None) -> float | None:
    """m / (2 - m) for an EMA with momentum m; 1/T for a cumulative average over T batches
    (``tracked``: the layer's ``num_batches_tracked`` on the host)."""
    if module.momentum is None:
        t = int(tracked[0]) if tracked is not None and module.num_batches_tracked is not None else 0
        return 1.0 / t if t > 0 else None
    m = float(module.momentum)
    return m / (2 - m) if 0 < m <= 1 else None


def _median(t: torch.Tensor) -> float:
    return float(t.median())


@dataclass
class _EpsPlan:
    """The cheap part of the eps check (docs/statistics.md, section 11.3): every BN layer's
    eps of the other convention (``swap``), and from the population variances of the layers
    that ran, in how many layers and channels it matters. Only when it matters does
    :func:`inspect` run the model once more per batch, with ``swap`` in place."""

    swap: dict[nn.Module, float]
    eps: float | None
    layers: int = 0
    channels: int = 0
    max_gain_ratio: float | None = None

    @property
    def matters(self) -> bool:
        return self.layers > 0

    def to_dict(self, variant: VariantMetrics | None) -> EpsCheckDict:
        return {
            "eps": self.eps,
            "other_eps": None if self.eps is None else other_eps(self.eps),
            "layers": self.layers,
            "channels": self.channels,
            "max_gain_ratio": self.max_gain_ratio,
            "evaluated": variant is not None,
            "variant": variant,
        }


def _eps_plan(
    model: nn.Module, collection: Collection, arrays: dict[str, dict[str, Any]]
) -> _EpsPlan:
    """Which eps each BN layer of ``model`` (frozen ones included) would have in the other
    convention, and where that matters: per layer that ran, the eval-mode gain change of each
    channel from its population variance (``arrays``: :func:`layer_records`' host tensors)."""
    swap: dict[nn.Module, float] = {}
    own: list[float] = []
    for module in model.modules():
        if not (is_batchnorm(module) or is_frozen_batchnorm(module)):
            continue
        eps = getattr(module, "eps", None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            swap[module] = other_eps(float(eps))
            own.append(float(eps))
    plan = _EpsPlan(swap=swap, eps=Counter(own).most_common(1)[0][0] if own else None)
    ratios: list[float] = []
    for name, arr in arrays.items():
        module = collection.layers[name].module
        if module not in swap:
            continue
        ratio = gain_ratio(arr["new_var"].numpy(), layer_eps(module), swap[module])
        matters, hit = eps_sensitive(ratio)
        if matters:
            plan.layers += 1
            plan.channels += hit
        finite = ratio[np.isfinite(ratio)]
        if finite.size:
            ratios.append(float(finite.max()))
    plan.max_gain_ratio = max(ratios) if ratios else None
    return plan


def _variant(scores: Scores, samples: int, labelled: bool, classes: bool) -> VariantMetrics:
    """The metrics of one more variant against the reference (after :func:`read_scores`)."""
    m = scores.metrics(samples, labelled)
    return {
        "accuracy": m.accuracy,
        "loss": m.loss,
        "agreement": scores.value("agree") / samples if classes and samples else None,
        "kl": scores.value("kl") / samples if classes and samples else None,
        "rel_diff": relative_difference(scores.value("diff2"), scores.value("ref2")),
    }


def inspect(
    model: nn.Module,
    data: Iterable[Any],
    batches: int | None = None,
    *,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    process_group: Any = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    num_classes: int | None = None,
) -> InspectReport:
    """Dynamic report: EMA staleness, batch-statistics spread, train/test inconsistency, usage.

    ``data`` is the training data (what the running statistics should describe); it is read
    twice, so it must be re-iterable. The model is not changed. Returns an ``inspect`` report:
    :class:`~bnscope.records.InspectLayer` records in module order, findings (``stale-ema``,
    ``train-test-gap``, ``small-nbs`` for noisy EMAs, ``not-called``, ``reused``, the
    conversion checks ``momentum-convention``, ``var-convention`` and ``eps-mismatch``
    (docs/statistics.md, section 11) and the static ones: ``ema-warmup``, ``never-updated``,
    ``tiny-variance``, ``dead-channel``, ``non-finite``), ``extra["metrics"]`` with the
    variants running, precise and batch statistics on the same batches (reference: running)
    and ``extra["eps_check"]``. ``device``, ``amp`` and ``channels_last`` as in
    :func:`bnscope.precise_bn`.

    Forwards per batch: 3 when the data comes back in the same order (the collection forward
    is the batch-statistics forward; the second pass adds running and population statistics,
    paired with it by a fingerprint of each batch), 4 otherwise; one more where eps matters
    (the running statistics with the other convention's eps). ``extra["forwards"]`` says how
    many were run in all.

    Labels, where batches carry them, must be class indices of the outputs (a
    :class:`~bnscope.errors.DataError` otherwise, once the sums are read); ``num_classes`` as
    in :func:`bnscope.engine.evaluate.batch_kind`.
    """
    from ..engine import distributed

    check_batches(batches)
    group = distributed.resolve_group(process_group)
    if iter(data) is data:
        from ..errors import UsageError

        raise UsageError(
            "dynamic inspection reads the data twice, but it is a one-shot iterator",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    runner = make_runner(model, call, device, amp, channels_last, input_key)
    passes = expected_batches(data, batches)  # the data is read twice
    total = None if passes is None else 2 * passes

    first_done = [0]  # this rank's batches of the first pass (collection.batches is pooled)

    def first(done: int, _: int | None) -> None:
        first_done[0] = done
        if progress is not None:
            progress(done, total)

    static = static_inspect(model)
    spreads: dict[str, _Spread] = {}

    def observe(name: str, means: torch.Tensor, variances: torch.Tensor, n: int) -> None:
        sp = spreads.get(name)
        if sp is None:
            c = means.shape[1]
            sp = spreads[name] = _Spread(
                MomentAccumulator(c, means.device), MomentAccumulator(c, means.device)
            )
        sp.add_rows(means, variances, n)

    pairing = _Pairing()
    batch_scores = Scores()  # the batch-statistics outputs against the labels (first pass)
    first_pass = {"labelled": True}

    def keep_output(index: int, batch: Any, out: Any) -> None:
        logits = logits_of(out)
        labels = runner.labels(batch)
        _, is_cls, ok_labels = batch_kind(logits, labels, num_classes)
        first_pass["labelled"] = first_pass["labelled"] and ok_labels
        batch_scores.add(logits, labels=labels if ok_labels else None)
        if is_cls:
            pairing.keep(index, batch, logits)

    forwards = 0
    with placed(model, runner):
        collection = collect(
            model, data, batches=batches, call=runner.call, device=runner.device,
            progress=first, process_group=process_group, amp=runner.amp,
            channels_last=runner.channels_last, observer=observe, on_output=keep_output,
            input_key=input_key,
        )  # fmt: skip
        pop = population_stats(collection)
        # every layer that ran (on any rank) has a spread, in module order: ranks pool them
        # with one collective over the same list
        spreads = {
            name: spreads.get(name)
            or _Spread(
                MomentAccumulator(st.num_features, st.acc.mean.device),
                MomentAccumulator(st.num_features, st.acc.mean.device),
            )
            for name, st in collection.layers.items()
            if name in pop
        }
        precise_records, precise_arrays = layer_records(collection, pop)
        precise_buffers = {
            collection.layers[name].module: (
                mean.to(collection.layers[name].running_mean.dtype),
                var.to(collection.layers[name].running_var.dtype),
            )
            for name, (mean, var) in pop.items()
            if not collection.layers[name].frozen  # bnscope precise keeps frozen statistics
        }
        eps_plan = _eps_plan(model, collection, precise_arrays)
        swap_eps = eps_plan.swap if eps_plan.matters else {}
        scores = {k: Scores() for k in ("running", "precise", "paired", "direct", "eps")}
        samples = done = 0
        labelled = classes = True
        with (
            distributed.failures_announced(group),
            distributed.local_batchnorm(model),  # batch statistics of this rank's batch
            eval_mode(model),
            torch.no_grad(),
        ):
            for batch, labels in labelled_batches(data, batches, runner):
                with forward_errors(
                    f"the model failed on batch {done} of the comparison pass",
                    "check that data= fits the model; batches need 2+ samples",
                ):
                    ref = logits_of(runner(model, batch))
                    with using_statistics(precise_buffers):
                        pre = logits_of(runner(model, batch))
                    forwards += 2
                    alt = None
                    if swap_eps:  # eps matters: running statistics with the other eps
                        with using_eps(swap_eps):
                            alt = logits_of(runner(model, batch))
                        forwards += 1
                    n, is_cls, ok_labels = batch_kind(ref, labels, num_classes)
                    kept = pairing.stored(done, batch) if is_cls else None
                    if kept is None:
                        with batch_stats_mode(model):
                            bat = logits_of(runner(model, batch))
                        forwards += 1
                        scores["direct"].add(bat, ref=ref)
                    else:
                        scores["paired"].add(kept, ref=ref)
                samples += n
                classes = classes and is_cls
                labelled = labelled and ok_labels
                use = labels if ok_labels else None
                scores["running"].add(ref, labels=use)
                scores["precise"].add(pre, labels=use, ref=ref)
                if alt is not None:
                    scores["eps"].add(alt, labels=use, ref=ref)
                done += 1
                if progress is not None:
                    progress(first_done[0] + done, total)
            if pairing.kept and not pairing.all_matched():
                # the data came back in another order: compare in a third pass, on pairs
                scores["paired"], scores["direct"] = Scores(), Scores()
                for index, (batch, _) in enumerate(labelled_batches(data, batches, runner)):
                    with forward_errors(
                        f"the model failed on batch {index} of the comparison pass",
                        "check that data= fits the model; batches need 2+ samples",
                    ):
                        ref = logits_of(runner(model, batch))
                        with batch_stats_mode(model):
                            bat = logits_of(runner(model, batch))
                    forwards += 2
                    scores["direct"].add(bat, ref=ref)
    if group is not None:
        samples, labelled, classes, forwards = _reduce_pass(
            group, spreads, scores, batch_scores, samples, labelled, classes, forwards
        )
    if samples == 0:
        raise DataError(
            "the data yielded no batches on its second reading",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    forwards += collection.batches  # the collection pass (already pooled over ranks)
    read_scores([*scores.values(), batch_scores])
    check_label_range(batch_scores)
    check_label_range(scores["running"])
    # the batch-statistics outputs were compared with running-statistics outputs in pairs
    # (kept outputs) or directly (one more forward): their sums add up
    batch_sums = {
        key: scores["paired"].value(key) + scores["direct"].value(key)
        for key in ("agree", "kl", "diff2", "ref2")
    }
    labelled = labelled and first_pass["labelled"]
    ok = classes and samples

    def per_sample(value: float) -> float | None:
        return value / samples if ok else None

    evaluation = Evaluation(
        metrics={
            "running": scores["running"].metrics(samples, labelled),
            "precise": scores["precise"].metrics(samples, labelled),
            "batch": batch_scores.metrics(samples, labelled),
        },
        has_labels=labelled,
        agreement={
            "running": 1.0 if ok else None,
            "precise": per_sample(scores["precise"].value("agree")),
            "batch": per_sample(batch_sums["agree"]),
        },
        kl={
            "running": 0.0 if ok else None,
            "precise": per_sample(scores["precise"].value("kl")),
            "batch": per_sample(batch_sums["kl"]),
        },
        rel_diff={
            "running": 0.0,
            "precise": relative_difference(
                scores["precise"].value("diff2"), scores["precise"].value("ref2")
            ),
            "batch": relative_difference(batch_sums["diff2"], batch_sums["ref2"]),
        },
    )
    eps_variant = None
    if swap_eps:
        eps_variant = _variant(scores["eps"], samples, labelled, bool(ok))
    eps_check = eps_plan.to_dict(eps_variant)
    layers, arrays = _layer_records(
        collection, precise_records, precise_arrays, spreads, _init_weights(static)
    )
    mix = label_mix(collection.labels)
    findings = _findings(layers, static, precise_records, evaluation, eps_check)
    findings += label_findings(mix)
    verdict, verdict_text = _verdict(layers, evaluation)
    extra: InspectExtra = {
        "verdict": verdict,
        "verdict_text": verdict_text,
        "batches": collection.batches,
        "samples": collection.samples,
        "forwards": forwards,
        "metrics": evaluation.to_dict(),
        "static_layers": [layer.to_dict() for layer in static.layers],
        "label_mix": mix,
        "eps_check": eps_check,
    }
    return Report(
        command="inspect",
        checkpoint=None,
        layers=tuple(layers),
        findings=tuple(findings),
        extra=extra,
        arrays=arrays,
    )


def _reduce_pass(
    group: Any,
    spreads: dict[str, _Spread],
    scores: dict[str, Scores],
    batch_scores: Scores,
    samples: int,
    labelled: bool,
    classes: bool,
    forwards: int,
) -> tuple[int, bool, bool, int]:
    """Pool both passes over the ranks: batch-statistics spreads (exact moments) and every
    score, in place; returns the pooled (samples, labelled, classes, forwards)."""
    from ..engine import distributed

    accs = [a for sp in spreads.values() for a in (sp.means, sp.uvars)]
    distributed.all_reduce_moments(accs, group)
    empty = samples == 0
    every = [*scores.values(), batch_scores]
    head = [samples, 0 if (labelled or empty) else 1, 0 if (classes or empty) else 1, forwards]
    head += [s.labelled for s in every]
    parts = [torch.tensor(head, dtype=F64)]
    for s in every:
        parts.append(
            s.sums.detach().to("cpu", F64)
            if s.sums is not None
            else torch.zeros(len(Scores.FIELDS), dtype=F64)
        )
    flat = distributed.all_reduce_sum(torch.cat(parts), group)
    n_head = len(head)
    for i, s in enumerate(every):
        s.labelled = int(flat[4 + i])
        start = n_head + i * len(Scores.FIELDS)
        s.sums = flat[start : start + len(Scores.FIELDS)].clone()
        s.host = None
    return int(flat[0]), bool(flat[1] == 0), bool(flat[2] == 0), int(flat[3])


def _init_weights(static: StaticReport) -> dict[str, float]:
    """Per layer, the EMA's weight on its initial mean 0 / var 1, (1-m)^T, where a count was
    recorded (T > 0); a T of 0 with trained-looking statistics (a converted checkpoint: PyTorch
    fills in 0 when the key is missing) or no T says nothing, so 0 (docs/statistics.md,
    section 11.2)."""
    return {
        layer.name: layer.ema_init_weight
        for layer in static.layers
        if layer.num_batches_tracked and layer.ema_init_weight is not None
    }


def _layer_records(
    collection: Collection,
    precise_records: list[PreciseLayer],
    precise_arrays: dict[str, dict[str, Any]],
    spreads: dict[str, _Spread],
    init_weights: dict[str, float],
) -> tuple[list[InspectLayer], dict[str, dict[str, Any]]]:
    """Inspect records in module order from the Precise BN records (running vs population
    statistics and d_mu/d_var come from there) and the batch-statistics spreads;
    ``init_weights`` (:func:`_init_weights`) for the var-convention fit."""
    records: list[InspectLayer] = []
    arrays: dict[str, dict[str, Any]] = {}
    host = _spread_arrays(collection, spreads)
    for rec in precise_records:
        name = rec.name
        if rec.status == Status.SKIPPED:
            records.append(
                InspectLayer(
                    name=name,
                    num_features=rec.num_features,
                    status=Status.SKIPPED,
                    reason=rec.reason,
                )
            )
            continue
        st = collection.layers[name]
        mod = st.module
        momentum = getattr(mod, "momentum", None)
        if rec.status not in (Status.UPDATED, Status.FROZEN):
            records.append(
                InspectLayer(
                    name=name,
                    num_features=rec.num_features,
                    status=rec.status,
                    reason=rec.reason,
                    momentum=momentum,
                )
            )
            continue
        pa = precise_arrays[name]
        mean_r, var_r, mean_p, var_p = pa["old_mean"], pa["old_var"], pa["new_mean"], pa["new_var"]
        d_mu, d_var = pa["d_mu"], pa["d_var"]
        sigma2 = var_p + layer_eps(mod)
        sp = host.get(name)
        factor = (
            None
            if st.frozen
            else _ema_factor(cast(_BatchNorm, mod), sp["tracked"] if sp else None)
        )
        calls = spreads[name].means.count if name in spreads else 0
        spread = sp if calls else None  # a layer with batch calls has its spread figures
        var_mu_b = spread["var_mu_b"] if spread is not None else torch.zeros_like(mean_p)
        mean_uvar = spread["mean_uvar"] if spread is not None else var_p
        var_uvar = spread["var_uvar"] if spread is not None else torch.zeros_like(var_p)
        z_mu = z_var = noise_mu = spread_mu = spread_var = None
        if factor is not None and calls >= 2:
            z_mu = _z_rms(mean_r - mean_p, factor * var_mu_b, sigma2)
            z_var = _z_rms(var_r - mean_uvar, factor * var_uvar, sigma2**2)
            noise_mu = _median((factor * var_mu_b).sqrt() / sigma2.sqrt())
        if calls >= 2:
            spread_mu = _median(var_mu_b.sqrt() / sigma2.sqrt())
            spread_var = _median(var_uvar.sqrt() / mean_uvar.clamp_min(1e-30))
        # the EMA's distance against a single batch's (RMS over channels, sigma units) and what
        # running_var holds (docs/statistics.md, sections 11.1 and 11.2)
        d_mu_rms = float(d_mu.square().mean().sqrt())
        spread_rms = float((var_mu_b / sigma2).mean().sqrt()) if calls >= 2 else None
        fit = fit_var_convention(mean_r.numpy(), var_r.numpy(), mean_p.numpy(), var_p.numpy(),
                                 layer_eps(mod), init_weights.get(name, 0.0))  # fmt: skip
        zs = [z for z in (z_mu, z_var) if z is not None]
        reason = None
        gap_mu, gap_var = rec.d_mu_median, rec.d_var_median
        assert gap_mu is not None and gap_var is not None  # set for every layer that ran
        if st.frozen:  # no EMA to be stale or noisy: the stored statistics against this data
            status, reason = Status.FROZEN, (
                f"frozen BN ({type(mod).__name__}): stored statistics, compared with this data"
            )
        elif max(gap_mu, gap_var) <= MATERIAL_GAP:
            status = Status.OK
        elif not zs:
            status = Status.UNKNOWN
        else:
            status = Status.STALE if max(zs) > STALE_Z else Status.NOISY
        records.append(
            InspectLayer(
                name=name,
                num_features=rec.num_features,
                status=status,
                reason=reason,
                momentum=momentum,
                calls_per_forward=rec.calls_per_forward,
                batch_calls=calls,
                d_mu_max=rec.d_mu_max,
                d_mu_median=rec.d_mu_median,
                d_var_max=rec.d_var_max,
                d_var_median=rec.d_var_median,
                z_mu=z_mu,
                z_var=z_var,
                ema_noise_mu=noise_mu,
                batch_spread_mu=spread_mu,
                batch_spread_var=spread_var,
                d_mu_rms=d_mu_rms,
                batch_spread_mu_rms=spread_rms,
                var_slope=fit.slope if fit is not None else None,
                var_convention=fit.conversion if fit is not None else None,
                var_scale=fit.scale if fit is not None else None,
            )
        )
        worst = torch.argsort(d_mu, descending=True)[:TRACE_CHANNELS]
        trace = sp["trace"] if sp else torch.zeros(0, st.num_features)
        arrays[name] = {
            "d_mu": d_mu,
            "d_var": d_var,
            "channels": worst,
            "batch_means": trace[:, worst],
            "running_mean": mean_r[worst],
            "population_mean": mean_p[worst],
            "population_sigma": sigma2[worst].sqrt(),
        }
        if fit is not None:  # the points fitted, for conversion_figure
            arrays[name].update(var_x=fit.x, var_y=fit.y, var_intercept=fit.intercept)
    return records, arrays


def _gap(evaluation: Evaluation) -> str | None:
    """``"worse"`` when outputs with running statistics disagree with batch-statistics outputs
    and (with labels) are not better; ``"better"`` when eval mode is clearly the better one
    (noisy batch statistics, nothing to fix in eval); None when consistent."""
    agreement = evaluation.agreement["batch"]
    acc_r, acc_b = evaluation.metrics["running"].accuracy, evaluation.metrics["batch"].accuracy
    if acc_r is not None and acc_b is not None:
        if acc_b - acc_r > TRAIN_TEST_ACCURACY:
            return "worse"
        if acc_r - acc_b > TRAIN_TEST_ACCURACY:
            return "better"
        if agreement is not None and agreement < TRAIN_TEST_AGREEMENT:
            return "worse" if acc_r < acc_b else "better"
        return None
    return "worse" if agreement is not None and agreement < TRAIN_TEST_AGREEMENT else None


def _findings(
    layers: list[InspectLayer],
    static: StaticReport,
    precise_records: list[PreciseLayer],
    evaluation: Evaluation,
    eps_check: EpsCheckDict,
) -> list[Finding]:
    never = {f.layer for f in static.findings if f.code == "never-updated"}
    # a layer whose running_var is in another convention is far from the population because
    # of it (var-convention explains it, not staleness); a TF-convention momentum explains a
    # noisy EMA (momentum-convention, with the measured noise, replaces the static one)
    converted = {layer.name for layer in layers if layer.var_convention is not None}
    tf_layers = {f.layer for f in static.findings if f.code == "momentum-convention"}
    measured = _momentum_measurements(layers, tf_layers)
    out: list[Finding] = []
    for f in static.findings:
        if f.code == "momentum-convention" and f.layer in measured:
            f = measured[f.layer]
        out.append(f)
    accuracy = {k: v.accuracy for k, v in evaluation.metrics.items()}
    fix = findings.precise_effect(
        accuracy["running"], accuracy["precise"], evaluation.agreement["precise"]
    )
    out += _var_convention_findings(layers, fix)
    for layer in layers:
        if layer.status == Status.STALE and layer.name not in never | converted:
            z = max(z for z in (layer.z_mu, layer.z_var) if z is not None)
            out.append(
                findings.stale_ema(
                    layer.name, layer.d_mu_median or 0.0, layer.d_var_median or 0.0, z,
                    layer.momentum, fix,
                )
            )  # fmt: skip
        elif layer.status == Status.NOISY and layer.name not in tf_layers:
            out.append(
                findings.noisy_ema(
                    layer.name, layer.d_mu_median or 0.0, layer.d_var_median or 0.0,
                    layer.momentum,
                )
            )  # fmt: skip
    out += usage_findings(precise_records, "inspect")
    gap = _gap(evaluation)
    if gap is not None:
        stale = any(
            layer.status == Status.STALE and layer.name not in converted for layer in layers
        )
        out.append(
            findings.train_test_gap(
                gap, stale, evaluation.agreement["batch"], accuracy, fix,
                converted=bool(converted),
            )
        )  # fmt: skip
    out += _eps_findings(eps_check, evaluation)
    return out


def _momentum_measurements(
    layers: list[InspectLayer], flagged: set[str | None]
) -> dict[str | None, Finding]:
    """The dynamic ``momentum-convention`` finding of each ``flagged`` layer that has its EMA
    gap and batch spread measured: the same message for every layer of one momentum, quoting
    the medians over them (docs/statistics.md, section 11.1)."""
    groups: dict[float, list[InspectLayer]] = {}
    for layer in layers:
        if (
            layer.name in flagged
            and layer.momentum is not None
            and layer.d_mu_rms is not None
            and layer.batch_spread_mu_rms is not None
        ):
            groups.setdefault(layer.momentum, []).append(layer)
    out: dict[str | None, Finding] = {}
    for momentum, group in groups.items():
        meant = tf_momentum(momentum)
        if meant is None:
            continue
        gap = median(layer.d_mu_rms or 0.0 for layer in group)
        spread = median(layer.batch_spread_mu_rms or 0.0 for layer in group)
        for layer in group:
            out[layer.name] = findings.momentum_convention(
                layer.name, momentum, meant, "inspect", (gap, spread, len(group))
            )
    return out


def _var_convention_findings(layers: list[InspectLayer], precise_fix: str) -> list[Finding]:
    """One ``var-convention`` error per layer whose running_var holds another quantity; the
    layers of one conversion share one message (the medians over them, out of the layers the
    fit could judge), so the findings table shows them as one row: a model-level summary
    (docs/statistics.md, section 11.2)."""
    fitted = sum(layer.var_slope is not None for layer in layers)
    groups: dict[str, list[InspectLayer]] = {}
    for layer in layers:
        if layer.var_convention is not None:
            groups.setdefault(layer.var_convention, []).append(layer)
    out: list[Finding] = []
    for layer in layers:
        conversion = layer.var_convention
        if conversion is None:
            continue
        group = groups[conversion]
        scales = [x.var_scale for x in group if x.var_scale is not None]
        scale = median(scales) if scales else None
        # bnscope precise keeps a frozen layer's statistics (and its evaluation leaves them in
        # place, so its accuracy says nothing about them) unless told to re-estimate them
        frozen = any(x.status == Status.FROZEN for x in group)
        out.append(
            findings.var_convention(
                layer.name, conversion,
                median(x.var_slope or 0.0 for x in group),
                math.log(scale) if scale else 0.0,
                scale, len(group), fitted,
                findings.precise_frozen_fix() if frozen else precise_fix,
            )
        )  # fmt: skip
    return out


def _eps_findings(eps_check: EpsCheckDict, evaluation: Evaluation) -> list[Finding]:
    """``eps-mismatch`` from the evaluation with the other eps (docs/statistics.md, section
    11.3): a warning when labels show the other eps clearly better, info when there are no
    labels and the predictions change materially."""
    variant = eps_check["variant"]
    eps, other = eps_check["eps"], eps_check["other_eps"]
    if variant is None or eps is None or other is None:
        return []
    running = evaluation.metrics["running"]
    outcome = eps_outcome(
        running.accuracy, running.loss, variant["accuracy"], variant["loss"],
        variant["agreement"], variant["rel_diff"],
    )  # fmt: skip
    if outcome is None:
        return []
    return [
        findings.eps_mismatch(
            outcome, eps, other, eps_check["layers"], eps_check["channels"],
            eps_check["max_gain_ratio"] or 1.0,
            {"accuracy": running.accuracy, "loss": running.loss},
            {"accuracy": variant["accuracy"], "loss": variant["loss"],
             "agreement": variant["agreement"], "rel_diff": variant["rel_diff"]},
        )
    ]  # fmt: skip


def _verdict(layers: list[InspectLayer], evaluation: Evaluation) -> tuple[InspectVerdict, str]:
    stale = [layer.name for layer in layers if layer.status == Status.STALE]
    noisy = [layer.name for layer in layers if layer.status == Status.NOISY]
    analysed = [
        layer for layer in layers if layer.status not in (Status.NOT_CALLED, Status.SKIPPED)
    ]
    # a converted layer is stale by the figures; so is a frozen one (its status is frozen)
    converted = [layer for layer in layers if layer.var_convention is not None]
    verdict: InspectVerdict
    if stale or converted:
        verdict = "stale"
    elif _gap(evaluation) == "worse":
        verdict = "gap"
    elif noisy:
        verdict = "noisy"
    else:
        verdict = "healthy"
    accuracy = {k: v.accuracy for k, v in evaluation.metrics.items()}
    # a converted layer is stale by the figures; the conversion, named first, is its cause
    unexplained = [
        layer.name for layer in layers
        if layer.status == Status.STALE and layer.var_convention is None
    ]  # fmt: skip
    text = findings.inspect_verdict(
        verdict, unexplained, noisy, len(analysed), accuracy, evaluation.agreement,
        frozen_converted=any(layer.status == Status.FROZEN for layer in converted),
    )  # fmt: skip
    conversions = Counter(
        layer.var_convention for layer in layers if layer.var_convention is not None
    )
    if conversions:
        fitted = sum(layer.var_slope is not None for layer in layers)
        text = findings.converted_verdict(dict(conversions), fitted) + text
    return verdict, text

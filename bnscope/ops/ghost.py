"""Ghost batch size: how batch statistics and outputs depend on the normalization batch size.

The normalization batch size (NBS) is the number of samples whose statistics BN normalizes with
while training. Hoffer et al. (2017), "Train longer, generalize better" (Ghost BN), make it a
knob below the batch size; Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §4, show
how results depend on it (ResNet-50 val error 23.6-23.7% from NBS 16 to 128, 25% at 8, 35%
at 2).

:func:`ghost_analysis` splits every batch along the sample axis into chunks of g (the
remainder is a chunk of its own, unless it would hold one value per channel; then it joins the
previous chunk, as :class:`bnscope.nn.GhostBatchNorm` does; the layout comes from
:func:`bnscope.nn.ghost_chunk_sizes`) and normalizes each chunk with its
own statistics in every BN layer. For each g and layer it measures, over chunks k and
channels c, with sigma = sqrt(var_pop + eps):

    noise_mu  = mean |mu_k - mu_pop| / sigma
    noise_var = mean |log((var_k + eps) / (var_pop + eps))|

and compares them with what i.i.d. samples would give. With m_i the per-sample mean of a
channel (over its spatial positions) and s the chunk size, i.i.d. samples give
Var(mu_k) = Var(m_i) / s, so E|mu_k - mu| = sqrt(2/pi) sqrt(Var(m_i) / s) (normal
approximation). The variance noise uses the delta method on var_k = mean(q_i) - (mu_k - mu)^2
with q_i = v_i + (m_i - mu)^2 (v_i the per-sample variance): log(var_k / var) is about normal
with mean log(E[q] - Var(m)/s) - Var(q) / (2 s E[q]^2) and variance Var(q) / (s E[q]^2), and
E|N(b, s^2)| = s sqrt(2/pi) exp(-b^2 / 2s^2) + b (1 - 2 Phi(-b/s)).

The effective sample size is g * (Var(m_i)/s averaged over chunks) / Var_measured(mu_k): the
number of i.i.d. samples whose mean would be as noisy as the chunk means are. Samples that share
a source (frames of one video, crops of one image, one class per batch) make it lower than g.

The model's outputs with batch statistics of chunks of g are compared with its outputs with
population statistics (eval mode) on the same inputs: top-1 agreement, KL, the relative
output change, and accuracy/loss with labels; that is the NBS curve. Population statistics
come from the Precise BN engine in the same run, so the analysis costs one collection pass,
then per batch one forward with population statistics plus one per size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from .. import findings
from ..engine import sync
from ..engine.collect import Call, Progress, check_batches, collect, expected_batches
from ..engine.evaluate import (
    Evaluation,
    Metrics,
    Scores,
    batch_kind,
    check_label_range,
    eval_mode,
    forward_errors,
    labelled_batches,
    logits_of,
    read_scores,
    relative_difference,
    using_statistics,
)
from ..engine.intercept import BatchNormCall, redirected
from ..engine.runner import make_runner, placed
from ..errors import DataError, UsageError
from ..extras import GhostExtra, GhostReport, GhostSizeDict, GhostVerdict
from ..nn import ChunkStats, ghost_chunk_sizes, normalize_chunks
from ..records import Finding, GhostLayer, GhostLayerSize, GhostSize, Report, Status
from .precise import layer_eps, population_stats

#: the smallest ghost size: one sample has no batch statistics worth the name
MIN_SIZE = 2
#: a size is "too noisy" when top-1 agreement with population statistics falls below this ...
SMALL_NBS_AGREEMENT = 0.95
#: ... or, with labels, accuracy falls by more than this (absolute) against population stats
SMALL_NBS_ACCURACY_DROP = 0.02
#: ``non-iid-batches`` when effective size / g falls below this at the largest size analysed
NON_IID_RATIO = 0.5
#: chunks a layer needs at a size before its effective size is judged
MIN_CHUNKS = 8

F64 = torch.float64


def parse_sizes(sizes: Iterable[int] | str) -> list[int]:
    """Validate ghost sizes (a comma-separated string or integers): sorted, unique, >= 2."""
    example = "e.g. sizes=2,4,8,16,32"
    if isinstance(sizes, str):
        parts = [p.strip() for p in sizes.split(",")]
        try:
            values = [int(p) for p in parts if p]
        except ValueError:
            raise UsageError(
                f"ghost sizes must be comma-separated integers, got {sizes!r}", example
            ) from None
    else:
        values = list(sizes)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise UsageError(f"ghost sizes must be integers, got {v!r}", example)
    if not values:
        raise UsageError("no ghost sizes given", example)
    low = [v for v in values if v < MIN_SIZE]
    if low:
        raise UsageError(
            f"ghost size {low[0]} is too small: batch statistics need at least {MIN_SIZE} samples",
            example,
        )
    return sorted(set(values))


class _NoiseProbe:
    """Float64 sums for one layer at one ghost size, on the layer's device (one all-reduce
    merges ranks): chunk deviations from the population and per-sample moments. Chunk-size
    counts are host integers (the sizes are known on the host)."""

    def __init__(self, mean_pop: torch.Tensor, var_pop: torch.Tensor, eps: float, g: int) -> None:
        self.mu = mean_pop.to(F64)
        self.sigma2 = var_pop.to(F64) + eps
        self.inv_sigma = self.sigma2.rsqrt()
        self.log_sigma2 = torch.log(self.sigma2)
        self.eps = eps
        c = self.mu.numel()
        # rows: |dmu|, dmu^2, dmu, |dlogvar|, sample d, d^2, q, q^2
        self.sums = torch.zeros(8, c, dtype=F64, device=self.mu.device)
        # counts[s] = chunks of s samples (s up to 2g, a merged remainder included); [0] samples
        self.counts = [0] * (2 * g + 2)

    def add(self, sizes: list[int], st: ChunkStats) -> None:
        dm = (st.mean.to(F64) - self.mu) * self.inv_sigma
        dv = torch.log(st.var.to(F64) + self.eps) - self.log_sigma2
        d = (st.sample_mean.to(F64) - self.mu) * self.inv_sigma
        q = st.sample_var.to(F64) / self.sigma2 + d * d
        chunk = torch.stack([dm.abs(), dm * dm, dm, dv.abs()]).sum(1)
        sample = torch.stack([d, d * d, q, q * q]).sum(1)
        self.sums += torch.cat([chunk, sample])
        last = len(self.counts) - 1
        for s in sizes:
            self.counts[min(s, last)] += 1
        self.counts[0] += st.sample_mean.shape[0]

    def result(self, g: int, sums: torch.Tensor) -> GhostLayerSize:
        """Figures from the sums (``sums``: this probe's, on the host)."""
        chunk_sizes = torch.arange(len(self.counts), dtype=F64)
        per_size = torch.tensor(self.counts, dtype=F64)
        per_size[0] = 0
        chunks = int(per_size.sum())
        samples = float(self.counts[0])
        if chunks == 0 or samples == 0:
            return GhostLayerSize(
                size=g,
                chunks=0,
                noise_mu=None,
                noise_var=None,
                iid_mu=None,
                iid_var=None,
                effective_size=None,
            )
        s = sums
        cells = chunks * s.shape[1]
        noise_mu = float(s[0].sum() / cells)
        noise_var = float(s[3].sum() / cells)
        var_m = (s[5] / samples - (s[4] / samples) ** 2).clamp_min(0)
        mean_q = s[6] / samples
        var_q = (s[7] / samples - mean_q**2).clamp_min(0)
        used = per_size > 0
        weights = per_size[used] / chunks  # fraction of chunks of each size
        sz = chunk_sizes[used]
        iid_mu = math.sqrt(2 / math.pi) * float(
            (var_m.sqrt()[:, None] * (weights / sz.sqrt())[None, :]).sum(1).mean()
        )
        iid_var = float((_expected_abs_log_var(var_m, mean_q, var_q, sz) * weights).sum(1).mean())
        effective = None
        if chunks >= 2:
            measured = (s[1] / chunks - (s[2] / chunks) ** 2).clamp_min(0)  # Var(mu_k)/sigma^2
            expected = var_m * float((weights / sz).sum())
            if float(measured.mean()) > 0:
                effective = g * float(expected.mean() / measured.mean())
        return GhostLayerSize(
            size=g,
            chunks=chunks,
            noise_mu=noise_mu,
            noise_var=noise_var,
            iid_mu=iid_mu,
            iid_var=iid_var,
            effective_size=effective,
        )


def _expected_abs_log_var(
    var_m: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """E|log(var_k / var_pop)| for i.i.d. chunks of each size (delta method, normal
    approximation; see the module docstring). Shape [C, sizes]."""
    s = sizes[None, :]
    centre = (mean_q[:, None] - var_m[:, None] / s).clamp_min(1e-12)
    sd = (var_q[:, None] / s).sqrt() / centre
    b = torch.log(centre) - sd**2 / 2
    sd = sd.clamp_min(1e-12)
    return sd * math.sqrt(2 / math.pi) * torch.exp(-(b**2) / (2 * sd**2)) + b * (
        1 - 2 * torch.special.ndtr(-b / sd)
    )


@contextlib.contextmanager
def ghost_forwards(
    layers: Mapping[str, nn.Module], g: int, probes: dict[str, _NoiseProbe] | None = None
) -> Iterator[dict[str, list[int]]]:
    """Within the block, the given BN layers normalize every chunk of ``g`` samples with the
    chunk's own statistics, whatever their mode, through their own forward: the batch_norm
    call it makes with the layer's running statistics returns the chunk-normalized input
    instead (:func:`bnscope.engine.intercept.redirected`), so an activation or dropout after it
    still applies, and no buffer is touched. ``probes`` record the chunk statistics. Yields, per
    layer name, ``[forward calls, chunked calls]``. Each module's forward is restored on
    exit."""
    by_module: dict[nn.Module, str] = {module: name for name, module in layers.items()}

    def chunked(name: str) -> Callable[[BatchNormCall], torch.Tensor]:
        probe = probes.get(name) if probes else None

        def replace(call: BatchNormCall) -> torch.Tensor:
            x = call.input
            if x.ndim < 2:
                raise ValueError(f"expected an input of shape [N, C, ...], got {tuple(x.shape)}")
            spatial = math.prod(x.shape[2:])
            sizes = ghost_chunk_sizes(x.shape[0], g, spatial)
            if sizes[0] * spatial == 1:
                raise ValueError("Expected more than 1 value per channel when training")
            y, stats = normalize_chunks(x, sizes, call.eps, call.weight, call.bias)
            if probe is not None:
                probe.add(sizes, stats)
            return y

        return replace

    with redirected({module: chunked(name) for name, module in layers.items()}) as counts:
        yield {by_module[m]: c for m, c in counts.items()}


def _check_reiterable(data: Iterable[Any]) -> None:
    if iter(data) is data:
        raise UsageError(
            "the ghost analysis reads the data twice, but it is a one-shot iterator",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )


def ghost_analysis(
    model: nn.Module,
    data: Iterable[Any],
    sizes: Iterable[int] | str = (2, 4, 8, 16, 32),
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
) -> GhostReport:
    """Normalization-batch-size analysis: chunk-statistics noise per layer and the model's
    outputs with batch statistics of chunks of each size g, against population statistics.

    ``data`` is read twice (so it must be re-iterable): once to collect population statistics
    (Precise BN engine), once to compare, per batch, the outputs with population statistics and
    with batch statistics at every size: k + 2 forwards per batch for k sizes. Sizes larger
    than the batch are reported as skipped. The model is left exactly as it was (modes,
    buffers, forwards). ``device``, ``amp`` and ``channels_last`` as in
    :func:`bnscope.precise_bn`. Returns a ``ghost`` report: :class:`~bnscope.records.GhostLayer`
    records in module order, findings ``small-nbs`` and ``non-iid-batches``, and
    ``extra["sizes"]`` with one :class:`~bnscope.records.GhostSize` dict per size.

    Labels, where batches carry them, must be class indices of the outputs (a
    :class:`~bnscope.errors.DataError` otherwise, once the sums are read); ``num_classes`` as
    in :func:`bnscope.engine.evaluate.batch_kind`.
    """
    from ..engine import distributed

    wanted = parse_sizes(sizes)
    check_batches(batches)
    runner = make_runner(model, call, device, amp, channels_last, input_key)
    group = distributed.resolve_group(process_group)
    _check_reiterable(data)
    passes = expected_batches(data, batches)  # the data is read twice
    total = None if passes is None else 2 * passes

    first_done = [0]  # this rank's batches of the first pass (collection.batches is pooled)

    def first_pass(done: int, _: int | None) -> None:
        first_done[0] = done
        if progress is not None:
            progress(done, total)

    samples = 0
    labelled = classes = True
    done = 0
    unchunked: set[str] = set()
    with placed(model, runner):
        collection = collect(
            model, data, batches=batches, call=runner.call, device=runner.device,
            progress=first_pass, process_group=process_group, amp=runner.amp,
            channels_last=runner.channels_last, input_key=input_key,
        )  # fmt: skip
        batch_size = collection.max_rows  # as the BN layers see it (pooled over ranks)
        run = [g for g in wanted if g <= batch_size]
        if not run:
            raise DataError(
                f"the data's batches hold {batch_size} samples, fewer than every ghost size "
                f"({', '.join(map(str, wanted))})",
                f"use batch_size={wanted[0]} or more, or smaller sizes=",
            )
        ref_scores = Scores()
        scores = {g: Scores() for g in run}
        pop = {  # frozen BN layers normalize with stored statistics at every batch size
            name: stats
            for name, stats in population_stats(collection).items()
            if not collection.layers[name].frozen
        }
        targets = {name: collection.layers[name].module for name in pop}
        probes = {
            g: {
                name: _NoiseProbe(mean, var, layer_eps(targets[name]), g)
                for name, (mean, var) in pop.items()
            }
            for g in run
        }
        population = {
            targets[name]: (
                mean.to(collection.layers[name].running_mean.dtype),
                var.to(collection.layers[name].running_var.dtype),
            )
            for name, (mean, var) in pop.items()
        }
        with (
            distributed.failures_announced(group),
            eval_mode(model),
            using_statistics(population),
            torch.no_grad(),
        ):
            for batch, labels in labelled_batches(data, batches, runner):
                with forward_errors(
                    f"the model failed on batch {done} of the ghost pass",
                    "check that data= fits the model; batches need 2+ samples",
                ):
                    ref = logits_of(runner(model, batch))
                    outs = {}
                    for g in run:
                        with ghost_forwards(targets, g, probes[g]) as counts:
                            outs[g] = logits_of(runner(model, batch))
                        unchunked.update(n for n, (c, hit) in counts.items() if hit < c)
                n, is_cls, ok_labels = batch_kind(ref, labels, num_classes)
                samples += n
                classes = classes and is_cls
                labelled = labelled and ok_labels
                use = labels if ok_labels else None
                ref_scores.add(ref, labels=use)
                for g, out in outs.items():
                    scores[g].add(out, labels=use, ref=ref)
                done += 1
                if progress is not None:
                    progress(first_done[0] + done, total)
    if done == 0 and group is None:
        raise DataError(
            "the data yielded no batches on its second reading",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    flags = torch.tensor(
        [samples, 1 - int(labelled), 1 - int(classes), done * (1 + len(run))], dtype=torch.float64
    )  # ranks where labels (classes) were missing; this rank's comparison forwards
    if samples == 0:
        flags[1:3] = 0  # an empty shard says nothing about labels
    distributed.all_reduce_sum(flags, group)
    samples, labelled, classes = int(flags[0]), bool(flags[1] == 0), bool(flags[2] == 0)
    forwards = collection.batches + int(flags[3])
    if samples == 0:
        raise DataError(
            "the data yielded no batches on its second reading",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    if group is not None:  # a layer left unchunked on any rank is reported by every rank
        names = list(collection.layers)
        flags = torch.tensor([float(n in unchunked) for n in names], dtype=torch.float64)
        distributed.all_reduce_max(flags, group)
        unchunked = {n for n, f in zip(names, flags.tolist(), strict=True) if f}
    _reduce_all(probes, ref_scores, scores, group)
    read_scores([ref_scores, *scores.values()])
    check_label_range(ref_scores)
    probe_sums = _probe_sums(probes)
    return _report(collection, probes, probe_sums, run, wanted, batch_size, ref_scores, scores,
                   samples, labelled, classes, forwards, unchunked)  # fmt: skip


def _probe_sums(probes: dict[int, dict[str, _NoiseProbe]]) -> dict[int, dict[str, torch.Tensor]]:
    """Every probe's sums on the host, in one transfer."""
    keys = [(g, name) for g, ps in probes.items() for name in ps]
    host = sync.fetch([probes[g][name].sums for g, name in keys])
    out: dict[int, dict[str, torch.Tensor]] = {g: {} for g in probes}
    for (g, name), sums in zip(keys, host, strict=True):
        out[g][name] = sums
    return out


def _reduce_all(
    probes: dict[int, dict[str, _NoiseProbe]],
    ref_scores: Scores,
    scores: dict[int, Scores],
    group: Any,
) -> None:
    """Sum every rank's probes and scores (one collective for all of them)."""
    from ..engine import distributed

    if group is None:
        return
    every = [ref_scores, *scores.values()]
    plist = [p for ps in probes.values() for p in ps.values()]
    dev = plist[0].sums.device if plist else torch.device("cpu")
    width = len(Scores.FIELDS)
    parts = [p.sums.reshape(-1) for p in plist]
    parts += [torch.tensor(p.counts, dtype=F64, device=dev) for p in plist]
    parts += [
        s.sums.to(dev) if s.sums is not None else torch.zeros(width, dtype=F64, device=dev)
        for s in every
    ]
    parts.append(torch.tensor([s.labelled for s in every], dtype=F64, device=dev))
    flat = distributed.all_reduce_sum(torch.cat(parts), group)
    offset = 0
    for p in plist:
        p.sums = flat[offset : offset + p.sums.numel()].reshape(p.sums.shape).clone()
        offset += p.sums.numel()
    counts = flat[offset:].tolist()
    i = 0
    for p in plist:
        p.counts = [int(round(v)) for v in counts[i : i + len(p.counts)]]
        i += len(p.counts)
    for s in every:
        s.sums = flat[offset + i : offset + i + width].clone()
        s.host = None
        i += width
    for s, n in zip(every, counts[i:], strict=True):
        s.labelled = int(round(n))


def _min(values: list[float]) -> float | None:
    return min(values) if values else None


def _median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _report(
    collection: Any,
    probes: dict[int, dict[str, _NoiseProbe]],
    probe_sums: dict[int, dict[str, torch.Tensor]],
    run: list[int],
    wanted: list[int],
    batch_size: int,
    ref_scores: Scores,
    scores: dict[int, Scores],
    samples: int,
    labelled: bool,
    classes: bool,
    forwards: int,
    unchunked: set[str],
) -> GhostReport:
    results = {
        g: {name: p.result(g, probe_sums[g][name]) for name, p in ps.items()}
        for g, ps in probes.items()
    }
    layers: list[GhostLayer] = []
    for name, st in collection.layers.items():
        if st.frozen:
            layers.append(
                GhostLayer(
                    name=name,
                    num_features=st.num_features,
                    status=Status.SKIPPED,
                    reason=f"frozen BN ({type(st.module).__name__}): it normalizes with its "
                    "stored statistics at every batch size",
                )
            )
        elif name in unchunked:
            layers.append(
                GhostLayer(
                    name=name,
                    num_features=st.num_features,
                    status=Status.SKIPPED,
                    reason="its forward makes no batch_norm call with its running statistics, "
                    "so it cannot be split into ghost batches (it normalized with population "
                    "statistics)",
                )
            )
        elif name in probes[run[0]]:
            layers.append(
                GhostLayer(
                    name=name,
                    num_features=st.num_features,
                    status=Status.ANALYSED,
                    reason=None,
                    calls_per_forward=st.max_calls_per_forward,
                    sizes=tuple(results[g][name] for g in run),
                )
            )
        else:
            layers.append(
                GhostLayer(
                    name=name,
                    num_features=st.num_features,
                    status=Status.NOT_CALLED,
                    reason="never ran on the data",
                )
            )
    for sk in collection.skipped:
        layers.append(
            GhostLayer(
                name=sk.name, num_features=sk.num_features, status=Status.SKIPPED, reason=sk.reason
            )
        )
    layers = collection.in_module_order(layers)

    population = ref_scores.metrics(samples, labelled)
    size_rows: list[GhostSize] = []
    for g in wanted:
        if g not in scores:
            size_rows.append(
                GhostSize(
                    size=g,
                    status=Status.SKIPPED,
                    note=f"larger than the batch size ({batch_size}): a chunk cannot exceed "
                    "the batch",
                    chunks=0,
                    remainder_chunks=0,
                    remainder_samples=0,
                    accuracy=None,
                    loss=None,
                    agreement=None,
                    kl=None,
                    rel_diff=None,
                    noise_mu=None,
                    noise_var=None,
                    effective_ratio=None,
                )
            )
            continue
        st = scores[g]
        per_layer = list(results[g].values())
        counts = next(iter(probes[g].values())).counts if probes[g] else None
        chunks = rem_chunks = rem_samples = 0
        if counts is not None:
            for s, c in enumerate(counts):
                if s == 0 or c == 0:
                    continue
                chunks += int(c)
                if s < g:  # a remainder normalized on its own (or a short last batch)
                    rem_chunks += int(c)
                    rem_samples += int(c) * s
                elif s > g:  # a single-sample remainder merged into the previous chunk
                    rem_chunks += int(c)
                    rem_samples += int(c) * (s - g)
        metrics = st.metrics(samples, labelled)
        note = _size_note(g, batch_size)
        size_rows.append(
            GhostSize(
                size=g,
                status=Status.OK,
                note=note,
                chunks=chunks,
                remainder_chunks=rem_chunks,
                remainder_samples=rem_samples,
                accuracy=metrics.accuracy,
                loss=metrics.loss,
                agreement=st.value("agree") / samples if classes and samples else None,
                kl=st.value("kl") / samples if classes and samples else None,
                rel_diff=relative_difference(st.value("diff2"), st.value("ref2")),
                noise_mu=_median([r.noise_mu for r in per_layer]),
                noise_var=_median([r.noise_var for r in per_layer]),
                effective_ratio=_min(
                    [r.effective_size / g for r in per_layer if r.effective_size is not None]
                ),
            )
        )
    found = _findings(layers, size_rows, population, batch_size)
    verdict, verdict_text = _verdict(size_rows, population)
    extra: GhostExtra = {
        "verdict": verdict,
        "verdict_text": verdict_text,
        "sizes": [cast(GhostSizeDict, row.to_dict()) for row in size_rows],
        "batch_size": batch_size,
        "batches": collection.batches,
        "samples": samples,
        "forwards": forwards,
        "metrics": Evaluation(  # population statistics, the reference of every size
            metrics={"precise": population},
            has_labels=labelled,
            agreement={"precise": 1.0 if classes else None},
            kl={"precise": 0.0 if classes else None},
            rel_diff={"precise": 0.0},
        ).to_dict(),
    }
    arrays: dict[str, dict[str, Any]] = {
        "size_rows": {"rows": size_rows},
        "population": {"metrics": population},
    }
    return Report(
        command="ghost",
        checkpoint=None,
        layers=tuple(layers),
        findings=tuple(found),
        extra=extra,
        arrays=arrays,
    )


def _size_note(g: int, batch_size: int) -> str | None:
    if g == batch_size:
        return "the data's batch size: plain BatchNorm training statistics"
    r = batch_size % g
    if r:
        return (
            f"{batch_size} = {batch_size // g} x {g} + {r}: a remainder chunk of {r} per batch "
            "(normalized on its own; a single value per channel joins the previous chunk)"
        )
    return None


def too_noisy(row: GhostSize, population: Metrics) -> bool:
    """True when outputs with batch statistics at this size stray from population-statistics
    outputs: agreement below :data:`SMALL_NBS_AGREEMENT` or, with labels, accuracy lower by
    more than :data:`SMALL_NBS_ACCURACY_DROP`."""
    if row.status != Status.OK:
        return False
    if row.accuracy is not None and population.accuracy is not None:
        if population.accuracy - row.accuracy > SMALL_NBS_ACCURACY_DROP:
            return True
    return row.agreement is not None and row.agreement < SMALL_NBS_AGREEMENT


def _findings(
    layers: list[GhostLayer], rows: list[GhostSize], population: Metrics, batch_size: int
) -> list[Finding]:
    out: list[Finding] = []
    ok = [r for r in rows if r.status == Status.OK]
    noisy = [r for r in ok if too_noisy(r, population)]
    if noisy:
        worst_g = max(r.size for r in noisy)
        row = next(r for r in noisy if r.size == worst_g)
        better = [r.size for r in ok if r.size > worst_g and not too_noisy(r, population)]
        out.append(
            findings.small_nbs(
                _noisiest_layer(layers, worst_g), worst_g, worst_g >= batch_size, row.accuracy,
                population.accuracy, row.agreement, better[0] if better else None,
            )
        )  # fmt: skip
    if ok:
        g = ok[-1].size  # the largest size analysed: closest to how the model trains
        run_index = len(ok) - 1
        for layer in layers:
            if layer.status != Status.ANALYSED:
                continue
            res = layer.sizes[run_index]
            if res.effective_size is None or res.chunks < MIN_CHUNKS:
                continue
            if res.effective_size / g < NON_IID_RATIO:
                out.append(findings.non_iid_batches(layer.name, g, res.effective_size))
    return out


def _verdict(rows: list[GhostSize], population: Metrics) -> tuple[GhostVerdict, str]:
    """("none" | "fine" | "noisy", the first line of the report)."""
    ok = [r for r in rows if r.status == Status.OK]
    thresholds = (SMALL_NBS_AGREEMENT, SMALL_NBS_ACCURACY_DROP)
    if not ok:
        return "none", findings.ghost_verdict(None, None, None, *thresholds)
    bad = [r.size for r in ok if too_noisy(r, population)]
    worst = max(bad) if bad else None
    above = [r for r in ok if worst is not None and r.size > worst]
    fine_from = next((r.size for r in above if not too_noisy(r, population)), None)
    text = findings.ghost_verdict(worst, ok[0].size, fine_from, *thresholds)
    return ("noisy" if bad else "fine"), text


def _noisiest_layer(layers: list[GhostLayer], g: int) -> str | None:
    best, name = -1.0, None
    for layer in layers:
        for res in layer.sizes:
            if res.size == g and res.noise_mu is not None and res.noise_mu > best:
                best, name = res.noise_mu, layer.name
    return name

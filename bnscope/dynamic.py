"""Dynamic inspection: why is the model worse in eval() than in train()?

With the model and its training data, :func:`inspect` measures, per BN layer, how far the
running statistics (an EMA) are from the population statistics of the model as it is, and
whether that gap is more than the EMA's own noise; how much batch statistics scatter at the
data's batch size; whether outputs with batch statistics and with running statistics disagree
(the train/test gap); and how the layers are used (not called, reused).

Staleness (DESIGN §4). Per channel, with sigma = sqrt(var_pop + eps):
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

Cost: the data is read twice: once to collect population statistics (the Precise BN engine),
then per batch three forwards on the same inputs: running statistics, population ("precise")
statistics and batch statistics. The last two run on a private copy of the model, so the
model passed in is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .capture import is_batchnorm
from .collect import Call, Progress, check_batches, collect, default_call, on_device
from .errors import DataError
from .evaluate import (
    Metrics,
    Tally,
    agreement_and_kl,
    batch_kind,
    eval_mode,
    forward_errors,
    labelled_batches,
    logits_of,
)
from .precise import layer_records, population_stats, usage_findings
from .records import Finding, InspectLayer, Report
from .render.text import pct
from .static import static_inspect
from .stats import MomentAccumulator

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


@dataclass
class _Spread:
    """Spread of per-call batch statistics of one layer (float64), plus a short trace."""

    means: MomentAccumulator
    uvars: MomentAccumulator
    trace: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        """One call's batch mean and biased variance per channel, from per-sample moments over
        the spatial positions (one contiguous reduction) combined in float64 by the law of
        total variance."""
        flat = x.detach().reshape(x.shape[0], x.shape[1], -1)
        if flat.dtype not in (torch.float32, F64):
            flat = flat.float()
        v_i, m_i = (t.to(F64) for t in torch.var_mean(flat, dim=2, correction=0))
        mean = m_i.mean(0)
        var = (v_i + (m_i - mean) ** 2).mean(0)
        n = flat.shape[0] * flat.shape[2]
        unbiased = var * (n / (n - 1)) if n > 1 else var
        zero = torch.zeros_like(mean)
        self.means.update(mean, zero, 1)
        self.uvars.update(unbiased, zero, 1)
        if len(self.trace) < TRACE_BATCHES:
            self.trace.append(mean.float().cpu())


@contextlib.contextmanager
def _spread_hooks(layers: dict[str, _BatchNorm], spreads: dict[str, _Spread], active: list[bool]):
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if active[0]:
                spreads[name].add(args[0])

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _z_rms(gap: torch.Tensor, noise_var: torch.Tensor, scale: torch.Tensor) -> float | None:
    """sqrt(mean_c z_c^2) with z_c = gap_c / sqrt(noise_var_c); channels whose noise is zero
    relative to ``scale`` (a single batch, constant channels) are left out."""
    ok = noise_var > 1e-12 * scale
    if not bool(ok.any()):
        return None
    z2 = gap[ok] ** 2 / noise_var[ok]
    return float(z2.mean().sqrt())


def _ema_factor(module: _BatchNorm) -> float | None:
    """m / (2 - m) for an EMA with momentum m; 1/T for a cumulative average over T batches."""
    if module.momentum is None:
        t = int(module.num_batches_tracked) if module.num_batches_tracked is not None else 0
        return 1.0 / t if t > 0 else None
    m = float(module.momentum)
    return m / (2 - m) if 0 < m <= 1 else None


def _median(t: torch.Tensor) -> float:
    return float(t.median())


def inspect(
    model: nn.Module,
    data: Iterable[Any],
    batches: int | None = None,
    *,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    process_group: Any = None,
) -> Report:
    """Dynamic report: EMA staleness, batch-statistics spread, train/test inconsistency, usage.

    ``data`` is the training data (what the running statistics should describe); it is read
    twice, so it must be re-iterable. The model is not changed. Returns an ``inspect`` report:
    :class:`~bnscope.records.InspectLayer` records in module order, findings (``stale-ema``,
    ``train-test-gap``, ``small-nbs`` for noisy EMAs, ``not-called``, ``reused`` and the static
    ones: ``ema-warmup``, ``never-updated``, ``tiny-variance``, ``dead-channel``,
    ``non-finite``), and ``extra["consistency"]`` with metrics for running, batch and precise
    statistics.
    """
    from . import distributed

    check_batches(batches)
    group = distributed.resolve_group(process_group)
    if iter(data) is data:
        from .errors import UsageError

        raise UsageError(
            "dynamic inspection reads the data twice, but it is a one-shot iterator",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    call = call or default_call
    total = None if batches is None else 2 * batches

    def first(done: int, _: int | None) -> None:
        if progress is not None:
            progress(done, total)

    static = static_inspect(model)
    collection = collect(
        model, data, batches=batches, call=call, device=device, progress=first,
        process_group=process_group,
    )  # fmt: skip
    pop = population_stats(collection)
    precise_records, precise_arrays = layer_records(collection, pop)

    twin = copy.deepcopy(model)  # population statistics + batch statistics live here
    twin_layers = dict(twin.named_modules())
    targets: dict[str, _BatchNorm] = {}
    for name in pop:
        module = twin_layers["" if name == "(root)" else name]
        targets[name] = module
    spreads = {
        name: _Spread(
            MomentAccumulator(m.num_features, "cpu"), MomentAccumulator(m.num_features, "cpu")
        )
        for name, m in targets.items()
    }
    with torch.no_grad():
        for name, (mean, var) in pop.items():
            m = targets[name]
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    bn_twin = [m for m in twin.modules() if is_batchnorm(m)]
    for m in bn_twin:
        m.momentum = 0.0  # batch-statistics forwards must not move the twin's buffers

    tallies = {k: Tally() for k in ("running", "batch", "precise")}
    agree = {"batch": 0, "precise": 0}
    kl = {"batch": 0.0, "precise": 0.0}
    samples = done = 0
    labelled = classes = True
    active = [False]
    with (
        distributed.failures_announced(group),
        on_device(model, device) as dev,
        eval_mode(model),
        distributed.local_batchnorm(twin),
    ):
        twin.to(dev)
        for m in twin.modules():
            m.training = False
        with _spread_hooks(targets, spreads, active), torch.no_grad():
            for batch, labels in labelled_batches(data, batches, dev):
                with forward_errors(
                    f"the model failed on batch {done} of the comparison pass",
                    "check that --data fits the model; batches need 2+ samples",
                ):
                    ref = logits_of(call(model, batch))
                    pre = logits_of(call(twin, batch))
                    with _batch_stats(bn_twin, active):
                        bat = logits_of(call(twin, batch))
                n, is_cls, ok_labels = batch_kind(ref, labels)
                samples += n
                classes = classes and is_cls
                labelled = labelled and ok_labels
                for key, out in (("running", ref), ("batch", bat), ("precise", pre)):
                    if ok_labels:
                        tallies[key].add(out, labels)
                    if key != "running" and is_cls:
                        a, k = agreement_and_kl(ref, out)
                        agree[key] += a
                        kl[key] += k
                done += 1
                if progress is not None:
                    progress(collection.batches + done, total)
    del twin
    if group is not None:
        samples, labelled, classes = _reduce_pass(
            group, spreads, tallies, agree, kl, samples, labelled, classes
        )
    if samples == 0:
        raise DataError(
            "the data yielded no batches on its second reading",
            "pass a re-iterable (a DataLoader or a list of batches), not a generator",
        )
    metrics = {k: t.metrics(samples, labelled) for k, t in tallies.items()}
    consistency = {
        "samples": samples,
        "has_labels": labelled,
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        "agreement": {k: (agree[k] / samples if classes and samples else None) for k in agree},
        "kl": {k: (kl[k] / samples if classes and samples else None) for k in kl},
    }
    layers, arrays = _layer_records(collection, precise_records, precise_arrays, spreads)
    findings = _findings(layers, static, precise_records, consistency, metrics)
    verdict, verdict_text = _verdict(layers, consistency, metrics)
    extra = {
        "verdict": verdict,
        "verdict_text": verdict_text,
        "batches": collection.batches,
        "samples": collection.samples,
        "consistency": consistency,
        "static_layers": [layer.to_dict() for layer in static.layers],
    }
    return Report("inspect", None, tuple(layers), tuple(findings), extra, arrays)


def _reduce_pass(
    group: Any,
    spreads: dict[str, _Spread],
    tallies: dict[str, Tally],
    agree: dict[str, int],
    kl: dict[str, float],
    samples: int,
    labelled: bool,
    classes: bool,
) -> tuple[int, bool, bool]:
    """Pool the comparison pass over the ranks: batch-statistics spreads (exact moments) and
    every tally, in place; returns the pooled (samples, labelled, classes)."""
    from . import distributed

    accs = [a for sp in spreads.values() for a in (sp.means, sp.uvars)]
    distributed.all_reduce_moments(accs, group)
    empty = samples == 0
    values = [samples, 0 if (labelled or empty) else 1, 0 if (classes or empty) else 1]
    for key in ("running", "batch", "precise"):
        values += [tallies[key].n, tallies[key].correct, tallies[key].loss]
    values += [agree["batch"], agree["precise"], kl["batch"], kl["precise"]]
    flat = distributed.all_reduce_sum(torch.tensor(values, dtype=F64), group).tolist()
    i = 3
    for key in ("running", "batch", "precise"):
        t = tallies[key]
        t.n, t.correct, t.loss = int(flat[i]), int(flat[i + 1]), flat[i + 2]
        i += 3
    agree["batch"], agree["precise"] = int(flat[i]), int(flat[i + 1])
    kl["batch"], kl["precise"] = flat[i + 2], flat[i + 3]
    return int(flat[0]), flat[1] == 0, flat[2] == 0


@contextlib.contextmanager
def _batch_stats(layers: list[_BatchNorm], recording: list[bool]) -> Iterator[None]:
    """BN layers normalize with batch statistics (training flag) and the spread hooks record,
    for the block only."""
    try:
        for m in layers:
            m.training = True
        recording[0] = True
        yield
    finally:
        recording[0] = False
        for m in layers:
            m.training = False


def _layer_records(
    collection: Any,
    precise_records: list[Any],
    precise_arrays: dict[str, dict[str, Any]],
    spreads: dict[str, _Spread],
) -> tuple[list[InspectLayer], dict[str, dict[str, Any]]]:
    """Inspect records in module order from the Precise BN records (running vs population
    statistics and d_mu/d_var come from there) and the batch-statistics spreads."""
    records: list[InspectLayer] = []
    arrays: dict[str, dict[str, Any]] = {}
    for rec in precise_records:
        name = rec.name
        if rec.status == "skipped":
            records.append(InspectLayer(name, rec.num_features, "skipped", rec.reason))
            continue
        mod = collection.layers[name].module
        if rec.status != "updated":
            records.append(
                InspectLayer(name, rec.num_features, rec.status, rec.reason, mod.momentum)
            )
            continue
        pa = precise_arrays[name]
        mean_r, var_r, mean_p, var_p = pa["old_mean"], pa["old_var"], pa["new_mean"], pa["new_var"]
        d_mu, d_var = pa["d_mu"], pa["d_var"]
        sigma2 = var_p + mod.eps
        sp = spreads[name]
        factor = _ema_factor(mod)
        calls = sp.means.count
        var_mu_b = sp.means.population_var if calls else torch.zeros_like(mean_p)
        mean_uvar = sp.uvars.population_mean if calls else var_p
        var_uvar = sp.uvars.population_var if calls else torch.zeros_like(var_p)
        z_mu = z_var = noise_mu = spread_mu = spread_var = None
        if factor is not None and calls >= 2:
            z_mu = _z_rms(mean_r - mean_p, factor * var_mu_b, sigma2)
            z_var = _z_rms(var_r - mean_uvar, factor * var_uvar, sigma2**2)
            noise_mu = _median((factor * var_mu_b).sqrt() / sigma2.sqrt())
        if calls >= 2:
            spread_mu = _median(var_mu_b.sqrt() / sigma2.sqrt())
            spread_var = _median(var_uvar.sqrt() / mean_uvar.clamp_min(1e-30))
        zs = [z for z in (z_mu, z_var) if z is not None]
        if max(rec.d_mu_median, rec.d_var_median) <= MATERIAL_GAP:
            status = "ok"
        elif not zs:
            status = "unknown"
        else:
            status = "stale" if max(zs) > STALE_Z else "noisy"
        records.append(
            InspectLayer(
                name, rec.num_features, status, None, mod.momentum, rec.calls_per_forward, calls,
                rec.d_mu_max, rec.d_mu_median, rec.d_var_max, rec.d_var_median,
                z_mu, z_var, noise_mu, spread_mu, spread_var,
            )
        )  # fmt: skip
        worst = torch.argsort(d_mu, descending=True)[:TRACE_CHANNELS]
        trace = torch.stack(sp.trace) if sp.trace else torch.zeros(0, mod.num_features)
        arrays[name] = {
            "d_mu": d_mu,
            "d_var": d_var,
            "channels": worst,
            "batch_means": trace[:, worst],
            "running_mean": mean_r[worst],
            "population_mean": mean_p[worst],
            "population_sigma": sigma2[worst].sqrt(),
        }
    return records, arrays


def _gap(consistency: dict[str, Any], metrics: dict[str, Metrics]) -> str | None:
    """``"worse"`` when outputs with running statistics disagree with batch-statistics outputs
    and (with labels) are not better; ``"better"`` when eval mode is clearly the better one
    (noisy batch statistics, nothing to fix in eval); None when consistent."""
    agreement = consistency["agreement"]["batch"]
    acc_r, acc_b = metrics["running"].accuracy, metrics["batch"].accuracy
    if acc_r is not None and acc_b is not None:
        if acc_b - acc_r > TRAIN_TEST_ACCURACY:
            return "worse"
        if acc_r - acc_b > TRAIN_TEST_ACCURACY:
            return "better"
        if agreement is not None and agreement < TRAIN_TEST_AGREEMENT:
            return "worse" if acc_r < acc_b else "better"
        return None
    return "worse" if agreement is not None and agreement < TRAIN_TEST_AGREEMENT else None


def _precise_fix(metrics: dict[str, Metrics], consistency: dict[str, Any]) -> str:
    acc_r, acc_p = metrics["running"].accuracy, metrics["precise"].accuracy
    if acc_r is not None and acc_p is not None:
        return (
            f"bnscope precise CKPT --data TRAIN_DATA would change accuracy from {pct(acc_r)} "
            f"to {pct(acc_p)} on this data"
        )
    agree = consistency["agreement"]["precise"]
    tail = f" (it would change {pct(1 - agree)} of the predictions on this data)" if agree else ""
    return f"bnscope precise CKPT --data TRAIN_DATA recomputes exact statistics{tail}"


def _findings(
    layers: list[InspectLayer],
    static: Report,
    precise_records: list[Any],
    consistency: dict[str, Any],
    metrics: dict[str, Metrics],
) -> list[Finding]:
    never = {f.layer for f in static.findings if f.code == "never-updated"}
    out: list[Finding] = list(static.findings)
    fix = _precise_fix(metrics, consistency)
    for layer in layers:
        if layer.status == "stale" and layer.name not in never:
            z = max(z for z in (layer.z_mu, layer.z_var) if z is not None)
            out.append(
                Finding(
                    "stale-ema",
                    "warning",
                    layer.name,
                    f"running statistics are {layer.d_mu_median:.3g} sigma (median d_mu; "
                    f"d_var {layer.d_var_median:.3g}) from the population statistics of this "
                    f"model, {z:.1f}x the noise an EMA with momentum {layer.momentum} would "
                    "have: they describe an earlier state of the model",
                    fix,
                )
            )
        elif layer.status == "noisy":
            out.append(
                Finding(
                    "small-nbs",
                    "info",
                    layer.name,
                    f"running statistics are {layer.d_mu_median:.3g} sigma (median d_mu; d_var "
                    f"{layer.d_var_median:.3g}) from the population statistics, about what the "
                    f"EMA's noise at this batch size and momentum {layer.momentum} explains",
                    "bnscope precise averages over all the data instead of the last ~2/m "
                    "batches; or train with a lower momentum or larger normalization batches",
                )
            )
    out += usage_findings(
        precise_records,
        "check the forward: a layer defined but unused keeps statistics nobody updates",
    )
    gap = _gap(consistency, metrics)
    if gap is not None:
        m = metrics
        agree = consistency["agreement"]["batch"]
        if m["running"].accuracy is not None:
            what = (
                f"accuracy with batch statistics {pct(m['batch'].accuracy)}, with running "
                f"statistics {pct(m['running'].accuracy)}, with precise statistics "
                f"{pct(m['precise'].accuracy)}; "
            )
        else:
            what = ""
        stale = any(layer.status == "stale" for layer in layers)
        if gap == "better":
            severity, cause = (
                "info",
                (
                    "eval mode is the better one: batch statistics at this batch size are noisy, "
                    "so train-mode metrics understate the model"
                ),
            )
            gap_fix = "nothing to fix for evaluation; bnscope ghost shows the NBS curve"
        elif stale:
            severity, cause, gap_fix = "warning", "stale running statistics (see stale-ema)", fix
        else:
            severity, cause = (
                "warning",
                (
                    "the running statistics are not stale, so batch statistics at this batch size "
                    "differ from the population's"
                ),
            )
            gap_fix = (
                "compare normalization batch sizes with bnscope ghost; check that training "
                "batches are i.i.d. (shuffled)"
            )
        out.append(
            Finding(
                "train-test-gap",
                severity,
                None,
                f"outputs with batch statistics and with running statistics disagree ({what}"
                f"top-1 agreement {pct(agree)}): {cause}",
                gap_fix,
            )
        )
    return out


def _verdict(
    layers: list[InspectLayer], consistency: dict[str, Any], metrics: dict[str, Metrics]
) -> tuple[str, str]:
    stale = [layer.name for layer in layers if layer.status == "stale"]
    noisy = [layer.name for layer in layers if layer.status == "noisy"]
    analysed = [layer for layer in layers if layer.status not in ("not-called", "skipped")]
    acc = {k: v.accuracy for k, v in metrics.items()}
    accs = (
        f" Accuracy on this data: running statistics {pct(acc['running'])}, precise "
        f"statistics {pct(acc['precise'])}, batch statistics {pct(acc['batch'])}."
        if acc["running"] is not None
        else f" Top-1 agreement of running-statistics outputs with batch statistics "
        f"{pct(consistency['agreement']['batch'])}, with precise statistics "
        f"{pct(consistency['agreement']['precise'])}."
    )
    if stale:
        names = ", ".join(stale[:4]) + (", ..." if len(stale) > 4 else "")
        return "stale", (
            f"Stale running statistics: {len(stale)} of {len(analysed)} BN layers ({names}) "
            "are further from this model's population statistics than EMA noise explains; "
            f"run bnscope precise.{accs}"
        )
    if _gap(consistency, metrics) == "worse":
        return "gap", (
            "Train/test gap without stale statistics: batch statistics at this batch size "
            f"differ from the population's; see bnscope ghost.{accs}"
        )
    if noisy:
        return "noisy", (
            f"Running statistics are noisy ({len(noisy)} layers differ from the population by "
            f"about the EMA's own noise); bnscope precise removes that noise.{accs}"
        )
    return "healthy", (
        f"Running statistics match this model's population statistics within EMA noise.{accs}"
    )

"""Information leakage within a batch: how much a sample's train-mode output depends on which
other samples share its batch.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §6 ("Information Leakage within a
Batch"): with batch statistics, a sample's output is a function of the whole batch. When
training batches are not i.i.d. (all RoIs of one image in the R-CNN head, one class per
batch), the batch statistics carry information about the other samples; a model can learn to
exploit it and then fails in eval mode, where that information is gone.

:func:`leakage_analysis` takes the first ``samples`` samples of the data and puts them into
batches of the same size B in several arrangements (:mod:`bnscope.engine.regroup`): ``iid``
(a random order cut into batches, the reference), ``iid-2`` (another random order: the noise
floor) and one grouped arrangement per grouping (sorted by label or by a group key, groups in
random order). Every arrangement runs the model in the protocol of the ghost analysis: every
non-frozen BN layer normalizes with the statistics of its batch, every other module is in
eval mode, nothing is written. Each sample's output under an arrangement is compared with its
output under ``iid``:

    kl_i = sum_k (p_ik - q_ik) (log p_ik - log q_ik)        (symmetric KL of the softmaxes)
    l2_i = ||out_i - ref_i|| / sqrt(mean_j ||ref_j||^2)

and ``batch-leakage`` is raised when a grouping changes the outputs ``LEAK_RATIO`` times more
than ``iid-2`` does and changes ``LEAK_EXCESS`` more top-1 predictions (docs/statistics.md,
section 10). Per layer, the batch means under each arrangement are measured as the ghost
analysis measures a chunk (noise and effective sample size), against population statistics
collected with the ``iid`` batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from .. import findings
from ..engine import sync
from ..engine.collect import Call, Progress, collect
from ..engine.distributed import LOCAL
from ..engine.evaluate import (
    Scores,
    batch_kind,
    check_label_range,
    eval_mode,
    forward_errors,
    logits_of,
    read_scores,
    using_statistics,
)
from ..engine.regroup import LABEL, GroupSpec, Pool, grouped_order, iid_order, read_pool, spec_name
from ..engine.regroup import take as take_samples
from ..engine.runner import Runner, make_runner, placed
from ..errors import DataError, UsageError
from ..extras import LeakageArrangementDict, LeakageExtra, LeakageReport, LeakageVerdict
from ..records import (
    Finding,
    LeakageArrangement,
    LeakageLayer,
    LeakageLayerArrangement,
    Report,
    Status,
)
from .ghost import _NoiseProbe, ghost_forwards
from .precise import layer_eps, population_stats

#: samples re-batched by default: 64 batches of 32
DEFAULT_SAMPLES = 2048
#: ``batch-leakage`` when a grouping's mean per-sample change is at least this many times the
#: change between two i.i.d. arrangements ...
LEAK_RATIO = 2.0
#: ... and changes at least this fraction more top-1 predictions than they do (without class
#: scores: a relative L2 change this much larger)
LEAK_EXCESS = 0.01
#: batches each arrangement needs before a grouping is judged (the noise floor of fewer is
#: itself too noisy: docs/statistics.md, section 10.4)
MIN_BATCHES = 8

#: outputs count as independent of the batch when no sample's relative L2 change under any
#: arrangement reaches this (float rounding of differently shaped batches stays far below)
INDEPENDENT_TOL = 1e-6

#: the reference and noise arrangements
IID, IID_2 = "iid", "iid-2"

F64 = torch.float64


def parse_group_by(group_by: GroupSpec | Sequence[GroupSpec] | None) -> list[GroupSpec]:
    """Validate ``group_by``: ``"label"``, a key of dict batches, a function ``batch -> ids``,
    or several of them (a list, or a comma-separated string); names unique."""
    example = "e.g. group_by=label or group_by=label,image_id"
    if group_by is None:
        return []
    if isinstance(group_by, str):
        items: list[GroupSpec] = [p.strip() for p in group_by.split(",")]
        if any(not p for p in items):
            raise UsageError(f"group_by={group_by!r} has an empty name", example)
    elif callable(group_by):
        items = [group_by]
    else:
        items = list(group_by)
    out: list[GroupSpec] = []
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise UsageError("group_by= has an empty name", example)
            item = item.strip()
        elif not callable(item):
            raise UsageError(
                f"group_by= takes names and functions, got {type(item).__name__}", example
            )
        out.append(item)
    names = [spec_name(s) for s in out]
    for name in names:
        if name in (IID, IID_2):
            raise UsageError(f"group_by={name} is the name of an i.i.d. arrangement", example)
        if names.count(name) > 1:
            raise UsageError(f"group_by= names {name!r} twice", example)
    return out


def check_samples(samples: int | None) -> None:
    """Refuse a ``samples`` that is not None or an integer of at least 4 (2 batches of 2)."""
    _check_count(samples, "samples", 4, f"e.g. samples={DEFAULT_SAMPLES}")


def _check_count(value: int | None, name: str, low: int, example: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name}={value!r} is not an integer >= {low}", example)


def leakage_analysis(
    model: nn.Module,
    data: Iterable[Any],
    group_by: GroupSpec | Sequence[GroupSpec] | None = LABEL,
    batch_size: int | None = None,
    samples: int | None = DEFAULT_SAMPLES,
    *,
    groups: Mapping[str, Any] | Sequence[Any] | torch.Tensor | None = None,
    seed: int = 0,
    call: Call | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    num_classes: int | None = None,
) -> LeakageReport:
    """How much the model's train-mode outputs depend on which samples share a batch: the
    same samples in i.i.d. batches and in batches grouped by label or by a group key.

    ``group_by``: ``"label"`` (the batches' labels), the name of a key of dict batches
    (``"image_id"``: one id per sample, a 1-D integer tensor or a list), a function
    ``batch -> ids``, or a list of them. ``groups``: per-sample ids of the data in the order
    it yields its samples (a tensor or a list; a dict name -> ids for several), one more
    grouping each. ``batch_size`` is the normalization batch size of every arrangement
    (default: the largest batch the data yields); ``samples`` the samples read from the data
    (None: all of it; they are held in host memory) and re-batched, cut to a whole number of
    batches. ``seed`` fixes the arrangements. ``call``, ``device``, ``amp``,
    ``channels_last``, ``input_key`` and ``num_classes`` as in :func:`bnscope.ghost_analysis`.

    The model is run 3 + len(groupings) times over the samples (population statistics with
    the ``iid`` batches, then each arrangement); it is left exactly as it was. Under
    ``torch.distributed`` each process analyses its own samples. Returns a ``leakage``
    report: :class:`~bnscope.records.LeakageLayer` records in module order, the
    ``batch-leakage`` findings and ``extra["arrangements"]`` (one
    :class:`~bnscope.records.LeakageArrangement` dict each); ``arrays["leakage"]`` holds each
    arrangement's order of the samples and the per-sample changes.
    """
    specs = parse_group_by(group_by)
    given = _given_groups(groups)
    names = [spec_name(s) for s in specs] + list(given)
    if not names:
        raise UsageError(
            "no grouping to compare with i.i.d. batches", "pass group_by=label or groups="
        )
    if len(set(names)) < len(names):
        raise UsageError("groups= repeats a group_by= name", "give every grouping its own name")
    _check_count(batch_size, "batch_size", 2, "e.g. batch_size=32")
    check_samples(samples)
    runner = make_runner(model, call, device, amp, channels_last, input_key)
    pool = read_pool(data, runner, samples, specs, given)
    size = batch_size if batch_size is not None else pool.largest_batch
    if size < 2:
        raise DataError(
            f"the data's batches hold {size} sample: batch statistics need 2 or more",
            "pass batch_size=2 or more",
        )
    nb = pool.size // size
    if nb < 2:
        raise DataError(
            f"{pool.size} samples make fewer than 2 batches of {size}",
            "pass a larger samples= (or more data), or a smaller batch_size=",
        )
    used = nb * size
    orders = {IID: iid_order(used, seed), IID_2: iid_order(used, seed + 1)}
    for j, name in enumerate(names):
        orders[name] = grouped_order(pool.codes[name][:used], seed + 2 + j)
    total = nb * (1 + len(orders))
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    if progress is not None:
        progress(0, total)
    with placed(model, runner):
        collection = collect(
            model, _batches(pool, orders[IID], size, tick), call=runner.call,
            device=runner.device, process_group=LOCAL, amp=runner.amp,
            channels_last=runner.channels_last, input_key=input_key,
        )  # fmt: skip
        measured = _run_arrangements(
            model, pool, orders, size, runner, collection, tick, num_classes
        )
    return _report(collection, pool, orders, size, names, seed, measured)


def _given_groups(groups: Any) -> dict[str, Any]:
    if groups is None:
        return {}
    if isinstance(groups, Mapping):
        out = dict(groups)
        for name in out:
            if not isinstance(name, str) or not name or name in (IID, IID_2):
                raise UsageError(
                    f"groups= names a grouping {name!r}", "name groupings with plain strings"
                )
        return out
    return {"groups": groups}


def _batches(
    pool: Pool, order: torch.Tensor, size: int, tick: Callable[[], None]
) -> Iterator[Any]:
    for index in order.view(-1, size):
        yield take_samples(pool.batch, index)
        tick()


class _Outputs:
    """Per-sample figures of one arrangement against the reference, on the device (read once
    at the end): symmetric KL (class scores), squared output difference, equal top-1."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.kl = torch.zeros(n, dtype=F64, device=device)
        self.diff2 = torch.zeros(n, dtype=F64, device=device)
        self.agree = torch.zeros(n, dtype=F64, device=device)


def _flat(out: torch.Tensor, n: int) -> torch.Tensor:
    if out.ndim == 0 or out.shape[0] != n:
        raise DataError(
            f"the model's output has shape {tuple(out.shape)} for a batch of {n} samples: the "
            "leakage analysis compares outputs sample by sample",
            "pass call= that returns one output row per sample (the logits)",
        )
    flat = out.detach().reshape(n, -1)
    return flat if flat.dtype in (torch.float32, F64) else flat.float()


def _run_arrangements(
    model: nn.Module,
    pool: Pool,
    orders: dict[str, torch.Tensor],
    size: int,
    runner: Runner,
    collection: Any,
    tick: Callable[[], None],
    num_classes: int | None,
) -> dict[str, Any]:
    """Every arrangement's forwards: per-sample changes against ``iid``, scores, probes."""
    pop = {
        name: stats
        for name, stats in population_stats(collection).items()
        if not collection.layers[name].frozen
    }
    targets = {name: collection.layers[name].module for name in pop}
    probes = {
        arr: {
            name: _NoiseProbe(mean, var, layer_eps(targets[name]), size)
            for name, (mean, var) in pop.items()
        }
        for arr in orders
    }
    population = {
        targets[name]: (
            mean.to(collection.layers[name].running_mean.dtype),
            var.to(collection.layers[name].running_var.dtype),
        )
        for name, (mean, var) in pop.items()
    }
    used = orders[IID].numel()
    ref: torch.Tensor | None = None
    per: dict[str, _Outputs] = {}
    scores = {arr: Scores() for arr in orders}
    classes = labelled = True
    unchunked: set[str] = set()
    with eval_mode(model), using_statistics(population), torch.no_grad():
        for arr, order in orders.items():
            for b, index in enumerate(order.view(-1, size)):
                batch = runner.prepare(take_samples(pool.batch, index))
                labels = runner.labels(batch)
                with (
                    forward_errors(
                        f"the model failed on batch {b} of the {arr} arrangement",
                        "check that data= fits the model",
                    ),
                    ghost_forwards(targets, size, probes[arr]) as counts,
                ):
                    out = logits_of(runner(model, batch))
                unchunked.update(n for n, (c, hit) in counts.items() if hit < c)
                n, is_cls, ok_labels = batch_kind(out, labels, num_classes)
                classes = classes and is_cls
                labelled = labelled and ok_labels
                scores[arr].add(out, labels=labels if ok_labels else None)
                flat = _flat(out, index.numel())
                idx = index.to(flat.device)
                if ref is None:
                    ref = torch.zeros(used, flat.shape[1], dtype=flat.dtype, device=flat.device)
                if arr == IID:
                    ref[idx] = flat
                else:
                    if arr not in per:
                        per[arr] = _Outputs(used, flat.device)
                    _compare(per[arr], idx, ref[idx], flat, is_cls)
                tick()
    assert ref is not None
    read_scores(scores.values())
    check_label_range(scores[IID])
    host = sync.fetch(
        [ref.double().square().sum()]
        + [t for o in per.values() for t in (o.kl, o.diff2, o.agree)]
        + [p.sums for ps in probes.values() for p in ps.values()]
    )
    ref2 = float(host[0]) / used
    figures: dict[str, dict[str, torch.Tensor]] = {}
    for i, arr in enumerate(per):
        kl, diff2, agree = host[1 + 3 * i : 4 + 3 * i]
        rms = math.sqrt(ref2)
        l2 = diff2.sqrt() / rms if rms > 0 else diff2.sqrt()
        figures[arr] = {"kl": kl, "l2": l2, "agree": agree}
    offset = 1 + 3 * len(per)
    layer_results: dict[str, dict[str, Any]] = {}
    for arr, ps in probes.items():
        for name, p in ps.items():
            layer_results.setdefault(name, {})[arr] = p.result(size, host[offset])
            offset += 1
    return {
        "figures": figures,
        "scores": scores,
        "classes": classes,
        "labelled": labelled,
        "layers": layer_results,
        "unchunked": unchunked,
    }


def _compare(
    acc: _Outputs, idx: torch.Tensor, ref: torch.Tensor, out: torch.Tensor, is_cls: bool
) -> None:
    """One batch: each sample's symmetric KL, squared difference and top-1 equality against
    its reference output."""
    diff = out.to(F64) - ref.to(F64)
    acc.diff2[idx] = diff.square().sum(1)
    if is_cls:
        log_p = F.log_softmax(ref.to(F64), 1)
        log_q = F.log_softmax(out.to(F64), 1)
        acc.kl[idx] = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(1)
        acc.agree[idx] = (ref.argmax(1) == out.argmax(1)).to(F64)


def _median(values: torch.Tensor) -> float:
    """The usual median (the mean of the two middle values for an even count)."""
    return float(values.quantile(0.5)) if values.numel() else 0.0


def _report(
    collection: Any,
    pool: Pool,
    orders: dict[str, torch.Tensor],
    size: int,
    names: list[str],
    seed: int,
    measured: dict[str, Any],
) -> LeakageReport:
    used = orders[IID].numel()
    nb = used // size
    figures = measured["figures"]
    scores: dict[str, Scores] = measured["scores"]
    classes: bool = measured["classes"]
    labelled: bool = measured["labelled"]
    metric = "kl" if classes else "l2"
    noise = figures[IID_2]
    noise_change = float(noise[metric].mean())
    noise_flips = 1 - float(noise["agree"].mean()) if classes else None
    batch_dependent = any(float(f["l2"].max()) >= INDEPENDENT_TOL for f in figures.values())

    rows: list[LeakageArrangement] = []
    for arr in orders:
        metrics = scores[arr].metrics(used, labelled)
        row: dict[str, Any] = dict(
            name=arr, role="reference" if arr == IID else "noise" if arr == IID_2 else "grouped",
            group_by=None, groups=None, largest_group=None, single_group_batches=None,
            accuracy=metrics.accuracy, loss=metrics.loss,
            agreement=1.0 if classes else None, kl_mean=0.0 if classes else None,
            kl_median=0.0 if classes else None, l2_mean=0.0, l2_median=0.0, ratio=None,
            excess=None, greater_fraction=None, leak=None,
        )  # fmt: skip
        if arr != IID:
            fig = figures[arr]
            row.update(
                agreement=float(fig["agree"].mean()) if classes else None,
                kl_mean=float(fig["kl"].mean()) if classes else None,
                kl_median=_median(fig["kl"]) if classes else None,
                l2_mean=float(fig["l2"].mean()),
                l2_median=_median(fig["l2"]),
            )
        if arr not in (IID, IID_2):
            codes = pool.codes[arr][:used]
            counts = torch.bincount(codes)
            batches = codes[orders[arr]].view(-1, size)
            single = int((batches == batches[:, :1]).all(1).sum())
            change = float(figures[arr][metric].mean())
            ratio = _ratio(change, noise_change)
            if classes:
                assert noise_flips is not None
                excess = (1 - float(figures[arr]["agree"].mean())) - noise_flips
            else:
                excess = change - noise_change
            greater = float((figures[arr][metric] > noise[metric]).to(F64).mean())
            leak = (
                batch_dependent
                and nb >= MIN_BATCHES
                and ratio is not None
                and ratio >= LEAK_RATIO
                and excess >= LEAK_EXCESS
            )
            row.update(
                group_by=arr, groups=int((counts > 0).sum()), largest_group=int(counts.max()),
                single_group_batches=single, ratio=ratio, excess=excess,
                greater_fraction=greater, leak=leak,
            )  # fmt: skip
        rows.append(LeakageArrangement(**row))

    layers = _layers(collection, measured, list(orders))
    found = _findings(rows, layers, metric, noise_change, noise_flips, size)
    verdict, text = _verdict(rows, batch_dependent, size, nb)
    extra: LeakageExtra = {
        "verdict": verdict,
        "verdict_text": text,
        "group_by": names,
        "batch_size": size,
        "samples": used,
        "left_out": pool.size - used,
        "batches": nb,
        "seed": seed,
        "metric": metric,
        "ratio_threshold": LEAK_RATIO,
        "excess_threshold": LEAK_EXCESS,
        "has_labels": labelled,
        "forwards": collection.batches + nb * len(orders),
        "arrangements": [cast(LeakageArrangementDict, r.to_dict()) for r in rows],
    }
    arrays: dict[str, dict[str, Any]] = {
        "leakage": {
            "orders": dict(orders),
            "change": {arr: f[metric] for arr, f in figures.items()},
            "kl": {arr: f["kl"] for arr, f in figures.items()} if classes else {},
            "l2": {arr: f["l2"] for arr, f in figures.items()},
        }
    }
    return Report(
        command="leakage",
        checkpoint=None,
        layers=tuple(layers),
        findings=tuple(found),
        extra=extra,
        arrays=arrays,
    )


def _ratio(change: float, noise: float) -> float | None:
    if noise > 0:
        return change / noise
    return math.inf if change > 0 else None


def _layers(collection: Any, measured: dict[str, Any], arrangements: list[str]) -> list[Any]:
    results: dict[str, dict[str, Any]] = measured["layers"]
    out: list[LeakageLayer] = []
    for name, st in collection.layers.items():
        head = dict(name=name, num_features=st.num_features)
        if st.frozen:
            out.append(
                LeakageLayer(
                    **head, status=Status.SKIPPED,
                    reason=f"frozen BN ({type(st.module).__name__}): it normalizes with its "
                    "stored statistics whatever the batch",
                )  # fmt: skip
            )
        elif name in measured["unchunked"]:
            out.append(
                LeakageLayer(
                    **head, status=Status.SKIPPED,
                    reason="its forward makes no batch_norm call with its running statistics, "
                    "so it cannot be given batch statistics (it normalized with population "
                    "statistics)",
                )  # fmt: skip
            )
        elif name in results:
            rows = tuple(
                LeakageLayerArrangement(
                    arrangement=arr,
                    noise_mu=results[name][arr].noise_mu,
                    effective_size=results[name][arr].effective_size,
                )
                for arr in arrangements
            )
            out.append(
                LeakageLayer(
                    **head, status=Status.ANALYSED, calls_per_forward=st.max_calls_per_forward,
                    arrangements=rows,
                )  # fmt: skip
            )
        else:
            out.append(
                LeakageLayer(**head, status=Status.NOT_CALLED, reason="never ran on the data")
            )
    for sk in collection.skipped:
        out.append(
            LeakageLayer(
                name=sk.name, num_features=sk.num_features, status=Status.SKIPPED, reason=sk.reason
            )
        )
    return collection.in_module_order(out)


def spread_ratio(layer: LeakageLayer, arr: str) -> float | None:
    """How much more a layer's batch means vary under ``arr`` than in the ``iid`` batches:
    effective size under ``iid`` over effective size under ``arr`` (section 10.5), the ratio
    of the variances of the batch means (about 1 when the grouping says nothing about the
    layer's features)."""
    by = {r.arrangement: r.effective_size for r in layer.arrangements}
    grouped, iid = by.get(arr), by.get(IID)
    if grouped is None or iid is None or grouped <= 0:
        return None
    return iid / grouped


def _most_grouped(layers: list[LeakageLayer], arr: str) -> tuple[str | None, float | None]:
    """The analysed layer whose batch means carry the grouping ``arr`` most: the largest
    :func:`spread_ratio`."""
    best: tuple[float, str] | None = None
    for layer in layers:
        if layer.status != Status.ANALYSED:
            continue
        ratio = spread_ratio(layer, arr)
        if ratio is not None and (best is None or ratio > best[0]):
            best = (ratio, layer.name)
    return (best[1], best[0]) if best is not None else (None, None)


def _findings(
    rows: list[LeakageArrangement],
    layers: list[LeakageLayer],
    metric: str,
    noise_change: float,
    noise_flips: float | None,
    size: int,
) -> list[Finding]:
    iid = rows[0]
    out: list[Finding] = []
    for row in rows:
        if not row.leak:
            continue
        assert row.ratio is not None and row.group_by is not None
        layer, spread = _most_grouped(layers, row.name)
        change = row.kl_mean if metric == "kl" else row.l2_mean
        out.append(
            findings.batch_leakage(
                row.group_by, layer, metric=metric, change=float(change or 0.0),
                noise=noise_change, ratio=row.ratio,
                flips=None if row.agreement is None else 1 - row.agreement,
                noise_flips=noise_flips, accuracy=row.accuracy, iid_accuracy=iid.accuracy,
                spread_ratio=spread,
            )
        )  # fmt: skip
    return out


def _verdict(
    rows: list[LeakageArrangement], batch_dependent: bool, size: int, batches: int
) -> tuple[LeakageVerdict, str]:
    grouped = [r for r in rows if r.role == "grouped"]
    leaked = [(r.name, r.ratio) for r in grouped if r.leak]
    clean = [(r.name, r.ratio) for r in grouped if not r.leak]
    verdict: LeakageVerdict = (
        "independent" if not batch_dependent else "leak" if leaked else "none"
    )
    text = findings.leakage_verdict(
        verdict, leaked, clean, ratio_threshold=LEAK_RATIO, excess_threshold=LEAK_EXCESS,
        batch_size=size, batches=batches, min_batches=MIN_BATCHES,
    )  # fmt: skip
    return verdict, text

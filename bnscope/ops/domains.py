"""Adaptive BN on several target domains: one set of BN statistics per domain, and how the
domains differ layer by layer.

Multi-domain models keep separate BN statistics for each domain (Chang et al. 2019,
domain-specific BN; Xie et al. 2020, AdvProp's auxiliary BN; Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", section 5). :func:`adapt_domains` runs :func:`~bnscope.ops.adapt.adapt_bn`
once per domain, each time from the model's own (source) statistics, keeps what each run
wrote, and puts the model's statistics back. Per layer it compares the source statistics and
every domain's pure target statistics pairwise with the symmetric KL divergence of the
per-channel Gaussians (:func:`~bnscope.ops.adapt.symmetric_kl`, the figure of the
``domain-shift`` rule), summarized by the median over channels: a matrix per layer
(docs/statistics.md, section 4.3).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import findings
from ..engine.capture import is_batchnorm, is_frozen_batchnorm
from ..engine.collect import Call, Progress, expected_batches
from ..errors import BnscopeError, UsageError
from ..extras import AdaptReport, DomainDict, DomainsExtra, DomainsReport
from ..records import DomainLayer, Finding, Report, Status, layer_label, module_name
from .adapt import (
    SHIFT_KL,
    adapt_bn,
    check_first_layers,
    check_only,
    check_source_prior,
    symmetric_kl,
)
from .precise import layer_eps

#: a domain name: it goes into file names (``ckpt.adapted.<name>.pt``) and the labels of the
#: divergence matrix, so letters, digits, ``_`` and ``-`` only, a letter or digit first
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: names a domain cannot have: the matrix's source row, the split checkpoint's tag
RESERVED_NAMES = ("source", "split")
#: the row and column of the source statistics in every divergence matrix
SOURCE = "source"
#: a layer's status over the domains: the first of these that any domain gives it
STATUS_ORDER = (Status.UPDATED, Status.KEPT, Status.FROZEN, Status.NOT_CALLED, Status.SKIPPED)
_NAME_RULE = "letters, digits, _ and - only, a letter or digit first, at most 64 characters"


def check_domain_names(names: Iterable[object]) -> list[str]:
    """The domain names, validated: at least one; each a usable file-name part
    (:data:`DOMAIN_NAME`), not ``source`` or ``split``, and no two equal ignoring case (they
    name files, and some file systems ignore case)."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
            raise UsageError(
                f"domains=: {name!r} is not a usable domain name (it names files: {_NAME_RULE})",
                "e.g. domains=fog=corrupted/fog",
            )
        if name.lower() in RESERVED_NAMES:
            raise UsageError(
                f"domains=: a domain cannot be named {name!r} (the source statistics and the "
                "split checkpoint use that name)",
                "choose another name, e.g. domains=target=DATA",
            )
        if name.lower() in seen:
            raise UsageError(
                f"domains=: the domain name {name!r} is given twice"
                + (f" (as {seen[name.lower()]!r}; names that differ only in case name the same "
                   "files on some systems)" if seen[name.lower()] != name else ""),
                "give each domain its own name",
            )  # fmt: skip
        seen[name.lower()] = name
        out.append(name)
    if not out:
        raise UsageError("domains= is empty", "e.g. domains=fog=corrupted/fog")
    return out


def parse_domains(domains: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """``domains`` as ``name -> data``, names validated (:func:`check_domain_names`), in the
    order given. A mapping is taken as it is (values: data specs or iterables of batches); a
    sequence of strings holds ``NAME=SPEC`` items (the name is what comes before the first
    ``=``) or bare ``SPEC`` items, named after the spec's last path component without its
    suffix (``corrupted/fog`` -> ``fog``, ``target.pt`` -> ``target``)."""
    if isinstance(domains, Mapping):
        items = dict(domains)
        check_domain_names(items)
        return items
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise UsageError(
            f"domains= must map names to data, or be a list of NAME=SPEC items, got "
            f"{type(domains).__name__}",
            'e.g. domains={"fog": "corrupted/fog", "snow": "corrupted/snow"}',
        )
    parsed: dict[str, Any] = {}
    names: list[str] = []
    for item in domains:
        text = str(item)
        name, sep, spec = text.partition("=")
        if not sep:
            spec = text
            last = Path(text.rstrip("/\\")).name
            name = "" if ":" in last else Path(last).stem  # a factory spec names no file
            if not DOMAIN_NAME.fullmatch(name):
                raise UsageError(
                    f"domains=: no domain name can be made from {text!r} ({_NAME_RULE})",
                    f"name it: domains=NAME={text}",
                )
        if not spec:
            raise UsageError(f"domains=: {text!r} names no data", "e.g. domains=fog=corrupted/fog")
        names.append(name)
        parsed[name] = spec
    check_domain_names(names)
    return parsed


_DATA_PARAMETER = re.compile(r"(?<![\w.-])data=")


def in_domain_error(exc: BnscopeError, domain: str) -> BnscopeError:
    """``exc``, raised while reading or running ``domain``'s data, led by the domain
    (``domains=NAME: ...``), its mentions of ``data=`` (the data of that domain) spoken as
    ``domains=``. The same exception object, changed, so its type and traceback stay."""
    exc.message = f"domains={domain}: " + _DATA_PARAMETER.sub("domains=", exc.message)
    if exc.fix:
        exc.fix = _DATA_PARAMETER.sub("domains=", exc.fix)
    return exc


def _bn_buffers(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics buffers of every BN layer (frozen ones too), by layer label."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not (is_batchnorm(module) or is_frozen_batchnorm(module)):
            continue
        buffers = {
            key: value
            for key in ("running_mean", "running_var", "num_batches_tracked")
            if isinstance(value := module._buffers.get(key), torch.Tensor)
        }
        if "running_mean" in buffers and "running_var" in buffers:
            out[layer_label(name)] = buffers
    return out


def _copies(buffers: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        layer: {key: t.detach().clone() for key, t in parts.items()}
        for layer, parts in buffers.items()
    }


def _restore(
    buffers: dict[str, dict[str, torch.Tensor]], saved: dict[str, dict[str, torch.Tensor]]
) -> None:
    with torch.no_grad():
        for layer, parts in buffers.items():
            for key, tensor in parts.items():
                tensor.copy_(saved[layer][key])


def adapt_domains(
    model: nn.Module,
    domains: Mapping[str, Iterable[Any]],
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
) -> DomainsReport:
    """Adaptive BN on each target domain of ``domains`` (name -> iterable of batches)
    separately: one set of BN statistics per domain, and how the domains differ.

    Each domain runs :func:`~bnscope.ops.adapt.adapt_bn` with the same options (``prior``,
    ``batches`` per domain, ``only``, ``first_layers``, ``include_frozen`` ...) starting from
    the model's statistics as they were (the source statistics, which a prior mixes in), so
    the domains do not depend on each other or on their order. The model's BN buffers are
    restored at the end, also on an error: the model keeps its source statistics. What each
    domain's run wrote is in the report's ``arrays`` (:func:`domain_state_dict` gives a
    domain's statistics as a state dict, to ``load_state_dict(..., strict=False)`` into the
    model or to :func:`bnscope.nn.load_domain_statistics` into a split model).

    The report (command ``adapt``): ``layers`` holds a :class:`~bnscope.records.DomainLayer`
    per BN layer (module order) with the matrix of median symmetric KL between the source and
    the domains (labels in ``extra["divergence_labels"]``); ``extra["domains"]`` each domain's
    adapt records; ``extra["divergence"]`` the median over layers of the matrices. Findings:
    each domain's (``domain-shift``, ``not-called`` ..., the message led by the domain's name)
    and ``domain-divergence`` for a layer where the most divergent pair of domains has a
    median symmetric KL above ``shift_threshold`` (docs/statistics.md, section 4.3). An error
    in a domain's run names the domain (``domains=NAME: ...``); nothing of any domain is kept.

    ``call``, ``device``, ``progress`` (counting the batches of every domain in turn),
    ``process_group`` and the others are those of :func:`~bnscope.ops.adapt.adapt_bn`.
    """
    names = check_domain_names(domains)
    check_source_prior(prior)
    check_only(only)
    check_first_layers(first_layers)
    buffers = _bn_buffers(model)
    source = _copies(buffers)
    runs: dict[str, AdaptReport] = {}
    written: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    counted = _Counted(progress, [domains[n] for n in names], batches)
    try:
        for name in names:
            _restore(buffers, source)
            try:
                run = adapt_bn(
                    model, domains[name], prior, batches, call=call, device=device,
                    progress=counted.next_domain(), only_training=only_training,
                    shift_threshold=shift_threshold, process_group=process_group, amp=amp,
                    channels_last=channels_last, input_key=input_key,
                    include_frozen=include_frozen, only=only, first_layers=first_layers,
                )  # fmt: skip
            except BnscopeError as exc:
                raise in_domain_error(exc, name) from None
            runs[name] = run
            updated = {r.name for r in run.layers if r.status == Status.UPDATED}
            written[name] = _copies({k: v for k, v in buffers.items() if k in updated})
    finally:
        _restore(buffers, source)
    modules = dict(model.named_modules())
    layers = _domain_layers(runs, names, modules, shift_threshold)
    found: list[Finding] = [
        findings.in_domain(f, name) for name in names for f in runs[name].findings
    ]
    found += [
        findings.domain_divergence(rec.name, rec.pair[0], rec.pair[1], rec.pair_kl, shift_threshold)
        for rec in layers
        if rec.pair is not None and rec.pair_kl is not None and rec.pair_kl > shift_threshold
    ]
    arrays: dict[str, dict[str, Any]] = {
        layer: {SOURCE: parts, **{n: written[n][layer] for n in names if layer in written[n]}}
        for layer, parts in source.items()
    }
    first = runs[names[0]].extra
    extra: DomainsExtra = {
        "domains": [_domain_entry(name, runs[name]) for name in names],
        "divergence_labels": [SOURCE, *names],
        "divergence": _median_matrix(layers, len(names) + 1),
        "prior": prior,
        "shift_threshold": shift_threshold,
        "only": first["only"],
        "first_layers": first["first_layers"],
    }
    if "world_size" in first:
        extra["world_size"] = first["world_size"]
    return Report(
        command="adapt",
        checkpoint=None,
        layers=tuple(layers),
        findings=tuple(found),
        extra=extra,
        arrays=arrays,
    )


class _Counted:
    """One ``progress`` over every domain's batches: each domain's counts continue from the
    previous domains', against the total of all domains when each one's is known."""

    def __init__(
        self, progress: Progress | None, data: list[Iterable[Any]], batches: int | None
    ) -> None:
        self.progress = progress
        self.offset = 0
        self.last = 0
        self.total: int | None = None
        if progress is not None:
            totals = [expected_batches(d, batches) for d in data]
            if all(t is not None for t in totals):
                self.total = sum(t for t in totals if t is not None)

    def next_domain(self) -> Progress | None:
        if self.progress is None:
            return None
        self.offset += self.last
        self.last = 0
        report = self.progress

        def progress(done: int, total: int | None) -> None:
            self.last = done
            report(self.offset + done, self.total)

        return progress


def _domain_entry(name: str, run: AdaptReport) -> DomainDict:
    return {
        "name": name,
        "batches": run.extra["batches"],
        "samples": run.extra["samples"],
        "label_mix": run.extra["label_mix"],
        "layers": [r.to_dict() for r in run.layers],
    }


def _domain_layers(
    runs: dict[str, AdaptReport],
    names: list[str],
    modules: dict[str, nn.Module],
    threshold: float,
) -> list[DomainLayer]:
    """One record per BN layer (the first domain's module order, which every run shares)."""
    by_domain = {n: {r.name: r for r in runs[n].layers} for n in names}
    out: list[DomainLayer] = []
    for rec in runs[names[0]].layers:
        per = [by_domain[n][rec.name] for n in names]
        status = next(s for s in STATUS_ORDER if any(r.status == s for r in per))
        reason = next(r.reason for r in per if r.status == status)
        matrix = _matrix(rec.name, runs, names, modules)
        pair, pair_kl = _most_divergent(matrix, names)
        out.append(
            DomainLayer(
                name=rec.name,
                num_features=rec.num_features,
                status=status,
                reason=reason,
                divergence=matrix,
                pair=pair,
                pair_kl=pair_kl,
            )
        )
    return out


def _matrix(
    layer: str, runs: dict[str, AdaptReport], names: list[str], modules: dict[str, nn.Module]
) -> tuple[tuple[float | None, ...], ...] | None:
    """The layer's (D+1) x (D+1) matrix of median symmetric KL: source first, then the
    domains' pure target statistics (float64, variances + eps); None when no domain measured
    the layer."""
    measured = [runs[n].arrays.get(layer) for n in names]
    present = [a for a in measured if a is not None]
    if not present:
        return None
    eps = layer_eps(modules[module_name(layer)])
    gaussians: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        (present[0]["source_mean"], present[0]["source_var"] + eps)
    ]
    gaussians += [
        None if a is None else (a["target_mean"], a["target_var"] + eps) for a in measured
    ]
    size = len(gaussians)
    rows: list[list[float | None]] = [[None] * size for _ in range(size)]
    for i, gi in enumerate(gaussians):
        if gi is None:
            continue
        rows[i][i] = 0.0
        for j in range(i + 1, size):
            gj = gaussians[j]
            if gj is None:
                continue
            kl = float(symmetric_kl(gi[0], gi[1], gj[0], gj[1]).median())
            rows[i][j] = rows[j][i] = kl
    return tuple(tuple(row) for row in rows)


def _most_divergent(
    matrix: tuple[tuple[float | None, ...], ...] | None, names: list[str]
) -> tuple[tuple[str, str] | None, float | None]:
    """The pair of target domains (not the source) with the largest entry, and the entry."""
    best: tuple[tuple[str, str] | None, float | None] = (None, None)
    if matrix is None:
        return best
    for i in range(1, len(matrix)):
        for j in range(i + 1, len(matrix)):
            value = matrix[i][j]
            if value is not None and (best[1] is None or value > best[1]):
                best = ((names[i - 1], names[j - 1]), value)
    return best


def _median_matrix(layers: list[DomainLayer], size: int) -> list[list[float | None]]:
    """Entrywise median over the layers that have the entry (the usual median: the mean of
    the two middle values for an even count); None where no layer has it."""
    out: list[list[float | None]] = []
    for i in range(size):
        row: list[float | None] = []
        for j in range(size):
            values = [
                v
                for rec in layers
                if rec.divergence is not None and (v := rec.divergence[i][j]) is not None
            ]
            row.append(statistics.median(values) if values else None)
        out.append(row)
    return out


def domain_state_dict(report: Report, domain: str) -> dict[str, torch.Tensor]:
    """The BN statistics ``domain`` ends with, as a state dict of the model the report was
    made on: ``<module>.running_mean``, ``.running_var`` and ``.num_batches_tracked`` (where
    the layer has one) of every BN layer, the domain's statistics where its run updated the
    layer and the source statistics elsewhere; ``domain="source"`` gives the source
    statistics. For :func:`adapt_domains` reports (``report.arrays``); tensors on the
    buffers' device, copies."""
    if not any(SOURCE in parts for parts in report.arrays.values()):
        raise UsageError(
            "this report holds no per-domain statistics (it is not from adapt_domains)",
            "pass the report adapt_domains returned",
        )
    names = [entry["name"] for entry in report.extra.get("domains", [])]
    if domain != SOURCE and domain not in names:
        raise UsageError(
            f"domain={domain!r} is not a domain of this report (domains: {', '.join(names)})",
            "pass one of its domain names, or source",
        )
    state: dict[str, torch.Tensor] = {}
    for layer, parts in report.arrays.items():
        chosen = parts.get(domain, parts[SOURCE])
        name = module_name(layer)
        base = f"{name}." if name else ""
        for key, tensor in chosen.items():
            state[base + key] = tensor.clone()
    return state

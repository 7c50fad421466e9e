"""rich tables for reports. Each function takes a record (or plain data) and returns a
renderable; the CLI decides where it goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from ..records import Finding, Report, StaticLayer, severity_rank
from .fit import NARROWEST_TEXT, Col, FitTable, Names, names_cell
from .text import num, pct, percent, prior_text, span

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def static_layers_table(layers: Sequence[StaticLayer]) -> FitTable:
    """One row per BN layer: channels, updates, EMA init weight, ranges, dead channels. On a
    narrow console ``#``, dead, tracked, C, gain, running_mean, running_var and EMA init wt
    are hidden, in this order, as far as needed (the layer name stays)."""
    table = FitTable(
        Col("#", style="dim", drop=1),
        Col("layer", kind="name", justify="left"),
        Col("C", drop=4),
        Col("tracked", drop=3),
        Col("EMA init wt", drop=8),
        Col("running_mean", drop=6),
        Col("running_var", drop=7),
        Col("gain", drop=5),
        Col("dead", drop=2),
        title="BatchNorm layers",
    )
    for i, rec in enumerate(layers):
        tracked = "n/a" if rec.num_batches_tracked is None else str(rec.num_batches_tracked)
        table.add_row(
            str(i),
            f"{rec.name} (frozen)" if rec.frozen else rec.name,
            str(rec.num_features),
            tracked,
            percent(rec.ema_init_weight),
            span(rec.mean_min, rec.mean_max),
            span(rec.var_min, rec.var_max),
            span(rec.gain_min, rec.gain_max),
            str(rec.dead_channels) if rec.dead_channels else "-",
        )
    return table


@dataclass(frozen=True)
class FindingGroup:
    """Findings that read the same (code, severity, message and fix), with their layers in
    report order; a finding without a layer is a group of its own kind (``layers == ()``)."""

    severity: str
    code: str
    layers: tuple[str, ...]
    message: str
    fix: str


def group_findings(findings: Sequence[Finding]) -> list[FindingGroup]:
    """``findings`` worst first, those with the same code, severity, message and fix merged
    into one group naming their layers (the JSON document keeps one finding per layer)."""
    ordered = sorted(findings, key=lambda f: -severity_rank(f.severity))
    groups: dict[tuple[str, str, str, str, bool], list[Finding]] = {}
    for f in ordered:
        groups.setdefault((f.severity, f.code, f.message, f.fix, f.layer is None), []).append(f)
    return [
        FindingGroup(
            severity=str(members[0].severity),
            code=members[0].code,
            layers=tuple(f.layer for f in members if f.layer is not None),
            message=members[0].message,
            fix=members[0].fix,
        )
        for members in groups.values()
    ]


class FindingsTable:
    """The findings, worst first, identical ones in one row that names their layers. Wide
    consoles get the columns severity, code, layer, message, fix; where those do not fit
    (message and fix narrower than :data:`MESSAGE_WIDTH` and :data:`FIX_WIDTH`, or a layer
    name wider than its column would allow), each finding is one stacked row: severity over
    code, then its layers, its message and its fix."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.groups = group_findings(findings)

    def _layer_cell(self, group: FindingGroup) -> Names | str:
        return Names(group.layers) if group.layers else "-"

    def _fixes(self) -> list[Text | str]:
        previous = None
        fixes: list[Text | str] = []
        for g in self.groups:
            fixes.append(Text("(same as above)", style="dim") if g.fix == previous else g.fix)
            previous = g.fix
        return fixes

    def wide(self) -> FitTable:
        table = FitTable(
            Col("severity", kind="name", justify="left"),
            Col("code", kind="name", justify="left"),
            Col("layer", kind="text", justify="left", min_width=len("layer")),
            Col("message", kind="text", justify="left", min_width=MESSAGE_WIDTH),
            Col("fix", kind="text", justify="left", min_width=FIX_WIDTH),
            title="Findings",
        )
        for g, fix in zip(self.groups, self._fixes(), strict=True):
            table.add_row(
                Text(g.severity, style=SEVERITY_STYLE[g.severity]),
                g.code,
                self._layer_cell(g),
                g.message,
                fix,
            )
        return table

    def stacked(self, console: Console, width: int) -> Table:
        label_width = max(
            [len("severity")] + [max(len(g.severity), len(g.code)) for g in self.groups]
        )
        room = max(NARROWEST_TEXT, width - FitTable.overhead(2) - label_width)
        table = Table(title="Findings", title_justify="left", show_lines=True)
        table.add_column("severity\ncode", width=label_width, overflow="fold")
        table.add_column("layer, message, fix", width=room, overflow="fold")
        for g, fix in zip(self.groups, self._fixes(), strict=True):
            label = Text(g.severity, style=SEVERITY_STYLE[g.severity])
            label.append("\n" + g.code)
            body = Text()
            if g.layers:
                body.append(names_cell(console, Names(g.layers), room, 2))
                body.append("\n")
            body.append(g.message)
            body.append("\nfix: ", style="dim")
            body.append(fix)
            table.add_row(label, body)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = self.wide()
        if wide.fits(options.max_width):
            yield wide
        else:
            yield self.stacked(console, options.max_width)


#: the narrowest message and fix columns of the wide findings table
MESSAGE_WIDTH = 36
FIX_WIDTH = 28


def findings_table(findings: Sequence[Finding]) -> FindingsTable | Text:
    """Findings, worst first, each with its fix; identical findings of several layers are one
    row (:class:`FindingsTable`)."""
    if not findings:
        return Text("No findings.", style="green")
    return FindingsTable(findings)


def summary_line(report: Report) -> Text:
    """'3 layers, 2 findings (1 error, 1 warning)' — the verdict line."""
    counts = {s: 0 for s in ("error", "warning", "info")}
    for f in report.findings:
        counts[f.severity] += 1
    parts = [f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n]
    n_layers = len(report.layers)
    head = f"{n_layers} BatchNorm layer{'s' if n_layers != 1 else ''}"
    if not parts:
        return Text(f"{head}, no findings.", style="green")
    worst = report.worst_severity() or "info"
    return Text(f"{head}: {', '.join(parts)}.", style=SEVERITY_STYLE[worst])


def header(report: Report) -> Text:
    """Where the report came from: checkpoint, wrapper key, prefix, the networks of a
    checkpoint that holds several (the one reported on marked, the others with their --key),
    project file, assumptions."""
    extra: dict[str, Any] = report.extra
    lines = []
    if report.checkpoint:
        fmt = extra.get("format")
        lines.append(f"checkpoint: {report.checkpoint}" + (f" ({fmt})" if fmt else ""))
    if extra.get("key"):
        lines.append(f"state dict under key: {extra['key']!r}")
    if extra.get("prefix"):
        lines.append(f"key prefix stripped: {extra['prefix']!r}")
    for net in extra.get("networks") or ():  # a checkpoint holding several networks
        label = net.get("prefix") or net.get("key") or "(top level)"
        count = net.get("bn_layers", 0)
        line = f"network {label!r}: {count} BN layer{'s' if count != 1 else ''}"
        if net.get("ema"):
            line += ", EMA copy"
        if net.get("used"):
            line += " (reported on)"
        elif net.get("key"):
            line += f" (--key {net['key']})"
        lines.append(line)
    if extra.get("model"):
        lines.append(f"model: {extra['model']}")
    if extra.get("project_file"):
        lines.append(f"project file: {extra['project_file']}")
    if extra.get("device"):
        run = [str(extra["device"])]
        if extra.get("amp"):
            run.append(f"{extra['amp']} autocast")
        if extra.get("channels_last"):
            run.append("channels-last")
        lines.append("ran on: " + ", ".join(run))
    if extra.get("momentum_assumed") or extra.get("eps_assumed"):
        lines.append(
            "no model code: momentum 0.1 and eps 1e-5 assumed (PyTorch defaults); "
            "pass --model to use the real values"
        )
    return Text("\n".join(lines), style="dim")


def static_report(report: Report) -> Group:
    """The whole static ``inspect`` output."""
    return Group(
        header(report),
        static_layers_table(report.layers),
        findings_table(report.findings),
        summary_line(report),
    )


__all__ = [
    "findings_table",
    "header",
    "static_layers_table",
    "static_report",
    "summary_line",
    "num",
]


def _change_key(rec: Any) -> float:
    vals = [v for v in (rec.d_mu_max, rec.d_var_max) if v is not None]
    return max(vals) if vals else -1.0


def ranked_layers_table(
    layers: Sequence[Any],
    title: str,
    columns: Sequence[tuple[str, Any, int]],
    key: Any,
) -> FitTable:
    """Per-layer table sorted by ``key(record)``, largest first (``#`` is the module order):
    ``#``, layer, C, then ``columns`` (header, record -> cell text, drop rank: 0 always shown,
    else hidden on a narrow console, lowest first; ``#`` has rank 2 and C rank 3), then the
    status (or the reason a layer was not updated)."""
    table = FitTable(
        Col("#", style="dim", drop=2),
        Col("layer", kind="name", justify="left"),
        Col("C", drop=3),
        *[Col(head, drop=drop) for head, _, drop in columns],
        Col("status", kind="text", justify="left", min_width=STATUS_WIDTH),
        title=title,
    )
    for i, rec in sorted(enumerate(layers), key=lambda item: -key(item[1])):
        status = rec.status if rec.reason is None or rec.status == "updated" else rec.reason
        if rec.status == "frozen":
            status = "frozen: kept"
        elif rec.status == "updated" and (rec.reason or "").startswith("frozen"):
            status = "updated (frozen)"
        cells = [cell(rec) for _, cell, _ in columns]
        table.add_row(str(i), rec.name, str(rec.num_features), *cells, str(status))
    return table


#: the narrowest the status column of precise and adapt wraps to
STATUS_WIDTH = 12


def precise_table(layers: Sequence[Any], title: str = "Statistics change per layer") -> FitTable:
    """Per-layer change of the statistics, largest change first (``#`` is the module order).
    On a narrow console calls/fwd, ``#``, C, d_var med, d_mu med, d_var max and d_mu max are
    hidden, in this order, as far as needed (layer and status stay).

    d_mu = |mu_old - mu_new| / sqrt(var_new + eps); d_var = |log((var_old+eps)/(var_new+eps))|.
    """
    columns = (
        ("calls/fwd", lambda r: str(r.calls_per_forward) if r.calls_per_forward else "-", 1),
        ("d_mu max", lambda r: num(r.d_mu_max), 7),
        ("d_mu med", lambda r: num(r.d_mu_median), 5),
        ("d_var max", lambda r: num(r.d_var_max), 6),
        ("d_var med", lambda r: num(r.d_var_median), 4),
    )
    return ranked_layers_table(layers, title, columns, _change_key)


def metrics_table(metrics: dict[str, Any], before: str = "before", after: str = "after") -> Group:
    """Evaluation before vs after (accuracy and loss with labels; agreement and KL always)."""
    table = FitTable(
        Col("metric", kind="text", justify="left", min_width=METRIC_WIDTH),
        Col(before),
        Col(after),
    )
    a, b = metrics["variants"]["running"], metrics["variants"]["precise"]
    if metrics.get("has_labels"):
        table.add_row("accuracy", pct(a["accuracy"], 2), pct(b["accuracy"], 2))
        table.add_row("loss", num(a["loss"], 4), num(b["loss"], 4))
    if b["agreement"] is not None:
        table.add_row(f"top-1 agreement with {before}", "100.00%", pct(b["agreement"], 2))
        table.add_row(f"KL({before} || {after})", "0", num(b["kl"]))
    table.add_row("relative output change", "0", num(b["rel_diff"]))
    table.add_row("samples", str(metrics["samples"]), str(metrics["samples"]))
    title = Text(f"Evaluation on {metrics.get('data', 'the evaluation data')}", style="italic")
    return Group(title, table)


#: the narrowest the metric-name column of evaluation tables wraps to
METRIC_WIDTH = 14


def _rewrite_report(report: Report, table: Any, metrics: Any, line: str) -> Group:
    """Header, the layer table, findings, the evaluation (when there was one) and a closing
    line naming the written checkpoint: the shape of ``precise`` and ``adapt`` output."""
    parts: list[Any] = [header(report), table]
    if report.findings:
        parts.append(findings_table(report.findings))
    if metrics is not None:
        parts.append(metrics)
    if report.extra.get("output"):
        line += f" Wrote {report.extra['output']}{frozen_output_note(report.layers, report.extra)}."
    parts.append(Text(line, style="green"))
    return Group(*parts)


def frozen_output_note(layers: Sequence[Any], extra: Mapping[str, Any]) -> str:
    """" for frozen BN (3 BN layers as FrozenBatchNorm: weight, bias, running_mean,
    running_var)" when the checkpoint was written with ``freeze``, else ""; layers without
    running statistics (skipped) are written as they were."""
    if not extra.get("freeze"):
        return ""
    frozen = sum(1 for r in layers if r.status != "skipped")
    s = "s" if frozen != 1 else ""
    return (
        f" for frozen BN ({frozen} BN layer{s} as FrozenBatchNorm: weight, bias, "
        "running_mean, running_var)"
    )


def frozen_note(layers: Sequence[Any]) -> str:
    """" 2 frozen BN layers kept ..." / " (2 of them frozen, re-estimated ...)" or ""."""
    kept = sum(1 for r in layers if r.status == "frozen")
    redone = sum(
        1 for r in layers if r.status == "updated" and (r.reason or "").startswith("frozen")
    )
    if kept:
        return (
            f" {kept} frozen BN layer{'s' if kept != 1 else ''} measured and kept "
            "(--include-frozen re-estimates them)."
        )
    if redone:
        return f" {redone} of them frozen, re-estimated as asked (--include-frozen)."
    return ""


def precise_report(report: Report) -> Group:
    """The whole ``precise`` output: header, change table, findings, evaluation, verdict."""
    extra = report.extra
    updated = sum(1 for r in report.layers if r.status == "updated")
    line = (
        f"Precise BN: {updated} of {len(report.layers)} BN layers recomputed from "
        f"{extra.get('batches')} batches ({extra.get('samples')} samples)."
        + frozen_note(report.layers)
    )
    metrics = metrics_table(extra["metrics"]) if extra.get("metrics") else None
    return _rewrite_report(report, precise_table(report.layers), metrics, line)


def shift_table(
    layers: Sequence[Any], title: str = "Domain shift per layer", *, partial: bool = False
) -> FitTable:
    """Source vs target statistics per layer, largest shift (median symmetric KL) first. On a
    narrow console λ source, ``#``, C, KL max, d_var med, d_mu med and KL med are hidden, in
    this order, as far as needed (layer and status stay). ``partial`` (adapt with ``only`` or
    ``first_layers``) adds the column ``adapted``: the statistics each layer received
    (``mean+var``, ``mean``, ``var``, ``-`` for none), hidden last."""
    columns: tuple[tuple[str, Any, int], ...] = (
        ("KL med", lambda r: num(r.kl_median), 7),
        ("KL max", lambda r: num(r.kl_max), 4),
        ("d_mu med", lambda r: num(r.d_mu_median), 6),
        ("d_var med", lambda r: num(r.d_var_median), 5),
        ("λ source", lambda r: num(r.weight_source), 1),
    )
    if partial:
        columns += (("adapted", lambda r: getattr(r, "adapted", None) or "-", 8),)
    return ranked_layers_table(
        layers, title, columns, lambda r: r.kl_median if r.kl_median is not None else -1.0
    )


ADAPT_VARIANTS = (
    ("running", "source stats"),
    ("adapted", "adapted stats"),
    ("batch", "test-batch stats"),
)


def adapt_variants(metrics: dict[str, Any], online_prior: Any = None) -> list[tuple[str, str]]:
    """(key, column label) of the variants an adapt report's ``metrics`` holds: source,
    adapted and test-batch statistics, and the test-time prior (``prior N=16``) when there."""
    variants = list(ADAPT_VARIANTS)
    if "prior" in metrics["variants"]:
        label = "prior" if online_prior is None else f"prior N={prior_text(online_prior)}"
        variants.append(("prior", label))
    return variants


def adapt_metrics_table(metrics: dict[str, Any], online_prior: Any = None) -> Group:
    """Source statistics vs adapted statistics vs test-time batch statistics (vs test-batch
    statistics mixed with the source statistics by ``online_prior`` N, when evaluated)."""
    shown = adapt_variants(metrics, online_prior)
    table = FitTable(
        Col("metric", kind="text", justify="left", min_width=METRIC_WIDTH),
        *[Col(label) for _, label in shown],
    )
    per = metrics["variants"]
    if metrics.get("has_labels"):
        table.add_row("accuracy", *[pct(per[k]["accuracy"], 2) for k, _ in shown])
        table.add_row("loss", *[num(per[k]["loss"], 4) for k, _ in shown])
    if per["running"]["agreement"] is not None:
        table.add_row(
            "top-1 agreement with source",
            *[pct(per[k]["agreement"], 2) for k, _ in shown],
        )
        table.add_row("KL(source || variant)", *[num(per[k]["kl"]) for k, _ in shown])
    table.add_row("relative output change", *[num(per[k]["rel_diff"]) for k, _ in shown])
    table.add_row("samples", *[str(metrics["samples"]) for _ in shown])
    note = "" if metrics.get("has_labels") else " (no labels: agreement only)"
    title = Text(
        f"Evaluation on {metrics.get('data', 'the evaluation data')}{note}", style="italic"
    )
    return Group(title, table)


def prior_sweep_table(rows: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> Group:
    """The test-time prior sweep (an adapt report's ``online_priors``): one row per N, with
    accuracy and loss (with labels), top-1 agreement and KL against the source statistics."""
    labelled = bool(metrics.get("has_labels"))
    scores = any(r["agreement"] is not None for r in rows)
    cols = [Col("N (prior)")]
    if labelled:
        cols += [Col("accuracy"), Col("loss")]
    if scores:
        cols += [Col("agreement with source"), Col("KL(source || N)")]
    cols.append(Col("output change"))
    table = FitTable(*cols)
    for r in rows:
        cells = [prior_text(r["prior"])]
        if labelled:
            cells += [pct(r["accuracy"], 2), num(r["loss"], 4)]
        if scores:
            cells += [pct(r["agreement"], 2), num(r["kl"])]
        cells.append(num(r["rel_diff"]))
        table.add_row(*cells)
    title = Text(
        "Test-time prior sweep (each test batch's statistics mixed with the source statistics "
        f"as N pseudo samples) on {metrics.get('data', 'the evaluation data')}",
        style="italic",
    )
    return Group(title, table)


def partial_note(extra: dict[str, Any]) -> str:
    """" Means only, first 3 BN layers." for partial adaptation, else ""."""
    parts = []
    if extra.get("only"):
        parts.append("means only" if extra["only"] == "mean" else "variances only")
    if extra.get("first_layers") is not None:
        k = extra["first_layers"]
        parts.append(f"first {k} BN layer{'s' if k != 1 else ''} (module order)")
    return (" Partial: " + ", ".join(parts) + ".") if parts else ""


def adapt_report(report: Report) -> Group:
    """The whole ``adapt`` output."""
    extra = report.extra
    updated = sum(1 for r in report.layers if r.status == "updated")
    line = (
        f"Adaptive BN: {updated} of {len(report.layers)} BN layers re-estimated on "
        f"{extra.get('batches')} target batches ({extra.get('samples')} samples, prior "
        f"{extra.get('prior', 0):g})." + partial_note(extra) + frozen_note(report.layers)
    )
    metrics: Any = None
    if extra.get("metrics"):
        metrics = adapt_metrics_table(extra["metrics"], extra.get("online_prior"))
        if extra.get("online_priors"):
            metrics = Group(metrics, prior_sweep_table(extra["online_priors"], extra["metrics"]))
    partial = bool(extra.get("only") or extra.get("first_layers"))
    return _rewrite_report(report, shift_table(report.layers, partial=partial), metrics, line)

"""Tables for the dynamic ``inspect`` report: verdict first, then the train/test comparison,
the worst layers and the findings. Plain records in, rich renderables out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ..records import InspectLayer, Report
from .fit import Col, FitTable
from .tables import METRIC_WIDTH, findings_table, header, summary_line
from .text import momentum_cell, num, pct

#: rows of the worst-layers table
WORST_LAYERS = 10

VERDICT_STYLE = {"stale": "bold yellow", "gap": "bold yellow", "noisy": "cyan",
                 "healthy": "bold green"}  # fmt: skip

VARIANTS = (
    ("running", "running stats (eval)"),
    ("precise", "precise stats"),
    ("batch", "batch stats (train mode)"),
)


def variant_columns(
    metrics: dict[str, Any], eps_check: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(column label, variant metrics) of the consistency table: running, precise and batch
    statistics, and the running statistics with the other eps when the eps check ran it
    (docs/statistics.md, section 11.3)."""
    per = metrics["variants"]
    columns = [(label, per[k]) for k, label in VARIANTS]
    if eps_check and eps_check.get("variant") is not None:
        columns.append((f"running stats, eps {eps_check['other_eps']:g}", eps_check["variant"]))
    return columns


def consistency_table(
    metrics: dict[str, Any], eps_check: dict[str, Any] | None = None
) -> FitTable:
    """Running vs precise vs batch statistics on the same inputs (the report's ``metrics``),
    and the running statistics with the other eps when ``eps_check`` evaluated them."""
    columns = variant_columns(metrics, eps_check)
    table = FitTable(
        Col("metric", kind="text", justify="left", min_width=METRIC_WIDTH),
        *[Col(label) for label, _ in columns],
        title="Train/test consistency on the same batches",
    )
    variants = [v for _, v in columns]
    if metrics.get("has_labels"):
        table.add_row("accuracy", *[pct(v["accuracy"]) for v in variants])
        table.add_row("loss", *[num(v["loss"], 4) for v in variants])
    table.add_row("top-1 agreement with eval", "100.0%",
                  *[pct(v["agreement"]) for v in variants[1:]])  # fmt: skip
    table.add_row("KL(eval || variant)", "0", *[num(v["kl"]) for v in variants[1:]])
    table.add_row("samples", *[str(metrics["samples"]) for _ in variants])
    return table


def _severity_key(layer: InspectLayer) -> float:
    order = {"stale": 3.0, "noisy": 2.0, "not-called": 1.5, "unknown": 1.0}
    gap = max(v for v in (layer.d_mu_median, layer.d_var_median, 0.0) if v is not None)
    return order.get(layer.status, 0.0) * 10 + gap


def worst_first(layers: Sequence[InspectLayer]) -> list[InspectLayer]:
    """The layers in the order of the layers table: stale, noisy, not-called, unknown, then
    the rest, each by its larger median gap (d_mu or d_var), largest first."""
    return sorted(layers, key=_severity_key, reverse=True)


def layers_table(layers: Sequence[InspectLayer], limit: int = WORST_LAYERS) -> FitTable:
    """The worst layers first: status, gap to the population (median/max d_mu, d_var), the gap
    in units of EMA noise (z), and the spread of batch statistics at the data's batch size. On
    a narrow console calls/fwd, batch spread, m, C, EMA noise, d_var, d_mu and z are hidden, in
    this order, as far as needed (layer and status stay)."""
    ordered = worst_first(layers)[:limit]
    more = len(layers) - len(ordered)
    title = "BN layers, worst first" + (f" (top {len(ordered)} of {len(layers)})" if more else "")
    table = FitTable(
        Col("layer", kind="name", justify="left"),
        Col("status", kind="name", justify="left"),
        Col("C", drop=4),
        Col("m", drop=3),
        Col("d_mu med/max", drop=7),
        Col("d_var med/max", drop=6),
        Col("z μ / var", drop=8),
        Col("EMA noise", drop=5),
        Col("batch spread", drop=2),
        Col("calls/fwd", drop=1),
        title=title,
    )
    style = {"stale": "yellow", "noisy": "cyan", "not-called": "yellow", "ok": "green"}
    for layer in ordered:
        if layer.d_mu_median is None:
            table.add_row(layer.name, Text(layer.status, style=style.get(layer.status, "")),
                          str(layer.num_features), num(layer.momentum), "-", "-", "-", "-", "-",
                          str(layer.calls_per_forward))  # fmt: skip
            continue
        table.add_row(
            layer.name,
            Text(layer.status, style=style.get(layer.status, "")),
            str(layer.num_features),
            momentum_cell(layer),
            f"{num(layer.d_mu_median, 2)} / {num(layer.d_mu_max, 2)}",
            f"{num(layer.d_var_median, 2)} / {num(layer.d_var_max, 2)}",
            f"{num(layer.z_mu, 2)} / {num(layer.z_var, 2)}",
            num(layer.ema_noise_mu, 2),
            num(layer.batch_spread_mu, 2),
            str(layer.calls_per_forward),
        )
    return table


def inspect_report(report: Report) -> Group:
    """The whole dynamic ``inspect`` output."""
    extra = report.extra
    verdict = Text(extra["verdict_text"], style=VERDICT_STYLE.get(extra["verdict"], ""))
    parts: list[Any] = [
        verdict, header(report), consistency_table(extra["metrics"], extra.get("eps_check"))
    ]
    parts.append(layers_table(report.layers))
    parts.append(findings_table(report.findings))
    parts.append(
        Text(
            "d_mu = |mu_EMA - mu_pop|/sigma, d_var = |log var ratio|; z = gap / EMA noise "
            "(RMS over channels; about 1 when the EMA is merely noisy, stale above 3); batch "
            "spread = sd of batch means / sigma. "
            f"{extra.get('batches')} batches, {extra.get('samples')} samples of "
            f"{extra.get('data', 'the data')}.",
            style="dim",
        )
    )
    parts.append(summary_line(report))
    return Group(*parts)

"""Tables for the ghost-size (normalization batch size) report: plain records in, rich
renderables out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ..records import GhostLayer, Report
from .fit import Col, FitTable
from .tables import findings_table, header
from .text import num, pct

#: how many layers the "noisiest layers" table lists
WORST_LAYERS = 5


def sizes_table(rows: Sequence[dict[str, Any]], population: dict[str, Any]) -> Group:
    """One row per ghost size: chunks and remainders, median chunk noise over layers, effective
    size ratio, and the model's outputs against population statistics; a first row for the
    population statistics themselves. On a narrow console loss, chunks, noise log var, KL,
    min eff. size / g, remainder and noise μ are hidden, in this order."""
    table = FitTable(
        Col("g"),
        Col("chunks", drop=2),
        Col("remainder", drop=6),
        Col("noise μ", drop=7),
        Col("noise log var", drop=3),
        Col("min eff. size / g", drop=5),
        Col("agreement"),
        Col("KL", drop=4),
        Col("accuracy"),
        Col("loss", drop=1),
        title="Normalization batch size (NBS curve)",
    )
    notes: list[str] = ["pop = population statistics (eval mode), the reference"]
    table.add_row(
        "pop", "-", "-", "0", "0", "-", "100.0%", "0",
        pct(population.get("accuracy")), num(population.get("loss"), 4),
    )  # fmt: skip
    for row in rows:
        if row["status"] != "ok":
            table.add_row(str(row["size"]), *["-"] * 9)
            notes.append(f"g={row['size']}: {row['note']}")
            continue
        if row["note"]:
            notes.append(f"g={row['size']}: {row['note']}")
        rem = (
            f"{row['remainder_chunks']} ({row['remainder_samples']} samples)"
            if row["remainder_chunks"]
            else "0"
        )
        table.add_row(
            str(row["size"]),
            str(row["chunks"]),
            rem,
            num(row["noise_mu"]),
            num(row["noise_var"]),
            num(row["effective_ratio"], 2),
            pct(row["agreement"]),
            num(row["kl"]),
            pct(row["accuracy"]),
            num(row["loss"], 4),
        )
    return Group(table, Text("\n".join(notes), style="dim"))


def worst_layers_table(
    layers: Sequence[GhostLayer], limit: int = WORST_LAYERS
) -> FitTable | None:
    """The layers whose chunk means are noisiest at the smallest size: noise per size and the
    effective size at the largest size, with the i.i.d. expectation beside each. On a narrow
    console C goes first, then the sizes between the smallest and the largest (the middle
    ones first), the effective size, the largest size and the smallest, as far as needed (the
    layer name stays)."""
    analysed = [layer for layer in layers if layer.status == "analysed" and layer.sizes]
    if not analysed:
        return None
    ordered = sorted(analysed, key=lambda layer: -(layer.sizes[0].noise_mu or 0.0))[:limit]
    sizes = [s.size for s in ordered[0].sizes]
    inner = sorted(range(1, len(sizes) - 1), key=lambda k: (abs(2 * k - (len(sizes) - 1)), k))
    rank = {k: 2 + n for n, k in enumerate(inner)}  # the middle sizes are hidden first
    effective = 2 + len(inner)  # then the effective size, the largest size, the smallest
    rank[len(sizes) - 1] = effective + 1
    rank.setdefault(0, effective + 2)
    table = FitTable(
        Col("layer", kind="name", justify="left"),
        Col("C", drop=1),
        *[Col(f"g={g}", drop=rank.get(k, 0)) for k, g in enumerate(sizes)],
        Col(f"eff. size at g={sizes[-1]}", drop=effective),
        title=f"Noisiest layers (noise μ measured / i.i.d.; top {len(ordered)} of {len(analysed)})",
    )
    for layer in ordered:
        cells = [f"{num(s.noise_mu, 2)} / {num(s.iid_mu, 2)}" for s in layer.sizes]
        eff = layer.sizes[-1].effective_size
        table.add_row(layer.name, str(layer.num_features), *cells, num(eff, 3))
    return table


def verdict(report: Report) -> Text:
    """One line: down to which size batch statistics reproduce population-statistics outputs
    (worded by the finding catalog; coloured here)."""
    style = {"fine": "green", "noisy": "yellow"}.get(report.extra.get("verdict", ""), "yellow")
    return Text(report.extra.get("verdict_text", ""), style=style)


def ghost_report(report: Report) -> Group:
    """The whole ``ghost`` output."""
    extra = report.extra
    parts: list[Any] = [header(report), verdict(report)]
    metrics = extra["metrics"]  # the reference: population ("precise") statistics
    parts.append(sizes_table(extra.get("sizes", []), metrics["variants"]["precise"]))
    worst = worst_layers_table(report.layers)
    if worst is not None:
        parts.append(worst)
    parts.append(findings_table(report.findings))
    note = "" if metrics.get("has_labels") else " No labels: agreement and KL only."
    parts.append(
        Text(
            f"{extra.get('batches')} batches of {extra.get('batch_size')} "
            f"({extra.get('samples')} samples) on {extra.get('data', 'the data')}.{note}",
            style="dim",
        )
    )
    return Group(*parts)

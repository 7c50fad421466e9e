"""Tables for Adaptive BN on several target domains (an adapt report with ``domains``): plain
records in, rich renderables out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ..records import Report
from .fit import Col, FitTable
from .tables import findings_table, frozen_note, header, partial_note, ranked_layers_table
from .text import num


def is_multi_domain(report: Report) -> bool:
    """Whether an adapt report is the one of several target domains (``domains``)."""
    return report.command == "adapt" and "domains" in report.extra


def domains_table(extra: dict[str, Any]) -> FitTable:
    """One row per domain: its data, batches and samples, the BN layers re-estimated, the
    median over layers of the median symmetric KL against the source statistics, and the
    checkpoint written. On a narrow console batches, data, written and KL vs source are hidden,
    in this order, as far as needed."""
    table = FitTable(
        Col("domain", kind="name", justify="left"),
        Col("data", kind="text", justify="left", drop=2, min_width=12),
        Col("batches", drop=1),
        Col("samples"),
        Col("updated"),
        Col("KL vs source", drop=4),
        Col("written", kind="text", justify="left", drop=3, min_width=12),
        title="Target domains",
    )
    matrix = extra.get("divergence") or []
    for i, entry in enumerate(extra["domains"]):
        layers = entry["layers"]
        updated = sum(1 for r in layers if r["status"] == "updated")
        kl = matrix[0][i + 1] if matrix else None
        table.add_row(
            entry["name"],
            entry.get("data") or "-",
            str(entry["batches"]),
            str(entry["samples"]),
            f"{updated} of {len(layers)}",
            num(kl),
            entry.get("output") or "-",
        )
    return table


def divergence_table(labels: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> Group:
    """The median over layers of the median symmetric KL between every two sets of
    statistics (source and domains), as a matrix; the domain columns are hidden from the
    right on a narrow console."""
    n = len(labels)
    table = FitTable(
        Col("", kind="name", justify="left"),
        *[Col(label, drop=n - j) for j, label in enumerate(labels)],
    )
    for label, row in zip(labels, matrix, strict=True):
        table.add_row(label, *[num(v) for v in row])
    title = Text(
        "Divergence between the domains' statistics (median symmetric KL over channels, median "
        "over layers)",
        style="italic",
    )
    return Group(title, table)


def _sort_key(rec: Any) -> float:
    """Largest first: the most divergent pair of domains, else (one domain) the source's."""
    if rec.pair_kl is not None:
        return float(rec.pair_kl)
    if rec.divergence is not None:
        return max((v for v in rec.divergence[0] if v is not None), default=-1.0)
    return -1.0


def domain_layers_table(report: Report) -> FitTable:
    """Per layer, most divergent first: the median symmetric KL of each domain against the
    source statistics and, with two or more domains, the most divergent pair of domains and
    its KL. On a narrow console ``#``, C and the source columns (the last domain's first) are
    hidden, in this order, as far as needed (layer, pair and status stay)."""
    names = report.extra["divergence_labels"][1:]
    multi = len(names) > 1

    def against_source(k: int) -> Any:
        return lambda r: num(r.divergence[0][k + 1] if r.divergence is not None else None)

    columns: list[tuple[str, Any, int]] = [
        (f"KL {name} vs source", against_source(k), len(names) - k + 3)
        for k, name in enumerate(names)
    ]
    if multi:
        columns += [
            ("most divergent pair", lambda r: " / ".join(r.pair) if r.pair else "-", 0),
            ("KL pair", lambda r: num(r.pair_kl), 0),
        ]
    title = "Divergence between domains per layer" if multi else "Domain shift per layer"
    return ranked_layers_table(report.layers, title, columns, _sort_key)


def domains_report(report: Report) -> Group:
    """The whole output of ``adapt`` with several target domains."""
    extra = report.extra
    entries = extra["domains"]
    parts: list[Any] = [
        header(report),
        domains_table(extra),
        domain_layers_table(report),
        divergence_table(extra["divergence_labels"], extra["divergence"]),
        findings_table(report.findings),
    ]
    line = (
        f"Adaptive BN on {len(entries)} domain{'s' if len(entries) != 1 else ''}, each from the "
        f"source statistics (prior {extra.get('prior', 0):g})."
        + partial_note(extra)
        + frozen_note(report.layers)
    )
    written = [e["output"] for e in entries if e.get("output")]
    if extra.get("split_output"):
        written.append(extra["split_output"])
    if written:
        line += f" Wrote {', '.join(written)}."
    parts.append(Text(line, style="green"))
    return Group(*parts)

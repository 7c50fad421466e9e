"""Tables for the leakage report (information leakage within a batch): plain records in, rich
renderables out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ..records import LeakageLayer, Report
from .fit import Col, FitTable
from .tables import findings_table, header
from .text import num, pct

#: how many layers the "batch means" table lists
GROUPED_LAYERS = 5

_ROLE = {"reference": "reference", "noise": "noise floor", "grouped": "grouped"}


def _ratio(row: dict[str, Any]) -> str:
    if row["role"] != "grouped":
        return "-"
    ratio = num(row["ratio"], 3)
    return f"{ratio}x" if row["ratio"] is not None else ratio


def _verdict_cell(row: dict[str, Any]) -> str:
    if row["role"] != "grouped":
        return "-"
    return "LEAK" if row["leak"] else "no"


def arrangements_table(rows: Sequence[dict[str, Any]], metric: str) -> Group:
    """One row per arrangement: how each sample's train-mode output moves from its output in
    the ``iid`` batches (agreement, symmetric KL, relative L2), accuracy, and for groupings
    the ratio to the noise floor (``iid-2``). On a narrow console the L2 medians and means,
    loss, KL median, single-group batches and groups are hidden, in this order."""
    table = FitTable(
        Col("arrangement", kind="name", justify="left"),
        Col("groups", drop=6),
        Col("one-group batches", drop=5),
        Col("accuracy"),
        Col("loss", drop=3),
        Col("agreement"),
        Col("KL mean"),
        Col("KL median", drop=4),
        Col("L2 mean", drop=2),
        Col("L2 median", drop=1),
        Col("ratio"),
        Col("leak"),
        title="Train-mode outputs per arrangement, against the i.i.d. batches",
    )
    for row in rows:
        single = row["single_group_batches"]
        table.add_row(
            row["name"],
            "-" if row["groups"] is None else str(row["groups"]),
            "-" if single is None else str(single),
            pct(row["accuracy"]),
            num(row["loss"], 4),
            pct(row["agreement"]),
            num(row["kl_mean"]),
            num(row["kl_median"]),
            num(row["l2_mean"]),
            num(row["l2_median"]),
            _ratio(row),
            _verdict_cell(row),
        )
    change = "symmetric KL of the softmax outputs" if metric == "kl" else "relative L2 change"
    notes = [
        "iid = the reference (a random order cut into batches); iid-2 = another random order, "
        "the noise floor; the others sorted by their group",
        f"ratio = mean per-sample {change} over the noise floor's",
    ]
    return Group(table, Text("\n".join(notes), style="dim"))


def grouped_layers_table(
    layers: Sequence[LeakageLayer], limit: int = GROUPED_LAYERS
) -> FitTable | None:
    """The layers whose batch means carry the first grouping most: the effective sample size
    of a batch mean under each arrangement (about the batch size for i.i.d. batches), the
    layers whose effective size the grouping shrinks most first. On a narrow console C goes
    first, then the groupings after the first, iid-2 and iid (the layer name and the first
    grouping stay)."""
    from ..ops.leakage import spread_ratio

    analysed = [layer for layer in layers if layer.status == "analysed" and layer.arrangements]
    if not analysed:
        return None
    names = [r.arrangement for r in analysed[0].arrangements]
    first = names[2] if len(names) > 2 else names[-1]
    ordered = sorted(analysed, key=lambda layer: -(spread_ratio(layer, first) or 0.0))[:limit]
    rank = {name: 2 + i for i, name in enumerate(reversed(names[3:]))}
    rank.update({names[1]: 2 + len(names[3:]), names[0]: 3 + len(names[3:])})
    rank[first] = 0
    table = FitTable(
        Col("layer", kind="name", justify="left"),
        Col("C", drop=1),
        *[Col(name, drop=rank.get(name, 0)) for name in names],
        title=f"Effective size of batch means per arrangement ({len(ordered)} of "
        f"{len(analysed)} layers, those {first} shrinks most first)",
    )
    for layer in ordered:
        cells = [num(r.effective_size, 3) for r in layer.arrangements]
        table.add_row(layer.name, str(layer.num_features), *cells)
    return table


def verdict(report: Report) -> Text:
    """The first line: leak, no leak, or outputs independent of the batch (worded by the
    finding catalog; coloured here)."""
    style = {"leak": "yellow", "none": "green", "independent": "green"}
    return Text(
        report.extra.get("verdict_text", ""),
        style=style.get(report.extra.get("verdict", ""), "yellow"),
    )


def leakage_report(report: Report) -> Group:
    """The whole ``leakage`` output."""
    extra = report.extra
    parts: list[Any] = [header(report), verdict(report)]
    parts.append(arrangements_table(extra.get("arrangements", []), extra.get("metric", "kl")))
    layers = grouped_layers_table(report.layers)
    if layers is not None:
        parts.append(layers)
    parts.append(findings_table(report.findings))
    note = "" if extra.get("has_labels") else " No labels: no accuracy."
    left = f", {extra['left_out']} left out" if extra.get("left_out") else ""
    parts.append(
        Text(
            f"{extra.get('samples')} samples{left} in {extra.get('batches')} batches of "
            f"{extra.get('batch_size')} per arrangement (seed {extra.get('seed')}) from "
            f"{extra.get('data', 'the data')}.{note}",
            style="dim",
        )
    )
    return Group(*parts)

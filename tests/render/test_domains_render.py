"""The views of an adapt report with several domains: the divergence heatmaps (asserted on
their artists: matrix data, cell texts, tick labels, panels chosen) and the tables at 80 and
100 columns. Reports are built by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from rich.console import Console

from bnscope.records import DomainLayer, Finding, Report
from bnscope.render import figures as F
from bnscope.render.reports import report_figures, report_view

LABELS = ["source", "fog", "snow", "night"]


def matrix(scale: float, missing: int | None = None) -> tuple[tuple[float | None, ...], ...]:
    """A symmetric matrix with zero diagonal; ``missing`` blanks one domain."""
    rows: list[list[float | None]] = [[0.0] * 4 for _ in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            rows[i][j] = rows[j][i] = scale * (i + 1) * (j + 1) / 10
    if missing is not None:
        for k in range(4):
            rows[missing][k] = rows[k][missing] = None
    return tuple(tuple(r) for r in rows)


def layer(name: str, scale: float, **kw) -> DomainLayer:
    m = kw.pop("divergence", matrix(scale))
    pair_kl = max(v for i, row in enumerate(m) for j, v in enumerate(row) if 0 < i < j and v)
    return DomainLayer(
        name=name, num_features=8, status="updated", divergence=m,
        pair=("snow", "night"), pair_kl=pair_kl, **kw,
    )  # fmt: skip


LAYERS = [
    layer("stem.bn1", 1.0),
    layer("blocks.0.bn", 4.0),
    layer("features.denseblock4.denselayer16.norm2", 2.0),
    layer("head.norm", 0.5, divergence=matrix(0.5, missing=2)),
    DomainLayer(name="aux.bn", num_features=8, status="skipped", reason="no running stats"),
]
SUMMARY = [list(row) for row in matrix(1.5)]


def report() -> Report:
    entry = {"batches": 3, "samples": 96, "label_mix": None}
    domains = [
        {**entry, "name": n, "data": f"image folder corrupted/{n} (96 images)",
         "layers": [{"name": r.name, "status": "updated"} for r in LAYERS[:4]],
         "output": f"runs/ckpt.adapted.{n}.pt"}
        for n in LABELS[1:]
    ]  # fmt: skip
    return Report(
        command="adapt",
        checkpoint="runs/ckpt.pt",
        layers=tuple(LAYERS),
        findings=(
            Finding(
                code="domain-divergence",
                severity="info",
                layer="blocks.0.bn",
                message="domains snow and night need different statistics here",
                fix="keep one set of statistics per domain",
            ),
        ),  # fmt: skip
        extra={
            "domains": domains,
            "divergence_labels": LABELS,
            "divergence": SUMMARY,
            "prior": 0.0,
            "shift_threshold": 0.1,
            "only": None,
            "first_layers": None,
            "split_output": "runs/ckpt.adapted.split.pt",
        },
    )


def test_divergence_figure_draws_the_matrices_it_is_given():
    plot = F.domain_divergence_figure(LABELS, SUMMARY, LAYERS)
    image = plot.artists["matrix"]
    np.testing.assert_allclose(np.ma.filled(image.get_array(), np.nan), np.array(SUMMARY))
    texts = [t.get_text() for t in plot.artists["cells"]]
    assert len(texts) == 16 and texts[0] == "0" and texts[1] == "0.3"  # 1.5 * 1 * 2 / 10
    ax = plot.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    # the three most divergent layers (pair_kl), largest first, each with its own matrix
    assert plot.artists["layer_names"] == [
        "blocks.0.bn", "features.denseblock4.denselayer16.norm2", "stem.bn1"
    ]  # fmt: skip
    first = plot.artists["layers"][0]
    np.testing.assert_allclose(np.ma.filled(first.get_array(), np.nan), np.array(matrix(4.0)))
    assert plot.axes[1].get_title() == "layer blocks.0.bn"
    # one colour scale for every panel, from 0 to the largest value drawn
    norms = {(im.norm.vmin, im.norm.vmax) for im in [image, *plot.artists["layers"]]}
    assert norms == {(0.0, 4.0 * 3 * 4 / 10)}
    assert plot.artists["colorbar"].ax.get_ylabel() == "median symmetric KL over channels"
    assert "most divergent layers" in plot.artists["title"].get_text()


def test_missing_entries_are_blank_and_marked():
    m = matrix(1.0, missing=2)
    plot = F.domain_divergence_figure(LABELS, m, top=0)
    data = plot.artists["matrix"].get_array()
    assert data.mask[2].all() and data.mask[:, 2].all() and not data.mask[1, 3]
    texts = [t.get_text() for t in plot.artists["cells"]]
    assert texts[2 * 4 + 1] == "n/a" and texts[1 * 4 + 3] == "0.8"
    assert len(plot.axes) == 1 and plot.artists["layers"] == []
    assert math.isclose(plot.artists["matrix"].norm.vmax, 0.8)


def test_draws_into_a_given_figure():
    fig = Figure()
    sub = fig.subfigures(1, 2)[1]
    plot = F.domain_divergence_figure(LABELS, SUMMARY, LAYERS, fig=sub, top=1)
    assert plot.figure is fig and len(plot.axes) == 2
    assert all(ax.figure is sub for ax in plot.axes)


def test_report_figures_and_view():
    rep = report()
    made = report_figures(rep)
    assert list(made) == ["domain_divergence"]
    caption, fig = made["domain_divergence"]
    assert "median over layers" in caption and isinstance(fig, Figure)
    for width in (80, 100):
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None, force_terminal=False).print(
            report_view(rep)
        )
        text = buf.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width
        for word in ("Target domains", "fog", "snow", "night", "domain-divergence",
                     "runs/ckpt.adapted.split.pt"):  # fmt: skip
            assert word in text, (width, word)
        # the most divergent layer comes first in the per-layer table
        table = text[text.index("per layer") :]
        assert table.index("blocks.0.bn") < table.index("stem.bn1")


@pytest.mark.parametrize("width", [80, 100])
def test_layer_names_and_numbers_are_whole(width):
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(
        report_view(report())
    )
    text = buf.getvalue()
    assert "denselayer16.norm2" in text  # a long name is shortened from the left at most
    assert "4.8" in text  # blocks.0.bn's pair: snow (2) x night (3) ... = 4 * 3 * 4 / 10


def test_threshold_is_marked_and_below_it_is_never_the_darkest_colour():
    plot = F.domain_divergence_figure(LABELS, SUMMARY, LAYERS, top=1, threshold=5.0)
    assert plot.artists["matrix"].norm.vmax == 10.0  # twice the threshold: above every value
    assert list(plot.artists["threshold"].get_ydata()) == [5.0, 5.0]
    assert "threshold 5" in plot.artists["colorbar"].ax.get_ylabel()
    assert "threshold" not in F.domain_divergence_figure(LABELS, SUMMARY).artists

"""Renderers are pure functions of records: golden tables, artist-level figure checks."""

from __future__ import annotations

import io
import json
import math

from rich.console import Console

from bnscope.records import Finding, Report, StaticLayer
from bnscope.render.figures import static_ranges_figure
from bnscope.render.jsonout import report_json
from bnscope.render.tables import findings_table, static_report, summary_line
from bnscope.render.text import num, percent, span


def layer(name: str, **kw) -> StaticLayer:
    base = dict(
        name=name,
        num_features=8,
        num_batches_tracked=500,
        momentum=0.1,
        momentum_assumed=True,
        eps=1e-5,
        eps_assumed=True,
        ema_init_weight=0.9**500,
        affine=True,
        mean_min=-0.5,
        mean_max=0.25,
        var_min=0.5,
        var_max=2.0,
        gain_min=0.7,
        gain_max=1.4,
        dead_channels=0,
        tiny_var_channels=0,
        nonfinite_values=0,
        negative_var_channels=0,
    )
    base.update(kw)
    return StaticLayer(**base)


REPORT = Report(
    command="inspect",
    checkpoint="runs/ckpt.pt",
    layers=(
        layer("backbone.bn1"),
        layer(
            "backbone.layer1.0.bn2",
            num_batches_tracked=7,
            ema_init_weight=0.9**7,
            var_min=0.0,
            gain_max=316.2,
            tiny_var_channels=1,
        ),
        layer(
            "head.bn",
            num_batches_tracked=0,
            ema_init_weight=1.0,
            mean_min=0.0,
            mean_max=0.0,
            var_min=1.0,
            var_max=1.0,
            gain_min=0.0,
            gain_max=1.0,
            dead_channels=2,
        ),
    ),
    findings=(
        Finding(
            code="dead-channel",
            severity="info",
            layer="head.bn",
            message="2 of 8 channels have |gamma| < 1e-05",
            fix="prune them",
        ),
        Finding(
            code="never-updated",
            severity="error",
            layer="head.bn",
            message="running stats are still initial",
            fix="bnscope precise",
        ),
        Finding(
            code="ema-warmup",
            severity="warning",
            layer="backbone.layer1.0.bn2",
            message="EMA has only 7 updates",
            fix="bnscope precise",
        ),
    ),
    extra={"format": "torch", "key": "state_dict", "prefix": "module.", "momentum_assumed": True},
)


def render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def test_static_report_golden(golden):
    golden("inspect_static.txt", render(static_report(REPORT)))


def test_findings_sorted_worst_first():
    text = render(findings_table(REPORT.findings))
    assert text.index("never-updated") < text.index("ema-warmup") < text.index("dead-channel")
    assert "No findings" in render(findings_table(()))


def test_summary_line():
    assert render(summary_line(REPORT)).strip() == "3 BatchNorm layers: 1 error, 1 warning, 1 info."
    empty = Report(command="inspect", checkpoint=None, layers=(layer("a"),), findings=())
    assert render(summary_line(empty)).strip() == "1 BatchNorm layer, no findings."


def test_number_formatting():
    assert num(None) == "n/a" and num(math.nan) == "nan" and num(-math.inf) == "-inf"
    assert num(0.0) == "0" and num(123456.0) == "1.23e+05" and num(0.5) == "0.5"
    assert span(1.0, 1.0) == "1" and span(0.5, 2.0) == "0.5 .. 2" and span(None, 1) == "n/a"
    assert percent(0.0) == "0" and percent(1e-5) == "<0.1%" and percent(0.4305) == "43.0%"


def test_json_roundtrip_with_nonfinite():
    rep = Report(
        command="inspect",
        checkpoint=None,
        layers=(layer("a", mean_min=math.nan, var_max=math.inf),),
        findings=(),
    )
    doc = json.loads(report_json(rep))
    assert doc["layers"][0]["mean_min"] == "nan"
    assert doc["layers"][0]["var_max"] == "inf"


def test_static_figure_artists():
    fig = static_ranges_figure(REPORT.layers, tiny_var=1e-4, tiny_gain=100.0).figure
    ax_mean, ax_var, ax_gain = fig.axes
    assert ax_mean.get_ylabel() == "running_mean"
    assert ax_var.get_yscale() == "log" and ax_gain.get_yscale() == "log"
    segs = ax_mean.collections[0].get_segments()
    assert [tuple(s[:, 1]) for s in segs] == [(-0.5, 0.25), (-0.5, 0.25), (0.0, 0.0)]
    # the zero variance of layer 1 is clipped to the floor and marked with an x
    xs = [line for line in ax_var.get_lines() if line.get_marker() == "x"]
    assert len(xs) == 1 and list(xs[0].get_xdata()) == [1]
    assert xs[0].get_ydata()[0] <= 1e-5
    labels = [t.get_text() for t in ax_gain.get_xticklabels()]
    assert labels == ["backbone.bn1", "backbone.layer1.0.bn2", "head.bn"]
    # the tiny-variance layer is shaded on every axis
    assert all(len(ax.patches) == 1 for ax in fig.axes)
    assert fig._suptitle.get_text() == "Running statistics by depth"


def test_figures_do_not_touch_pyplot():
    import sys

    static_ranges_figure(REPORT.layers)
    assert (
        "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    )

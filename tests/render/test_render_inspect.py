"""Dynamic-inspect renderers from hand-made records: golden terminal output, figure artists,
and the HTML page's content."""

from __future__ import annotations

import base64
import io

import torch
from rich.console import Console

from bnscope.records import Finding, InspectLayer, Report
from bnscope.render.figures import batch_means_figure, consistency_figure, staleness_figure
from bnscope.render.html import inspect_html
from bnscope.render.inspect import inspect_report

LAYERS = (
    InspectLayer(
        name="stem.bn", num_features=16, status="ok", reason=None, momentum=0.1,
        calls_per_forward=1, batch_calls=40, d_mu_max=0.05, d_mu_median=0.01, d_var_max=0.09,
        d_var_median=0.02, z_mu=1.1, z_var=0.9, ema_noise_mu=0.02, batch_spread_mu=0.08,
        batch_spread_var=0.1,
    ),
    InspectLayer(
        name="layer1.bn", num_features=32, status="stale", reason=None, momentum=0.01,
        calls_per_forward=1, batch_calls=40, d_mu_max=0.41, d_mu_median=0.12, d_var_max=0.3,
        d_var_median=0.07, z_mu=48.0, z_var=9.5, ema_noise_mu=0.002, batch_spread_mu=0.03,
        batch_spread_var=0.08,
    ),
    InspectLayer(
        name="layer2.bn", num_features=32, status="noisy", reason=None, momentum=0.1,
        calls_per_forward=2, batch_calls=80, d_mu_max=0.3, d_mu_median=0.08, d_var_max=0.2,
        d_var_median=0.06, z_mu=1.4, z_var=1.2, ema_noise_mu=0.05, batch_spread_mu=0.2,
        batch_spread_var=0.3,
    ),
    InspectLayer(
        name="aux.bn", num_features=8, status="not-called", reason="never ran on the data",
        momentum=0.1, calls_per_forward=0, batch_calls=0, d_mu_max=None, d_mu_median=None,
        d_var_max=None, d_var_median=None, z_mu=None, z_var=None, ema_noise_mu=None,
        batch_spread_mu=None, batch_spread_var=None,
    ),
)  # fmt: skip
CONSISTENCY = {
    "data": "image folder data/train",
    "samples": 1280,
    "has_labels": True,
    "reference": "running",
    "variants": {
        "running": {"accuracy": 0.885, "loss": 0.31, "agreement": 1.0, "kl": 0.0, "rel_diff": 0.0},
        "precise": {"accuracy": 0.965, "loss": 0.11, "agreement": 0.9, "kl": 0.2, "rel_diff": 0.3},
        "batch": {"accuracy": 0.95, "loss": 0.15, "agreement": 0.88, "kl": 0.25, "rel_diff": 0.4},
    },
}
FINDINGS = (
    Finding(
        code="stale-ema", severity="warning", layer="layer1.bn",
        message="running statistics are 0.12 sigma away",
        fix="bnscope precise CKPT --data TRAIN_DATA would change accuracy from 88.5% to 96.5%",
    ),
    Finding(
        code="not-called", severity="warning", layer="aux.bn",
        message="the layer never ran on the data", fix="check it",
    ),
    Finding(
        code="reused", severity="info", layer="layer2.bn",
        message="called 2 times per forward", fix="give each use one",
    ),
)  # fmt: skip
REPORT = Report(
    command="inspect",
    checkpoint="runs/ckpt.pt",
    layers=LAYERS,
    findings=FINDINGS,
    extra={
        "format": "torch",
        "model": "model.py:make_model",
        "data": "image folder data/train",
        "verdict": "stale",
        "verdict_text": "Stale running statistics: 1 of 3 BN layers (layer1.bn); run precise.",
        "batches": 40,
        "samples": 1280,
        "metrics": CONSISTENCY,
    },
)


def render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def test_inspect_report_golden(golden):
    text = render(inspect_report(REPORT))
    assert text.splitlines()[0].startswith("Stale running statistics")  # verdict first
    golden("inspect_dynamic.txt", text)


def test_layers_table_puts_stale_first():
    text = render(inspect_report(REPORT))
    table = text[text.index("BN layers, worst first") :]
    assert table.index("layer1.bn") < table.index("layer2.bn") < table.index("stem.bn")


def test_staleness_figure_artists():
    fig = staleness_figure(LAYERS, 3.0).figure
    top, mid, bottom = fig.axes
    assert list(top.lines[0].get_xdata()) == [0, 1, 2]
    assert list(top.lines[0].get_ydata()) == [0.05, 0.41, 0.3]  # d_mu max
    assert list(mid.lines[1].get_ydata()) == [0.02, 0.07, 0.06]  # d_var median
    assert list(bottom.lines[0].get_ydata()) == [1.1, 48.0, 1.4]  # z (mean)
    assert any(list(line.get_ydata()) == [3.0, 3.0] for line in bottom.lines)
    assert len(top.patches) == 1  # the stale layer is shaded
    assert [t.get_text() for t in bottom.get_xticklabels()] == [r.name for r in LAYERS]


def test_batch_means_figure_marks_ema_and_population():
    arrays = {
        "channels": torch.tensor([5, 1]),
        "batch_means": torch.tensor([[1.0, 0.0], [1.2, 0.1], [0.8, -0.1]]),
        "running_mean": torch.tensor([2.0, 0.5]),
        "population_mean": torch.tensor([1.0, 0.0]),
        "population_sigma": torch.tensor([0.5, 1.0]),
    }
    fig = batch_means_figure("layer1.bn", arrays).figure
    ax = fig.axes[0]
    assert ax.get_title() == "channel 5"
    xs = [list(line.get_xdata()) for line in ax.lines]
    assert [0.0, 0.0] in xs and [2.0, 2.0] in xs  # population at 0, EMA at (2-1)/0.5
    assert sum(p.get_height() for p in ax.patches) == 3


def test_consistency_figure_with_and_without_labels():
    ax = consistency_figure(CONSISTENCY).figure.axes[0]
    assert [p.get_height() for p in ax.patches] == [0.885, 0.965, 0.95]
    nolabel = {**CONSISTENCY, "has_labels": False}
    ax = consistency_figure(nolabel).figure.axes[0]
    assert [p.get_height() for p in ax.patches] == [1.0, 0.9, 0.88]


def test_html_is_self_contained_and_complete():
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    html = inspect_html(REPORT, {"staleness": ("Staleness <by> depth", png)})
    assert html.startswith("<!DOCTYPE html>")
    assert "id='verdict'" in html and "Stale running statistics" in html
    assert "data:image/png;base64," in html and "Staleness &lt;by&gt; depth" in html
    assert "src='http" not in html and "<script" not in html  # nothing fetched
    for layer in LAYERS:
        assert layer.name in html
    for f in FINDINGS:
        assert f.code in html


EPS_CHECK = {
    "eps": 1e-5, "other_eps": 1e-3, "layers": 1, "channels": 4, "max_gain_ratio": 3.16,
    "evaluated": True,
    "variant": {"accuracy": 0.958, "loss": 0.115, "agreement": 0.785, "kl": 0.766,
                "rel_diff": 0.94},
}  # fmt: skip


def test_eps_check_is_one_more_column_when_it_ran():
    """docs/statistics.md, section 11.3: the model with the other eps beside the variants; no
    column when the check did not run (the golden report above has none)."""
    report = Report(
        command="inspect", checkpoint=None, layers=LAYERS, findings=FINDINGS,
        extra={**REPORT.extra, "eps_check": EPS_CHECK},
    )  # fmt: skip
    text = render(inspect_report(report))
    table = text[text.index("Train/test consistency") : text.index("BN layers, worst first")]
    assert "eps 0.001" in table
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if "│" in line}
    assert rows["accuracy"].rstrip("│ ").endswith("95.8%")
    assert rows["top-1 agreement with eval"].rstrip("│ ").endswith("78.5%")
    html = inspect_html(report, {})
    assert "running stats, eps 0.001" in html and "95.8%" in html
    skipped = {**EPS_CHECK, "evaluated": False, "variant": None}
    report = Report(
        command="inspect", checkpoint=None, layers=LAYERS, findings=FINDINGS,
        extra={**REPORT.extra, "eps_check": skipped},
    )  # fmt: skip
    assert "eps 0.001" not in render(inspect_report(report))
    assert "eps 0.001" not in inspect_html(report, {})

"""The test-time prior and partial adaptation as the adapt report shows them: the sweep figure
(artists hold the record values), the fourth bar, the tables and the report's figure list."""

from __future__ import annotations

import io
import math

from rich.console import Console

from bnscope.records import AdaptLayer, Report
from bnscope.render import figures as F
from bnscope.render.reports import report_figures, report_view

from .test_figures import ADAPT_METRICS, PRIOR_ROWS, unlabelled_variants

FULL_METRICS = {
    "data": "corrupted/val",
    "samples": 400,
    "has_labels": True,
    "reference": "running",
    "variants": {
        k: {"accuracy": acc, "loss": loss, "agreement": agree, "kl": kl, "rel_diff": rel}
        for k, acc, loss, agree, kl, rel in (
            ("running", 0.3425, 3.725, 1.0, 0.0, 0.0),
            ("adapted", 0.9275, 0.2118, 0.3325, 4.24, 1.03),
            ("batch", 0.9, 0.2876, 0.3425, 4.08, 1.02),
            ("prior", 0.9125, 0.25, 0.35, 3.9, 0.98),
        )
    },
}


def ydata(line) -> list[float]:
    return [float(v) for v in line.get_ydata()]


def render(renderable, width: int = 120) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def test_sweep_figure_plots_the_rows_against_n():
    plot = F.online_priors_figure(PRIOR_ROWS, ADAPT_METRICS)
    a = plot.artists
    assert ydata(a["accuracy"]) == [0.52, 0.61, 0.4, 0.31]
    assert ydata(a["agreement"]) == [0.6, 0.7, 0.9, 1.0]
    assert ydata(a["loss"]) == [1.4, 1.1, 2.0, 2.5] and a["loss"].axes is plot.axes[1]
    assert list(a["accuracy"].get_xdata()) == [0, 1, 2, 3]
    ticks = [t.get_text() for t in plot.axes[0].get_xticklabels()]
    assert ticks == ["0", "16", "256", "inf"]
    assert ydata(a["source"]) == [0.31, 0.31] and ydata(a["adapted"]) == [0.77, 0.77]
    assert "target/" in a["title"].get_text()


def test_sweep_figure_without_labels_draws_agreement_only():
    rows = [{**r, "accuracy": None, "loss": None} for r in PRIOR_ROWS]
    metrics = unlabelled_variants(
        ADAPT_METRICS, {"running": 1.0, "adapted": 0.4, "batch": 0.6}
    )
    plot = F.online_priors_figure(rows, metrics)
    a = plot.artists
    assert "accuracy" not in a and "loss" not in a and len(plot.axes) == 1
    assert ydata(a["agreement"]) == [0.6, 0.7, 0.9, 1.0]
    assert ydata(a["source"]) == [1.0, 1.0] and ydata(a["adapted"]) == [0.4, 0.4]
    assert plot.axes[0].get_ylabel() == "top-1 agreement with source"
    # no metrics at all: the rows alone
    plain = F.online_priors_figure(PRIOR_ROWS).artists
    assert "source" not in plain and "adapted" not in plain


def test_metrics_bars_show_the_test_time_prior():
    a = F.adapt_metrics_figure(FULL_METRICS, online_prior=16.0).artists
    assert [p.get_height() for p in a["bars"]] == [0.3425, 0.9275, 0.9, 0.9125]
    labels = [t.get_text() for t in a["bars"].patches[0].axes.get_xticklabels()]
    assert labels[-1] == "test-time\nprior N=16"
    assert [t.get_text() for t in a["labels"]][-1] == "91.2%"


def adapt_report(partial: bool, sweep: bool) -> Report:
    layers = (
        AdaptLayer(name="bn1", num_features=8, status="updated", calls=4, calls_per_forward=1,
                   samples=64, adapted="mean" if partial else "mean+var", weight_source=0.0,
                   d_mu_max=1.0, d_mu_median=0.5, d_var_max=0.4, d_var_median=0.2, kl_max=2.0,
                   kl_median=1.0),
        AdaptLayer(name="bn2", num_features=8, status="kept" if partial else "updated",
                   reason="kept: after the first 1 BN layer" if partial else None, calls=4,
                   calls_per_forward=1, samples=64, adapted=None if partial else "mean+var",
                   weight_source=None if partial else 0.0, d_mu_max=0.3, d_mu_median=0.1,
                   d_var_max=0.2, d_var_median=0.05, kl_max=0.3, kl_median=0.02),
    )  # fmt: skip
    extra = {
        "batches": 2, "samples": 64, "prior": 0.0, "shift_threshold": 0.1,
        "only": "mean" if partial else None, "first_layers": 1 if partial else None,
        "metrics": FULL_METRICS, "online_prior": 16.0,
    }  # fmt: skip
    if sweep:
        extra["online_priors"] = PRIOR_ROWS
    return Report(command="adapt", checkpoint=None, layers=layers, findings=(), extra=extra)


def test_adapt_view_shows_prior_column_sweep_and_partial_adaptation():
    text = render(report_view(adapt_report(partial=True, sweep=True)), width=160)
    assert "prior N=16" in text and "91.25%" in text
    assert "N pseudo samples) on corrupted/val" in " ".join(text.split())
    sweep = text.split("Test-time prior sweep")[1]
    rows = [line.split("│")[1].strip() for line in sweep.splitlines() if line.startswith("│")]
    assert rows == ["0", "16", "256", "inf"]
    assert "Partial: means only, first 1 BN layer (module order)." in " ".join(text.split())
    header = next(line for line in text.splitlines() if "KL med" in line)
    assert "adapted" in header
    bn2 = next(line for line in text.splitlines() if "│ bn2" in line)
    assert "kept: after the first 1 BN layer" in bn2 and bn2.rstrip("│ ").count("-") >= 1


def test_full_adaptation_view_has_no_partial_column_or_sweep():
    text = render(report_view(adapt_report(partial=False, sweep=False)), width=160)
    header = next(line for line in text.splitlines() if "KL med" in line)
    assert "adapted" not in header.replace("adapted stats", "")
    assert "Test-time prior sweep" not in text and "Partial:" not in text
    assert "prior N=16" in text  # the variant is there with or without a sweep


def test_report_figures_list_the_sweep_only_when_there_is_one():
    made = report_figures(adapt_report(partial=False, sweep=True))
    assert list(made) == ["domain_shift", "adapt_metrics", "online_priors"]
    caption, fig = made["adapt_metrics"]
    assert "test-time prior" in caption and len(fig.axes[0].patches) == 4
    _, fig = made["online_priors"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "16", "256", "inf"]
    assert "online_priors" not in report_figures(adapt_report(partial=False, sweep=False))
    # kept layers are measured: the shift figure draws them
    _, fig = made["domain_shift"]
    partial = report_figures(adapt_report(partial=True, sweep=False))["domain_shift"][1]
    assert len(partial.axes[0].lines[0].get_xdata()) == 2
    assert not math.isnan(float(partial.axes[0].lines[0].get_ydata()[1]))

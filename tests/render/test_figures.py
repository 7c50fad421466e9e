"""Figure functions as composable displays: each returns a Plot, draws into a user's Axes or
(Sub)Figure without touching the rest of it, and plots the record values it is given, as they
are (nothing recomputed, nothing mutated)."""

from __future__ import annotations

import copy
import functools
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bnscope.records import (
    AdaptLayer,
    GhostLayer,
    GhostLayerSize,
    InspectLayer,
    PreciseLayer,
    Report,
    StaticLayer,
)
from bnscope.render import figures as F
from bnscope.render.reports import report_figures


def static_layer(name: str, **kw: Any) -> StaticLayer:
    base = dict(
        name=name,
        num_features=4,
        num_batches_tracked=100,
        momentum=0.1,
        momentum_assumed=True,
        eps=1e-5,
        eps_assumed=True,
        ema_init_weight=0.9**100,
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


def ghost_layer(name: str, noise: list[float]) -> GhostLayer:
    sizes = tuple(
        GhostLayerSize(
            size=g,
            chunks=8,
            noise_mu=v,
            noise_var=2 * v,
            iid_mu=1.1 * v,
            iid_var=2.3 * v,
            effective_size=0.9 * g,
        )
        for g, v in zip([2, 4, 8], noise, strict=True)
    )
    return GhostLayer(name=name, num_features=4, status="analysed", sizes=sizes)


STATIC = (
    static_layer("bn1"),
    static_layer("bn2", var_min=0.0, tiny_var_channels=1, gain_max=316.0),
)
# sentinel values: medians above maxima, z unrelated to d_mu, nothing a computation would give
PRECISE = (
    PreciseLayer(
        name="bn1",
        num_features=4,
        status="updated",
        d_mu_max=0.0123,
        d_mu_median=0.0456,
        d_var_max=7.89,
        d_var_median=0.321,
    ),
    PreciseLayer(name="bn2", num_features=4, status="not-called"),
    PreciseLayer(
        name="bn3",
        num_features=4,
        status="updated",
        d_mu_max=3.21,
        d_mu_median=6.54,
        d_var_max=0.00987,
        d_var_median=0.654,
    ),
)
ADAPT = (
    AdaptLayer(
        name="bn1",
        num_features=4,
        status="updated",
        d_mu_max=0.11,
        d_mu_median=0.22,
        d_var_max=0.33,
        d_var_median=0.44,
        kl_max=5.55,
        kl_median=6.66,
    ),
    AdaptLayer(
        name="bn2",
        num_features=4,
        status="updated",
        d_mu_max=1.1,
        d_mu_median=2.2,
        d_var_max=3.3,
        d_var_median=4.4,
        kl_max=0.555,
        kl_median=0.666,
    ),
)
ADAPT_METRICS = {
    "data": "target/",
    "has_labels": True,
    "variants": {
        "running": {"accuracy": 0.31, "agreement": 1.0},
        "adapted": {"accuracy": 0.77, "agreement": 0.4},
        "batch": {"accuracy": 0.52, "agreement": 0.6},
    },
}
GHOST = (ghost_layer("a", [0.4, 0.28, 0.2]), ghost_layer("b", [0.2, 0.14, 0.1]))
#: an adapt report's test-time prior sweep (``online_priors``)
PRIOR_ROWS = [
    {"prior": 0.0, "accuracy": 0.52, "loss": 1.4, "agreement": 0.6, "kl": 0.9, "rel_diff": 0.8},
    {"prior": 16.0, "accuracy": 0.61, "loss": 1.1, "agreement": 0.7, "kl": 0.5, "rel_diff": 0.5},
    {"prior": 256.0, "accuracy": 0.4, "loss": 2.0, "agreement": 0.9, "kl": 0.1, "rel_diff": 0.2},
    {"prior": math.inf, "accuracy": 0.31, "loss": 2.5, "agreement": 1.0, "kl": 0.0,
     "rel_diff": 0.0},
]
NBS_ROWS = [
    {"size": 2, "status": "ok", "accuracy": 0.123, "agreement": 0.6, "kl": 1.7},
    {"size": 8, "status": "ok", "accuracy": 0.987, "agreement": 0.97, "kl": 0.01},
    {"size": 64, "status": "skipped", "accuracy": None, "agreement": None, "kl": None},
]
POPULATION = {"accuracy": 0.555}
INSPECT = (
    InspectLayer(
        name="stem.bn",
        num_features=4,
        status="ok",
        d_mu_max=0.05,
        d_mu_median=0.5,
        d_var_max=0.09,
        d_var_median=0.9,
        z_mu=77.0,
        z_var=0.25,
    ),
    InspectLayer(
        name="layer1.bn",
        num_features=4,
        status="stale",
        d_mu_max=0.41,
        d_mu_median=0.12,
        d_var_max=0.3,
        d_var_median=0.07,
        z_mu=1.5,
        z_var=33.0,
    ),
    InspectLayer(name="aux.bn", num_features=4, status="not-called"),
)
ARRAYS = {
    "channels": torch.tensor([3, 0]),
    "batch_means": torch.tensor([[10.0, 1.0], [12.0, 1.5], [8.0, 0.5]]),
    "running_mean": torch.tensor([13.0, 1.0]),
    "population_mean": torch.tensor([10.0, 1.0]),
    "population_sigma": torch.tensor([2.0, 0.5]),
}
#: var-convention: a layer holding standard deviations, one holding variances, a Caffe scale
#: (s = 100), a layer the fit could not judge, one that never ran (docs/statistics.md, 11.2)
CONVERTED = (
    InspectLayer(name="a.bn", num_features=4, status="stale", var_slope=0.52,
                 var_convention="std"),
    InspectLayer(name="b.bn", num_features=4, status="ok", var_slope=0.98),
    InspectLayer(name="c.bn", num_features=4, status="stale", var_slope=1.01,
                 var_convention="scale", var_scale=100.0),
    InspectLayer(name="narrow.bn", num_features=2, status="ok"),
    InspectLayer(name="aux.bn", num_features=4, status="not-called"),
)  # fmt: skip
CONVERTED_ARRAYS = {
    "a.bn": {"var_x": np.array([-2.0, 0.0, 1.0, 3.0]), "var_y": np.array([-1.0, 0.1, 0.5, 1.5]),
             "var_intercept": 0.02},
    "b.bn": {"var_x": np.array([-1.0, 0.5, 2.0]), "var_y": np.array([-1.0, 0.5, 1.9]),
             "var_intercept": -0.01},
    "c.bn": {"var_x": np.array([0.0, 1.0, 2.0]), "var_y": np.array([4.6, 5.6, 6.6]),
             "var_intercept": 4.6},
    "narrow.bn": {},
}  # fmt: skip
CONSISTENCY = {
    "has_labels": True,
    "variants": {
        "running": {"accuracy": 0.4, "agreement": 1.0},
        "precise": {"accuracy": 0.9, "agreement": 0.7},
        "batch": {"accuracy": 0.8, "agreement": 0.6},
    },
}

PRECISE_METRICS = {
    "data": "val/",
    "samples": 200,
    "has_labels": True,
    "reference": "running",
    "variants": {
        "running": {"accuracy": 0.885, "loss": 0.3, "agreement": 1.0, "kl": 0.0, "rel_diff": 0.0},
        "precise": {"accuracy": 0.965, "loss": 0.1, "agreement": 0.915, "kl": 0.18,
                    "rel_diff": 0.3},
    },
}


def unlabelled_variants(metrics: dict, agreement: dict) -> dict:
    """``metrics`` without labels: accuracy and loss unknown, top-1 agreement as given."""
    variants = {
        k: {**v, "accuracy": None, "loss": None, "agreement": agreement[k]}
        for k, v in metrics["variants"].items()
    }
    return {**metrics, "has_labels": False, "variants": variants}

def leakage_row(name: str, role: str, kl: float, accuracy: float, ratio=None, leak=None) -> dict:
    return {"name": name, "role": role, "group_by": None if role != "grouped" else name,
            "groups": None, "largest_group": None, "single_group_batches": None,
            "accuracy": accuracy, "loss": 0.1, "agreement": 1.0, "kl_mean": kl,
            "kl_median": kl / 2, "l2_mean": kl, "l2_median": kl, "ratio": ratio,
            "excess": None, "greater_fraction": None, "leak": leak}  # fmt: skip


LEAKAGE_ROWS = [
    leakage_row("iid", "reference", 0.0, 0.98),
    leakage_row("iid-2", "noise", 0.05, 0.97),
    leakage_row("label", "grouped", 5.0, 0.28, ratio=100.0, leak=True),
]
LEAKAGE_CHANGES = {"iid-2": torch.tensor([0.0, 0.01, 0.1]), "label": torch.tensor([4.0, 5.0])}

# name -> (function, positional arguments, panels, default figure size)
CASES: dict[str, tuple[Callable[..., F.Plot], tuple, int, tuple[float, float]]] = {
    "static_ranges": (F.static_ranges_figure, (STATIC,), 3, (6.0, 7.5)),
    "change": (F.change_figure, (PRECISE,), 2, (6.0, 5.5)),
    "change_metrics": (
        functools.partial(F.change_figure, metrics=PRECISE_METRICS),
        (PRECISE,),
        3,
        (9.0, 5.5),
    ),
    "shift": (F.shift_figure, (ADAPT,), 3, (6.0, 7.0)),
    "adapt_metrics": (F.adapt_metrics_figure, (ADAPT_METRICS,), 1, (5.5, 3.8)),
    "online_priors": (F.online_priors_figure, (PRIOR_ROWS, ADAPT_METRICS), 1, (6.0, 4.0)),
    "ghost_noise": (F.ghost_noise_figure, (GHOST,), 2, (10.0, 4.2)),
    "nbs_curve": (F.nbs_curve_figure, (NBS_ROWS, POPULATION), 1, (6.0, 4.0)),
    "staleness": (F.staleness_figure, (INSPECT,), 3, (6.0, 7.5)),
    "batch_means": (F.batch_means_figure, ("layer1.bn", ARRAYS), 2, (6.2, 3.2)),
    "consistency": (F.consistency_figure, (CONSISTENCY,), 1, (5.5, 3.8)),
    "conversion": (F.conversion_figure, (CONVERTED, CONVERTED_ARRAYS), 3, (11.4, 3.9)),
    "leakage": (F.leakage_figure, (LEAKAGE_ROWS, LEAKAGE_CHANGES), 3, (13.2, 3.9)),
    "leakage_rows": (F.leakage_figure, (LEAKAGE_ROWS,), 2, (9.0, 3.9)),
}
SINGLE = ["adapt_metrics", "online_priors", "nbs_curve", "consistency"]
MULTI = [name for name in CASES if name not in SINGLE]
TWIN = {"nbs_curve": 1, "online_priors": 1}  # extra twin axes (the KL axis, the loss axis)


def flat(artists: dict[str, Any]) -> list[Any]:
    """Every artist of a Plot (lists and bar containers unpacked)."""
    out: list[Any] = []
    for value in artists.values():
        out += list(value) if isinstance(value, (list, tuple)) else [value]
    return [a for v in out for a in (v if isinstance(v, tuple) else [v])]


def drawn(ax) -> bool:
    return bool(ax.lines or ax.patches or ax.collections or ax.texts or ax.get_title())


@pytest.mark.parametrize("name", CASES)
def test_default_call_returns_a_plot(name):
    fn, args, panels, size = CASES[name]
    plot = fn(*args)
    assert isinstance(plot, F.Plot) and isinstance(plot.figure, Figure)
    assert len(plot.figure.axes) == panels + TWIN.get(name, 0)
    assert list(plot.axes) == plot.figure.axes
    # the default output as before: size, dpi and constrained layout of a new figure
    assert tuple(plot.figure.get_size_inches()) == pytest.approx(size)
    assert plot.figure.dpi == 100.0
    assert plot.figure.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    artists = flat(plot.artists)
    assert artists and "title" in plot.artists
    for artist in artists:
        assert F._root(artist) is plot.figure
    buf = io.BytesIO()
    plot.savefig(buf, format="png", dpi=40)
    assert buf.getvalue().startswith(b"\x89PNG")


@pytest.mark.parametrize("name", SINGLE)
def test_single_panel_draws_only_into_the_given_axes(name):
    fn, args, _, _ = CASES[name]
    fig = Figure(figsize=(7.0, 3.0))
    mine, other = fig.subplots(1, 2)
    plot = fn(*args, ax=mine)
    assert plot.figure is fig and plot.axes[0] is mine
    assert len(plot.axes) == 1 + TWIN.get(name, 0)
    assert drawn(mine) and not drawn(other)
    assert all(a is mine or a in plot.axes for a in fig.axes if a is not other)
    assert tuple(fig.get_size_inches()) == (7.0, 3.0)
    assert fig._suptitle is None and not fig.legends
    assert fig.get_layout_engine() is None


@pytest.mark.parametrize("name", MULTI)
def test_multi_panel_draws_only_into_the_given_subfigure(name):
    fn, args, panels, _ = CASES[name]
    fig = Figure(figsize=(12.0, 6.0))
    mine, theirs = fig.subfigures(1, 2)
    other = theirs.subplots()
    plot = fn(*args, fig=mine)
    assert plot.figure is fig
    assert list(plot.axes) == mine.axes and len(mine.axes) == panels
    assert theirs.axes == [other] and not drawn(other)
    assert tuple(fig.get_size_inches()) == (12.0, 6.0)
    assert fig._suptitle is None and mine._suptitle is plot.artists["title"]
    assert fig.get_layout_engine() is None


@pytest.mark.parametrize("name", CASES)
def test_given_figure_gets_the_panels_added(name):
    fn, args, panels, _ = CASES[name]
    fig = Figure(figsize=(8.0, 8.0))
    existing = fig.add_axes((0.0, 0.0, 0.1, 0.1))
    plot = fn(*args, fig=fig)
    assert plot.figure is fig
    assert fig.axes[0] is existing and not drawn(existing)
    assert fig.axes[1:] == list(plot.axes)
    assert len(plot.axes) == panels + TWIN.get(name, 0)
    assert tuple(fig.get_size_inches()) == (8.0, 8.0) and fig.get_layout_engine() is None


def test_single_panel_refuses_ax_and_fig_together():
    fig = Figure()
    with pytest.raises(ValueError, match="ax= or fig="):
        F.consistency_figure(CONSISTENCY, fig=fig, ax=fig.subplots())


def snapshot(value: Any) -> Any:
    """A comparable deep copy (tensors and numpy arrays as lists)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


@pytest.mark.parametrize("name", CASES)
def test_records_are_not_mutated(name):
    fn, args, _, _ = CASES[name]
    before = snapshot(args)
    fn(*args)
    assert snapshot(args) == before


def ydata(line) -> list[float]:
    return [float(v) for v in line.get_ydata()]


def test_change_plots_the_record_values():
    plot = F.change_figure(PRECISE)
    a = plot.artists
    assert list(a["d_mu_max"].get_xdata()) == [0, 2]  # the not-called layer is left out
    assert ydata(a["d_mu_max"]) == [0.0123, 3.21]
    assert ydata(a["d_mu_median"]) == [0.0456, 6.54]
    assert ydata(a["d_var_max"]) == [7.89, 0.00987]
    assert ydata(a["d_var_median"]) == [0.321, 0.654]


def test_shift_plots_the_record_values():
    a = F.shift_figure(ADAPT).artists
    assert ydata(a["kl_max"]) == [5.55, 0.555] and ydata(a["kl_median"]) == [6.66, 0.666]
    assert ydata(a["d_var_median"]) == [0.44, 4.4]
    assert "shift_threshold" not in a


def test_shift_draws_the_domain_shift_threshold_of_the_report():
    plot = F.shift_figure(ADAPT, shift_threshold=0.25)
    line = plot.artists["shift_threshold"]
    assert line.axes is plot.axes[0] and ydata(line) == [0.25, 0.25]
    report = Report(
        command="adapt", checkpoint=None, layers=ADAPT, findings=(),
        extra={"shift_threshold": 0.125},
    )  # fmt: skip
    caption, fig = report_figures(report)["domain_shift"]
    assert [float(v) for v in fig.axes[0].lines[-1].get_ydata()] == [0.125, 0.125]
    assert "0.125" in caption


def test_staleness_plots_the_record_values():
    plot = F.staleness_figure(INSPECT, stale_z=2.5)
    a = plot.artists
    assert ydata(a["d_mu_max"]) == [0.05, 0.41] and ydata(a["d_mu_median"]) == [0.5, 0.12]
    assert ydata(a["d_var_max"]) == [0.09, 0.3] and ydata(a["d_var_median"]) == [0.9, 0.07]
    assert ydata(a["z_mu"]) == [77.0, 1.5] and ydata(a["z_var"]) == [0.25, 33.0]
    assert ydata(a["stale_threshold"]) == [2.5, 2.5]
    assert len(a["stale_spans"]) == 3  # the stale layer, on each panel


def test_staleness_draws_both_criteria_of_stale():
    plot = F.staleness_figure(INSPECT, stale_z=2.5, material_gap=0.07)
    a = plot.artists
    top, mid, bottom = plot.axes
    # the median gap must exceed material_gap (d_mu and d_var panels) ...
    assert [ydata(line) for line in a["material_threshold"]] == [[0.07, 0.07]] * 2
    assert [line.axes for line in a["material_threshold"]] == [top, mid]
    # ... and z must exceed stale_z (z panel)
    assert a["stale_threshold"].axes is bottom and ydata(a["stale_threshold"]) == [2.5, 2.5]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert "material: median above 0.07" in legend and "stale (both criteria)" in legend
    assert "stale: z above 2.5" in [t.get_text() for t in bottom.get_legend().get_texts()]
    # shaded: the layers whose status is stale, and only those
    centres = {round(s.get_x() + s.get_width() / 2) for s in a["stale_spans"]}
    assert centres == {i for i, r in enumerate(INSPECT) if r.status == "stale"}


def test_staleness_of_a_report_uses_the_thresholds_of_the_table():
    from bnscope.ops.inspect import MATERIAL_GAP, STALE_Z

    fig = report_figures(inspect_report(INSPECT_RANKED))["staleness"][1]
    top, mid, bottom = fig.axes
    assert [float(top.lines[-1].get_ydata()[0]), float(mid.lines[-1].get_ydata()[0])] == [
        MATERIAL_GAP,
        MATERIAL_GAP,
    ]
    assert [float(line.get_ydata()[0]) for line in bottom.lines[2:]] == [STALE_Z, 1.0]


def inspect_layer(name: str, status: str, d_mu_median: float, d_var_median: float, **kw):
    base: dict[str, Any] = dict(
        name=name, num_features=4, status=status, d_mu_max=2 * d_mu_median,
        d_mu_median=d_mu_median, d_var_max=2 * d_var_median, d_var_median=d_var_median,
        z_mu=5.0, z_var=5.0,
    )  # fmt: skip
    base.update(kw)
    return InspectLayer(**base)


# the ok layer has by far the largest d_mu_max; the table puts worst.stale first (its larger
# median gap, d_var), then mild.stale, then the noisy layer
INSPECT_RANKED = (
    inspect_layer("big.ok", "ok", 0.01, 0.01, d_mu_max=9.0),
    inspect_layer("mild.stale", "stale", 0.06, 0.02),
    inspect_layer("loud.noisy", "noisy", 0.5, 0.5, z_mu=1.0, z_var=1.0),
    inspect_layer("worst.stale", "stale", 0.03, 0.2),
    InspectLayer(name="aux.bn", num_features=4, status="not-called"),
)


def inspect_report(layers) -> Report:
    return Report(
        command="inspect",
        checkpoint=None,
        layers=tuple(layers),
        findings=(),
        extra={"metrics": CONSISTENCY},
        arrays={r.name: ARRAYS for r in layers if r.d_mu_median is not None},
    )


def test_batch_means_of_a_report_show_the_most_stale_layer_of_the_table():
    from bnscope.render.inspect import layers_table

    table = layers_table(INSPECT_RANKED)
    rows = [(row[0].plain, row[1].plain) for row in table.rows]
    assert next(name for name, status in rows if status == "stale") == "worst.stale"
    caption, fig = report_figures(inspect_report(INSPECT_RANKED))["batch_means"]
    assert fig._suptitle.get_text().startswith("worst.stale (stale): ")
    assert "worst.stale is the most stale layer" in caption


def test_batch_means_without_a_stale_layer_name_the_layers_status():
    layers = [r for r in INSPECT_RANKED if r.status != "stale"]
    caption, fig = report_figures(inspect_report(layers))["batch_means"]
    # the table's first layer, the noisy one, and the title does not call it stale
    assert fig._suptitle.get_text().startswith("loud.noisy (noisy): ")
    assert "no layer is stale" in caption


def test_batch_means_only_centres_and_scales_the_arrays():
    a = F.batch_means_figure("layer1.bn", ARRAYS).artists
    # channel 3: population 10, sigma 2, running 13 -> EMA at 1.5; batch means at 0, 1, -1
    assert [list(line.get_xdata()) for line in a["population"]] == [[0.0, 0.0]] * 2
    assert [float(line.get_xdata()[0]) for line in a["running_mean"]] == [1.5, 0.0]
    bars = a["batch_means"][0]
    assert sum(p.get_height() for p in bars) == 3
    left = min(p.get_x() for p in bars)
    right = max(p.get_x() + p.get_width() for p in bars)
    assert (left, right) == pytest.approx((-1.0, 1.0))


def test_conversion_plots_the_fitted_points_and_the_three_lines():
    plot = F.conversion_figure(CONVERTED, CONVERTED_ARRAYS)
    a = plot.artists
    # converted layers in module order, then one layer holding variances for comparison
    assert [ax.get_title() for ax in plot.axes] == [
        "a.bn: std", "c.bn: scale, s = 100", "b.bn: variances (for comparison)"]  # fmt: skip
    for points, name in zip(a["points"], ("a.bn", "c.bn", "b.bn"), strict=True):
        arrays = CONVERTED_ARRAYS[name]
        pairs = zip(arrays["var_x"], arrays["var_y"], strict=True)
        assert points.get_offsets().tolist() == [list(p) for p in pairs]
    # the line of variances: y = x over the points' range
    assert [list(line.get_xdata()) for line in a["variances"]] == [[-2, 3], [0, 2], [-1, 2]]
    assert [ydata(line) for line in a["variances"]] == [[-2, 3], [0, 2], [-1, 2]]
    # the fit: intercept + slope x, with the report's slope and the arrays' intercept
    assert ydata(a["fitted"][0]) == pytest.approx([0.02 - 2 * 0.52, 0.02 + 3 * 0.52])
    assert ydata(a["fitted"][2]) == pytest.approx([-0.01 - 0.98, -0.01 + 2 * 0.98])
    # what the conversion predicts: slope 1/2 through 0; slope 1 offset by log s
    assert len(a["expected"]) == 2
    assert ydata(a["expected"][0]) == pytest.approx([-1.0, 1.5])
    assert ydata(a["expected"][1]) == pytest.approx([math.log(100), 2 + math.log(100)])
    legend = [t.get_text() for t in plot.axes[0].get_legend().get_texts()]
    assert legend == ["channels", "variances (slope 1)", "fit: slope 0.52",
                      "standard deviations (slope 1/2)"]  # fmt: skip


def test_conversion_draws_at_most_limit_converted_layers_and_no_reference_without_one():
    only = tuple(r for r in CONVERTED if r.name != "b.bn")
    plot = F.conversion_figure(only, CONVERTED_ARRAYS, limit=1)
    assert [ax.get_title() for ax in plot.axes] == ["a.bn: std"]
    assert len(plot.artists["fitted"]) == 1 and len(plot.artists["expected"]) == 1


def test_conversion_figure_is_in_a_report_only_when_some_layer_is_converted():
    converted = Report(command="inspect", checkpoint=None, layers=CONVERTED, findings=(),
                       extra={"metrics": CONSISTENCY},
                       arrays={**{r.name: dict(ARRAYS) for r in CONVERTED},
                               **{k: {**ARRAYS, **v} for k, v in CONVERTED_ARRAYS.items()}})
    made = report_figures(converted)
    assert "conversion" in made and "var-convention" in made["conversion"][0]
    assert [ax.get_title() for ax in made["conversion"][1].axes][:2] == [
        "a.bn: std", "c.bn: scale, s = 100"]  # fmt: skip
    healthy = Report(command="inspect", checkpoint=None, layers=CONVERTED[1:2], findings=(),
                     extra={"metrics": CONSISTENCY},
                     arrays={"b.bn": {**ARRAYS, **CONVERTED_ARRAYS["b.bn"]}})
    assert "conversion" not in report_figures(healthy)  # fmt: skip


def test_nbs_curve_plots_the_rows():
    plot = F.nbs_curve_figure(NBS_ROWS, POPULATION)
    a = plot.artists
    assert list(a["batch_stats"].get_xdata()) == [2, 8]  # the skipped size is left out
    assert ydata(a["batch_stats"]) == [0.123, 0.987]
    assert ydata(a["population"]) == [0.555, 0.555]
    assert ydata(a["kl"]) == [1.7, 0.01]
    assert a["kl"].axes is plot.axes[1]
    nolabel = F.nbs_curve_figure([{**r, "accuracy": None} for r in NBS_ROWS], {"accuracy": None})
    assert ydata(nolabel.artists["batch_stats"]) == [0.6, 0.97]


def test_ghost_noise_plots_the_layer_sizes():
    a = F.ghost_noise_figure(GHOST).artists
    assert [ydata(line) for line in a["noise_mu"]] == [[0.4, 0.28, 0.2], [0.2, 0.14, 0.1]]
    assert ydata(a["noise_var"][1]) == [0.4, 0.28, 0.2]


def test_ghost_noise_draws_each_layers_iid_expectation_in_its_colour():
    a = F.ghost_noise_figure(GHOST).artists
    # one dashed expectation per layer, its own values, in the colour of its measured line
    assert [ydata(line) for line in a["iid_mu"]] == [
        pytest.approx([0.44, 0.308, 0.22]),
        pytest.approx([0.22, 0.154, 0.11]),
    ]
    assert [ydata(line) for line in a["iid_var"]] == [
        pytest.approx([0.92, 0.644, 0.46]),
        pytest.approx([0.46, 0.322, 0.23]),
    ]
    for key in ("mu", "var"):
        for measured, iid in zip(a[f"noise_{key}"], a[f"iid_{key}"], strict=True):
            assert iid.get_color() == measured.get_color() and iid.get_linestyle() == "--"
            assert list(iid.get_xdata()) == [2, 4, 8]


@pytest.mark.parametrize("key", ["mu", "var"])
def test_ghost_noise_guide_has_slope_minus_one_half_on_log_axes(key):
    plot = F.ghost_noise_figure(GHOST)
    guide = plot.artists[f"slope_{key}"]
    ax = guide.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    g = np.asarray(guide.get_xdata(), dtype=float)
    y = np.asarray(guide.get_ydata(), dtype=float)
    assert list(g) == [2, 4, 8]
    assert np.diff(np.log(y)) / np.diff(np.log(g)) == pytest.approx([-0.5, -0.5])
    # through the median over layers of the expectation at the smallest size
    first = [0.44, 0.22] if key == "mu" else [0.92, 0.46]
    assert y[0] == pytest.approx(float(np.median(first)))


def test_ghost_noise_without_expectations_has_no_guide():
    layers = [
        GhostLayer(
            name="a", num_features=4, status="analysed",
            sizes=tuple(
                GhostLayerSize(size=g, chunks=8, noise_mu=0.1, noise_var=0.2, iid_mu=None,
                               iid_var=None, effective_size=None)
                for g in (2, 4)
            ),
        )
    ]  # fmt: skip
    a = F.ghost_noise_figure(layers).artists
    assert "iid_mu" not in a and "slope_mu" not in a and len(a["noise_mu"]) == 1


def test_bars_plot_the_metrics():
    a = F.adapt_metrics_figure(ADAPT_METRICS).artists
    assert [p.get_height() for p in a["bars"]] == [0.31, 0.77, 0.52]
    assert [t.get_text() for t in a["labels"]] == ["31.0%", "77.0%", "52.0%"]
    a = F.consistency_figure(CONSISTENCY).artists
    assert [p.get_height() for p in a["bars"]] == [0.4, 0.9, 0.8]


def test_static_ranges_plots_the_ranges():
    a = F.static_ranges_figure(STATIC, tiny_var=1e-4).artists
    segs = a["running_mean"].get_segments()
    assert [tuple(s[:, 1]) for s in segs] == [(-0.5, 0.25), (-0.5, 0.25)]
    assert [list(z.get_xdata()) for z in a["zeros"]] == [[1]]  # bn2's zero variance
    assert ydata(a["thresholds"][0]) == [1e-4, 1e-4]
    assert len(a["shaded"]) == 3  # the tiny-variance layer, on each panel


def test_change_with_metrics_has_before_and_after_accuracy_bars():
    plot = F.change_figure(PRECISE, metrics=PRECISE_METRICS)
    a = plot.artists
    assert len(plot.axes) == 3 and a["bars"].patches[0].axes is plot.axes[2]
    assert [p.get_height() for p in a["bars"]] == [0.885, 0.965]
    assert [t.get_text() for t in a["labels"]] == ["88.5%", "96.5%"]
    ticks = [t.get_text() for t in plot.axes[2].get_xticklabels()]
    assert [t.split("\n")[0] for t in ticks] == ["before", "after"]
    assert plot.axes[2].get_ylabel() == "accuracy"
    assert "val/" in a["metrics_title"].get_text()
    # the depth panels are unchanged
    assert ydata(a["d_mu_median"]) == [0.0456, 6.54]


def test_change_without_metrics_has_no_bars():
    plot = F.change_figure(PRECISE)
    assert len(plot.axes) == 2 and "bars" not in plot.artists
    assert not any(ax.patches for ax in plot.axes)


def test_change_metrics_without_labels_show_agreement_or_na():
    unlabelled = unlabelled_variants(PRECISE_METRICS, {"running": 1.0, "precise": 0.915})
    plot = F.change_figure(PRECISE, metrics=unlabelled)
    assert [p.get_height() for p in plot.artists["bars"]] == [1.0, 0.915]
    assert plot.axes[2].get_ylabel() == "top-1 agreement with the model before"
    unknown = unlabelled_variants(PRECISE_METRICS, {"running": None, "precise": None})
    plot = F.change_figure(PRECISE, metrics=unknown)
    assert all(math.isnan(p.get_height()) for p in plot.artists["bars"])
    assert [t.get_text() for t in plot.artists["labels"]] == ["n/a", "n/a"]


def precise_report(metrics: dict | None) -> Report:
    extra = {"metrics": metrics} if metrics else {}
    return Report(command="precise", checkpoint=None, layers=PRECISE, findings=(), extra=extra)


def test_precise_report_figure_has_the_evaluation_only_with_metrics():
    caption, fig = report_figures(precise_report(PRECISE_METRICS))["precise_change"]
    assert len(fig.axes) == 3 and "before and after" in caption
    heights = [p.get_height() for p in fig.axes[2].patches]
    assert heights == [0.885, 0.965]
    caption, fig = report_figures(precise_report(None))["precise_change"]
    assert len(fig.axes) == 2 and "before and after" not in caption


def test_unknown_agreement_is_drawn_as_na_not_as_zero():
    metrics = unlabelled_variants(ADAPT_METRICS, {"running": 1.0, "adapted": 0.4, "batch": None})
    a = F.adapt_metrics_figure(metrics).artists
    heights = [p.get_height() for p in a["bars"]]
    assert heights[:2] == [1.0, 0.4] and math.isnan(heights[2])
    assert [t.get_text() for t in a["labels"]] == ["100.0%", "40.0%", "n/a"]
    one = unlabelled_variants(CONSISTENCY, {"running": 1.0, "precise": 0.7, "batch": None})
    plot = F.consistency_figure(one)
    a = plot.artists
    heights = [p.get_height() for p in a["bars"]]
    assert heights[:2] == [1.0, 0.7] and math.isnan(heights[2])
    assert [t.get_text() for t in a["labels"]] == ["100.0%", "70.0%", "n/a"]
    # the absent bar keeps its place: its tick and its "n/a" are in view
    left, right = plot.axes[0].get_xlim()
    assert left < a["labels"][2].xy[0] < right
    assert len(plot.axes[0].get_xticklabels()) == 3
    # no class scores: nothing is known, not even the reference's agreement with itself
    none = unlabelled_variants(CONSISTENCY, {"running": None, "precise": None, "batch": None})
    a = F.consistency_figure(none).artists
    assert all(math.isnan(p.get_height()) for p in a["bars"])
    assert [t.get_text() for t in a["labels"]] == ["n/a"] * 3


@pytest.mark.parametrize("name", CASES)
def test_every_axis_is_labelled(name):
    fn, args, _, _ = CASES[name]
    plot = fn(*args)
    for ax in plot.axes:
        assert ax.get_ylabel(), f"{name}: an Axes without a y label"
        if not ax.get_xlabel():  # a panel sharing x with a labelled one below it
            siblings = [o for o in ax.get_shared_x_axes().get_siblings(ax) if o is not ax]
            assert any(o.get_xlabel() for o in siblings), f"{name}: an Axes without an x label"


LOG_FIGURES = {"static_ranges", "change", "change_metrics", "shift", "ghost_noise", "staleness",
               "nbs_curve", "leakage", "leakage_rows"}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_log_axes_have_plain_number_tick_labels(name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fn, args, _, _ = CASES[name]
    plot = fn(*args)
    FigureCanvasAgg(plot.figure).draw()
    logs = 0
    for ax in plot.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale != "log":
                continue
            logs += 1
            texts = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
            assert texts, f"{name}: a log axis without tick labels"
            for text in texts:  # 0.05, 3, 1e-05: no mathtext such as 5×10^{-2}
                assert "$" not in text and "×" not in text, text
                float(text.replace("\N{MINUS SIGN}", "-"))
    assert (logs > 0) == (name in LOG_FIGURES)


@pytest.mark.parametrize("name", CASES)
def test_default_png_is_deterministic(name):
    fn, args, _, _ = CASES[name]
    pngs = []
    for _ in range(2):
        buf = io.BytesIO()
        fn(*args).savefig(buf, format="png", dpi=40)
        pngs.append(buf.getvalue())
    assert pngs[0] == pngs[1]

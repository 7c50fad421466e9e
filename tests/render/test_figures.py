"""Figure functions as composable displays: each returns a Plot, draws into a user's Axes or
(Sub)Figure without touching the rest of it, and plots the record values it is given, as they
are (nothing recomputed, nothing mutated)."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure

from bnscope.records import (
    AdaptLayer,
    GhostLayer,
    GhostLayerSize,
    InspectLayer,
    PreciseLayer,
    StaticLayer,
)
from bnscope.render import figures as F


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
CONSISTENCY = {
    "has_labels": True,
    "variants": {
        "running": {"accuracy": 0.4, "agreement": 1.0},
        "precise": {"accuracy": 0.9, "agreement": 0.7},
        "batch": {"accuracy": 0.8, "agreement": 0.6},
    },
}

# name -> (function, positional arguments, panels, default figure size)
CASES: dict[str, tuple[Callable[..., F.Plot], tuple, int, tuple[float, float]]] = {
    "static_ranges": (F.static_ranges_figure, (STATIC,), 3, (6.0, 7.5)),
    "change": (F.change_figure, (PRECISE,), 2, (6.0, 5.5)),
    "shift": (F.shift_figure, (ADAPT,), 3, (6.0, 7.0)),
    "adapt_metrics": (F.adapt_metrics_figure, (ADAPT_METRICS,), 1, (5.5, 3.8)),
    "ghost_noise": (F.ghost_noise_figure, (GHOST,), 2, (10.0, 4.2)),
    "nbs_curve": (F.nbs_curve_figure, (NBS_ROWS, POPULATION), 1, (6.0, 4.0)),
    "staleness": (F.staleness_figure, (INSPECT,), 3, (6.0, 7.5)),
    "batch_means": (F.batch_means_figure, ("layer1.bn", ARRAYS), 2, (6.2, 3.2)),
    "consistency": (F.consistency_figure, (CONSISTENCY,), 1, (5.5, 3.8)),
}
SINGLE = ["adapt_metrics", "nbs_curve", "consistency"]
MULTI = [name for name in CASES if name not in SINGLE]
TWIN = {"nbs_curve": 1}  # extra twin axes (the KL axis)


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
    """A comparable deep copy (tensors as lists)."""
    if isinstance(value, torch.Tensor):
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


def test_staleness_plots_the_record_values():
    plot = F.staleness_figure(INSPECT, stale_z=2.5)
    a = plot.artists
    assert ydata(a["d_mu_max"]) == [0.05, 0.41] and ydata(a["d_mu_median"]) == [0.5, 0.12]
    assert ydata(a["d_var_max"]) == [0.09, 0.3] and ydata(a["d_var_median"]) == [0.9, 0.07]
    assert ydata(a["z_mu"]) == [77.0, 1.5] and ydata(a["z_var"]) == [0.25, 33.0]
    assert ydata(a["stale_threshold"]) == [2.5, 2.5]
    assert len(a["stale_spans"]) == 3  # the stale layer, on each panel


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
    assert ydata(a["iid_mu"]) == pytest.approx([0.22, 0.154, 0.11])  # layer b's iid_mu


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

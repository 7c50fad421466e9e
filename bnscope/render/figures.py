"""matplotlib figures of computed records, to save or to compose into your own figures.

Each function takes records (a report's ``layers``, ``arrays`` or ``extra`` dicts), draws them
and returns a :class:`Plot` (in the manner of scikit-learn's ``*Display`` objects): the
figure, the Axes drawn on and the artists by name. None of them computes a statistic: every
value drawn is read from the records given, at most transformed for display (log scales and
their floors, batch means centred on the population mean in units of its sigma).

Where they draw:

- with nothing given, into a new ``matplotlib.figure.Figure`` (not pyplot: nothing global is
  touched, nothing leaks) with constrained layout, sized for the number of layers, titled:
  what ``--report-dir`` writes;
- multi-panel figures (``static_ranges``, ``change``, ``shift``, ``ghost_noise``,
  ``staleness``, ``batch_means``, ``conversion``) take ``fig=``, a Figure or a SubFigure
  (``fig.subfigures``), and add their panels to it, with their title as its suptitle;
- single-panel figures (``adapt_metrics``, ``online_priors``, ``nbs_curve``,
  ``consistency``) take ``ax=`` and draw into that Axes only (``nbs_curve`` adds its twin KL
  axis there, ``online_priors`` its loss axis), or ``fig=`` (one Axes added to it).

Size, layout engine and figure-level legends are set only on a figure the function created;
a figure passed in keeps its size and layout. matplotlib is imported inside the functions so
that importing bnscope (and ``bnscope --help``) stays fast.
"""

from __future__ import annotations

import functools
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..records import StaticLayer

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, FigureBase


#: where the figures read each evaluation's variants in a report's ``metrics``: (key, bar
#: label). The one place that names these keys.
PRECISE_VARIANTS = (("running", "before\n(running stats)"), ("precise", "after\n(precise stats)"))
ADAPT_VARIANTS = (
    ("running", "source stats"),
    ("adapted", "adapted stats"),
    ("batch", "test-batch stats"),
)


@dataclass(frozen=True, eq=False)
class Plot:
    """What a figure function drew.

    ``figure``: the root :class:`~matplotlib.figure.Figure` (what to save, also when the plot
    was drawn into a SubFigure or a user's Axes); ``axes``: the Axes drawn on, in panel order
    (a twin axis last); ``artists``: name -> artist or list of artists (each function's
    docstring lists its names; a name is absent when there was nothing to draw)."""

    figure: Figure
    axes: tuple[Axes, ...]
    artists: dict[str, Any]

    def savefig(self, fname: Any, **kwargs: Any) -> None:
        """``self.figure.savefig(fname, **kwargs)``."""
        self.figure.savefig(fname, **kwargs)


def _root(obj: Any) -> Figure:
    """The root Figure of an Axes, SubFigure or Figure."""
    from matplotlib.figure import Figure

    while not isinstance(obj, Figure):
        obj = obj.figure
    return obj


def _panels(fig: FigureBase | None, figsize: tuple[float, float]) -> FigureBase:
    """``fig``, or a new constrained-layout Figure of ``figsize``."""
    if fig is not None:
        return fig
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _one_axes(
    ax: Axes | None, fig: FigureBase | None, figsize: tuple[float, float]
) -> tuple[Axes, bool]:
    """The Axes a single-panel figure draws into, and whether this call created its figure."""
    if ax is not None and fig is not None:
        raise ValueError("pass ax= or fig=, not both")
    if ax is not None:
        return ax, False
    if fig is not None:
        return fig.add_subplot(), False
    return _panels(None, figsize).subplots(), True


@functools.cache
def _plain_log_formatter_class() -> type:
    """A LogFormatterSciNotation that writes its labels as plain numbers (``0.05``, ``3``,
    ``1e-05``) instead of ``5×10⁻²``; which ticks get a label is still matplotlib's choice
    (decades only over several decades, some minor ticks over one)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return self.fix_minus(f"{x:g}") if super().__call__(x, pos) else ""

    return PlainLogFormatter


def _log_scale(ax: Axes, axis: str = "y", base: float = 10) -> None:
    """Put ``ax``'s ``axis`` ("x" or "y") on a log scale with readable tick labels."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", base=base)
    plain = _plain_log_formatter_class()
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(plain(base))
    target.set_minor_formatter(plain(base, labelOnlyBase=False))


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


def _log_floor(values: Sequence[float]) -> float:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return min(positive) / 10 if positive else 1e-6


def _max_median(ax, layers: Sequence, x: list[int], stem: str, label: str) -> dict[str, Any]:
    """Max and median over channels of ``<stem>_max``/``<stem>_median`` at layer positions
    ``x`` (log scale when positive), with the axis label and grid. Returns the two lines as
    ``<stem>_max`` and ``<stem>_median``."""
    mx = [_finite(getattr(layers[i], f"{stem}_max")) for i in x]
    md = [_finite(getattr(layers[i], f"{stem}_median")) for i in x]
    (line_max,) = ax.plot(x, mx, "o-", color="C3", label="max over channels")
    (line_median,) = ax.plot(x, md, "s--", color="C0", label="median over channels")
    if any(v > 0 for v in mx + md):
        _log_scale(ax)
    ax.set_ylabel(label, fontsize=8)
    ax.grid(True, alpha=0.3)
    return {f"{stem}_max": line_max, f"{stem}_median": line_median}


def _layer_axis(ax, layers: Sequence, xlabel: str = "BN layer (module order)") -> None:
    """Layer names (module order) along the x axis."""
    n = len(layers)
    ax.set_xlim(-0.6, max(n - 0.4, 0.6))
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels([r.name for r in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)


def _by_depth_size(n: int, height: float) -> tuple[float, float]:
    return (max(6.0, 0.35 * n + 3), height)


def static_ranges_figure(
    layers: Sequence[StaticLayer],
    fig: FigureBase | None = None,
    tiny_var: float | None = None,
    tiny_gain: float | None = None,
) -> Plot:
    """Per-layer running-statistic ranges by depth: running_mean, running_var and the eval-mode
    gain |gamma|/sqrt(var+eps), each as a min..max bar per layer (log scale for var and gain;
    zeros are drawn as 'x' at the bottom of the axis). Layers with tiny-variance or non-finite
    findings are shaded; ``tiny_var``/``tiny_gain`` draw the thresholds used.

    Three panels (``fig=``). Artists: ``running_mean``, ``running_var``, ``gain`` (the min..max
    bars), ``range_ends`` (min/max markers), ``zeros``, ``thresholds``, ``shaded``, ``title``.
    """
    n = len(layers)
    fig = _panels(fig, _by_depth_size(n, 7.5))
    axes = fig.subplots(3, 1, sharex=True)
    x = list(range(n))
    series = [
        (
            "running_mean",
            "running_mean",
            [_finite(r.mean_min) for r in layers],
            [_finite(r.mean_max) for r in layers],
        ),
        (
            "running_var",
            "running_var",
            [_finite(r.var_min) for r in layers],
            [_finite(r.var_max) for r in layers],
        ),
        (
            "gain",
            "gain |γ|/√(var+eps)",
            [_finite(r.gain_min) for r in layers],
            [_finite(r.gain_max) for r in layers],
        ),
    ]
    artists: dict[str, Any] = {"range_ends": [], "zeros": [], "thresholds": [], "shaded": []}
    thresholds = [None, tiny_var, tiny_gain]
    for i, (ax, (key, label, lo, hi)) in enumerate(zip(axes, series, strict=True)):
        log = i > 0 and any(v > 0 for v in lo + hi if math.isfinite(v))
        if log:
            floor = _log_floor(lo + hi)
            threshold = thresholds[i]
            if threshold is not None:
                floor = min(floor, threshold / 10)
            zeros = [(xi, floor) for xi, v in zip(x, lo, strict=True) if v <= 0]
            lo = [max(v, floor) if math.isfinite(v) else v for v in lo]
            hi = [max(v, floor) if math.isfinite(v) else v for v in hi]
            _log_scale(ax)
            if zeros:
                artists["zeros"] += ax.plot(
                    *zip(*zeros, strict=True), "x", color="C3", label="zero (clipped)"
                )
        artists[key] = ax.vlines(
            x, lo, hi, color="C0", linewidth=3, label="min .. max over channels"
        )
        artists["range_ends"] += ax.plot(x, lo, "v", color="C0", markersize=4)
        artists["range_ends"] += ax.plot(x, hi, "^", color="C0", markersize=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if tiny_var is not None:
        artists["thresholds"].append(
            axes[1].axhline(
                tiny_var, color="C3", linestyle="--", linewidth=1, label="tiny threshold"
            )
        )
    if tiny_gain is not None:
        artists["thresholds"].append(
            axes[2].axhline(
                tiny_gain, color="C3", linestyle="--", linewidth=1, label="tiny threshold"
            )
        )
    for i, r in enumerate(layers):
        if r.tiny_var_channels or r.nonfinite_values or r.negative_var_channels:
            for ax in axes:
                artists["shaded"].append(ax.axvspan(i - 0.4, i + 0.4, color="C3", alpha=0.12))
    axes[0].legend(loc="best", fontsize=7)
    axes[1].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers, "BN layer (module order); shaded: tiny or non-finite values")
    artists["title"] = fig.suptitle("Running statistics by depth")
    return Plot(_root(fig), tuple(axes), artists)


def change_figure(
    layers: Sequence,
    fig: FigureBase | None = None,
    title: str | None = None,
    *,
    metrics: dict | None = None,
) -> Plot:
    """Per-layer change of statistics by depth: d_mu and d_var (max and median over channels),
    log scale. Layers that were not updated are left out of the lines. With ``metrics`` (a
    precise report's ``extra["metrics"]``, from evaluation data), a third panel on the right
    has bars before and after: accuracy with labels, otherwise top-1 agreement with the model
    before (an unknown value gets no bar and the label "n/a").

    Two panels (``fig=``), three with ``metrics``. Artists: ``d_mu_max``, ``d_mu_median``,
    ``d_var_max``, ``d_var_median``, ``title``, and with ``metrics``: ``bars`` (a
    BarContainer: before, after), ``labels`` (the percentages), ``metrics_title``."""
    width, height = _by_depth_size(len(layers), 5.5)
    fig = _panels(fig, (width + 3.0, height) if metrics else (width, height))
    if metrics:
        grid = fig.add_gridspec(2, 2, width_ratios=(width, 3.0))
        ax_mu = fig.add_subplot(grid[0, 0])
        ax_var = fig.add_subplot(grid[1, 0], sharex=ax_mu)
        ax_mu.tick_params(labelbottom=False)
    else:
        ax_mu, ax_var = fig.subplots(2, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.status == "updated"]
    artists: dict[str, Any] = {}
    for ax, stem, label in (
        (ax_mu, "d_mu", "d_mu = |Δμ| / σ"),
        (ax_var, "d_var", "d_var = |log var ratio|"),
    ):
        artists.update(_max_median(ax, layers, x, stem, label))
        ax.legend(loc="best", fontsize=7)
    _layer_axis(ax_var, layers)
    axes = [ax_mu, ax_var]
    if metrics:
        ax_eval = fig.add_subplot(grid[:, 1])
        axes.append(ax_eval)
        (before, _), (after, _) = PRECISE_VARIANTS
        values: list[float | None]
        variants = metrics["variants"]
        if metrics.get("has_labels"):
            values = [variants[before]["accuracy"], variants[after]["accuracy"]]
            ax_eval.set_ylabel("accuracy")
        else:
            values = [variants[before]["agreement"], variants[after]["agreement"]]
            ax_eval.set_ylabel("top-1 agreement with the model before")
        artists.update(_bars(ax_eval, [label for _, label in PRECISE_VARIANTS], values))
        ax_eval.set_ylim(0, 1.08)
        data = metrics.get("data") or "evaluation data"
        artists["metrics_title"] = ax_eval.set_title(
            textwrap.fill(f"Evaluation on {data}", 34), fontsize=8
        )
    artists["title"] = fig.suptitle(
        title or "Change of BN statistics by depth (old running vs new)"
    )
    return Plot(_root(fig), tuple(axes), artists)


def shift_figure(
    layers: Sequence, fig: FigureBase | None = None, *, shift_threshold: float | None = None
) -> Plot:
    """Where the domain differs: median and max over channels of the symmetric KL, d_mu and
    d_var between source and target statistics, by depth (log scale). ``shift_threshold``
    (an adapt report's ``extra["shift_threshold"]``) draws the line that a layer's median KL
    must exceed for a ``domain-shift`` finding.

    Three panels (``fig=``). Artists: ``kl_max``, ``kl_median``, ``d_mu_max``, ``d_mu_median``,
    ``d_var_max``, ``d_var_median``, ``shift_threshold`` (when given), ``title``."""
    fig = _panels(fig, _by_depth_size(len(layers), 7.0))
    axes = fig.subplots(3, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.status in ("updated", "kept")]
    rows = (
        ("kl", "symmetric KL"),
        ("d_mu", "d_mu = |Δμ| / σ_target"),
        ("d_var", "d_var = |log var ratio|"),
    )
    artists: dict[str, Any] = {}
    for ax, (stem, label) in zip(axes, rows, strict=True):
        artists.update(_max_median(ax, layers, x, stem, label))
    if shift_threshold is not None:
        artists["shift_threshold"] = axes[0].axhline(
            shift_threshold, color="k", ls=":", lw=1.2,
            label=f"domain shift: median above {shift_threshold:g}",
        )  # fmt: skip
    axes[0].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers)
    artists["title"] = fig.suptitle("Domain shift by depth: source vs target statistics")
    return Plot(_root(fig), tuple(axes), artists)


def _bars(ax: Axes, labels: Sequence[str], values: Sequence[float | None]) -> dict[str, Any]:
    """Bars of ``values`` in C7/C2/C0, each labelled with its percentage; a value that is not
    known (None) gets no bar, only the label "n/a" on the baseline."""
    known = [math.nan if v is None else v for v in values]
    bars = ax.bar(labels, known, color=["C7", "C2", "C0", "C1"][: len(values)])
    texts = [
        ax.annotate(
            "n/a" if v is None else f"{100 * v:.1f}%",
            (bar.get_x() + bar.get_width() / 2, 0.0 if v is None else v),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.4" if v is None else "black",
        )
        for bar, v in zip(bars, values, strict=True)
    ]
    ax.set_xlim(-0.6, len(values) - 0.4)  # an absent (NaN) bar keeps its place and tick
    ax.set_xlabel("BN statistics used", fontsize=8)
    return {"bars": bars, "labels": texts}


def adapt_metrics_figure(
    metrics: dict,
    fig: FigureBase | None = None,
    *,
    ax: Axes | None = None,
    online_prior: Any = None,
) -> Plot:
    """Bars: accuracy (with labels) or top-1 agreement with the source model (without) for
    source statistics, adapted statistics, test-time batch statistics and, when ``metrics``
    holds the variant ``prior``, test-batch statistics mixed with the source statistics
    (labelled with ``online_prior``, the report's N); an unknown value (None) gets no bar and
    the label "n/a".

    One panel (``ax=`` or ``fig=``). Artists: ``bars`` (a BarContainer), ``labels`` (the
    percentages), ``title``."""
    from .text import prior_text

    ax, _ = _one_axes(ax, fig, (5.5, 3.8))
    shown = list(ADAPT_VARIANTS)
    if "prior" in metrics["variants"]:
        n = "" if online_prior is None else f" N={prior_text(online_prior)}"
        shown.append(("prior", f"test-time\nprior{n}"))
    values: list[float | None]
    if metrics.get("has_labels"):
        values = [metrics["variants"][k]["accuracy"] for k, _ in shown]
        ax.set_ylabel("accuracy")
    else:
        values = [metrics["variants"][k]["agreement"] for k, _ in shown]
        ax.set_ylabel("top-1 agreement with source")
    artists = _bars(ax, [label for _, label in shown], values)
    ax.set_ylim(0, 1.05)
    artists["title"] = ax.set_title(
        f"Evaluation on {metrics.get('data', 'target data')}", fontsize=9
    )
    return Plot(_root(ax), (ax,), artists)


def online_priors_figure(
    rows: Sequence[dict],
    metrics: dict | None = None,
    fig: FigureBase | None = None,
    *,
    ax: Axes | None = None,
) -> Plot:
    """The test-time prior sweep (an adapt report's ``online_priors``): accuracy (with labels)
    and top-1 agreement with the source model at each prior N (each test batch's statistics
    mixed with the source statistics as N pseudo samples; N = 0 is test-batch statistics, inf
    the source model), one tick per N in the order given; the loss on a second axis (with
    labels). With the report's ``metrics``, the source and adapted statistics' accuracy (or,
    without labels, agreement) are horizontal lines.

    One panel (``ax=`` or ``fig=``), plus a twin axis for the loss when there is a finite one.
    The legend goes below the plot on a figure this call created, inside the Axes otherwise.
    Artists: ``accuracy``, ``agreement``, ``loss``, ``source``, ``adapted`` (each when there is
    something to draw), ``title``."""
    from .text import prior_text

    ax, created = _one_axes(ax, fig, (6.0, 4.0))
    x = list(range(len(rows)))
    labelled = bool(rows) and all(r["accuracy"] is not None for r in rows)
    artists: dict[str, Any] = {}
    handles: list[Any] = []
    if labelled:
        (artists["accuracy"],) = ax.plot(
            x, [_finite(r["accuracy"]) for r in rows], "o-", color="C0", label="accuracy"
        )
        handles.append(artists["accuracy"])
    if any(r["agreement"] is not None for r in rows):
        (artists["agreement"],) = ax.plot(
            x, [_finite(r["agreement"]) for r in rows], "s--", color="C1",
            label="top-1 agreement with source",
        )  # fmt: skip
        handles.append(artists["agreement"])
    key = "accuracy" if labelled else "agreement"
    variants = (metrics or {}).get("variants", {})
    for name, variant, color, label in (
        ("source", "running", "C7", "source stats"),
        ("adapted", "adapted", "C2", "adapted stats"),
    ):
        value = variants.get(variant, {}).get(key)
        if value is not None and math.isfinite(value):
            artists[name] = ax.axhline(value, color=color, ls=":", lw=1.2, label=f"{label} ({key})")
            handles.append(artists[name])
    ax.set_xticks(x)
    ax.set_xticklabels([prior_text(r["prior"]) for r in rows])
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xlabel("test-time prior N (pseudo samples of the source statistics)")
    ax.set_ylabel("accuracy, top-1 agreement" if labelled else "top-1 agreement with source")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    axes = [ax]
    losses = [_finite(r["loss"]) for r in rows] if labelled else []
    if any(math.isfinite(v) for v in losses):
        ax2 = ax.twinx()
        axes.append(ax2)
        (artists["loss"],) = ax2.plot(x, losses, "^:", color="C3", label="loss")
        handles.append(artists["loss"])
        ax2.set_ylabel("loss (cross-entropy)", color="C3")
    if handles and created:
        _root(ax).legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7)
    elif handles:
        ax.legend(handles=handles, loc="best", fontsize=7)
    data = (metrics or {}).get("data")
    artists["title"] = ax.set_title(
        "Test-time BN adaptation against the prior N" + (f"\non {data}" if data else ""),
        fontsize=9,
    )
    return Plot(_root(ax), tuple(axes), artists)


def _size_line(layer: Any, key: str) -> tuple[list[int], list[float]]:
    """``(g, value)`` of a ghost layer's sizes where ``key`` is set."""
    pairs = [(s.size, getattr(s, key)) for s in layer.sizes if getattr(s, key) is not None]
    return [g for g, _ in pairs], [v for _, v in pairs]


def ghost_noise_figure(layers: Sequence, fig: FigureBase | None = None) -> Plot:
    """Log-log noise of chunk statistics vs ghost size g, one solid line per analysed layer
    (colour = depth): mean |mu_k - mu_pop| / sigma (left) and mean |log var ratio| (right).
    Each layer's own i.i.d. expectation (docs/statistics.md, section 7.4) is dashed in the
    same colour, so each layer is compared with what independent samples would give it; a grey
    dotted guide of slope -1/2 (proportional to g^-1/2, through the median expectation at the
    smallest size) shows the slope the expectation follows when a layer's per-sample spread
    does not change with g (the first layer; deeper layers' inputs depend on g through the
    layers before).

    Two panels (``fig=``). Artists: ``noise_mu``, ``noise_var`` (one line per analysed layer),
    ``iid_mu``, ``iid_var`` (one dashed line per analysed layer with an expectation),
    ``slope_mu``, ``slope_var`` (the g^-1/2 guides; present when some layer has an
    expectation), ``title``. The legend goes below the panels on a figure this call created,
    inside the left panel otherwise."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    created = fig is None
    fig = _panels(fig, (10.0, 4.2))
    axes = fig.subplots(1, 2)
    analysed = [layer for layer in layers if layer.status == "analysed" and layer.sizes]
    cmap = colormaps["viridis"]
    n = max(len(analysed) - 1, 1)
    keys = (("noise_mu", "iid_mu", "slope_mu", "mean |μ_g − μ_pop| / σ"),
            ("noise_var", "iid_var", "slope_var", "mean |log var_g / var_pop|"))  # fmt: skip
    artists: dict[str, Any] = {}
    for ax, (key, iid_key, slope_key, label) in zip(axes, keys, strict=True):
        artists[key], artists[iid_key] = [], []
        starts: list[float] = []
        for i, layer in enumerate(analysed):
            colour = cmap(0.85 * i / n)  # viridis without its palest yellow
            artists[key] += ax.plot(
                *_size_line(layer, key), "o-", color=colour, lw=1.2, ms=3, label=layer.name
            )
            g, y = _size_line(layer, iid_key)
            if g:
                artists[iid_key] += ax.plot(g, y, "--", color=colour, lw=1, alpha=0.8)
                starts.append(y[0])
        sizes = sorted({s.size for layer in analysed for s in layer.sizes})
        if starts and len(sizes) > 1:
            y0 = statistics.median(starts)
            (artists[slope_key],) = ax.plot(
                sizes, [y0 * (g / sizes[0]) ** -0.5 for g in sizes], ":", color="0.45", lw=1.5
            )
        _log_scale(ax, "x", 2)
        _log_scale(ax, "y")
        if sizes:
            ax.set_xticks(sizes, [str(t) for t in sizes])
        ax.set_xlabel("ghost size g (samples per normalization batch)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if not artists["iid_mu"]:
        del artists["iid_mu"]
    if not artists["iid_var"]:
        del artists["iid_var"]
    if analysed:  # many layers: the line styles only (colour already shows depth)
        handles: list[Any] = list(artists["noise_mu"]) if len(analysed) <= 12 else [
            Line2D([], [], color=cmap(0.42), marker="o", ms=3, lw=1.2,
                   label=f"measured (colour: {analysed[0].name} … {analysed[-1].name})")
        ]  # fmt: skip
        if "iid_mu" in artists:
            handles.append(
                Line2D([], [], color="0.3", ls="--", lw=1,
                       label="i.i.d. expectation (dashed, the layer's colour)")
            )  # fmt: skip
        if "slope_mu" in artists:
            handles.append(
                Line2D([], [], color="0.45", ls=":", lw=1.5, label="∝ $g^{-1/2}$ (slope −1/2)")
            )
        if created:
            _root(fig).legend(
                handles=handles, loc="outside lower center", ncols=min(len(handles), 4),
                fontsize=7,
            )  # fmt: skip
        else:
            axes[0].legend(handles=handles, fontsize=6, loc="best")
    artists["title"] = fig.suptitle(
        "Noise of chunk statistics around the population statistics, by layer"
    )
    return Plot(_root(fig), tuple(axes), artists)


def nbs_curve_figure(
    rows: Sequence[dict],
    population: dict,
    fig: FigureBase | None = None,
    *,
    ax: Axes | None = None,
) -> Plot:
    """The NBS curve: accuracy (with labels) or top-1 agreement with population statistics
    (without) at each ghost size, with population statistics as a horizontal line; KL on a
    second axis.

    One panel (``ax=`` or ``fig=``), plus a twin axis for KL when there is a finite KL. The
    legend goes below the plot on a figure this call created, inside the Axes otherwise.
    Artists: ``batch_stats`` (the curve), ``population``, ``kl``, ``title``."""
    ax, created = _one_axes(ax, fig, (6.0, 4.0))
    ok = [r for r in rows if r["status"] == "ok"]
    g = [r["size"] for r in ok]
    labelled = population.get("accuracy") is not None and all(r["accuracy"] is not None for r in ok)
    artists: dict[str, Any] = {}
    if labelled:
        y, reference = [r["accuracy"] for r in ok], population["accuracy"]
        curve_label, ylabel = "batch statistics at g", "accuracy"
    else:  # agreement with population statistics, which agree with themselves: 1
        y, reference = [_finite(r["agreement"]) for r in ok], 1.0
        curve_label, ylabel = "agreement with population statistics", "top-1 agreement"
    (artists["batch_stats"],) = ax.plot(g, y, "o-", color="C0", label=curve_label)
    artists["population"] = ax.axhline(
        reference, color="C2", ls="--", label="population statistics"
    )
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    ax.set_xticks(g)
    ax.set_xticklabels([str(v) for v in g])
    ax.set_xlabel("normalization batch size g")
    ax.grid(True, alpha=0.3)
    handles = [artists["batch_stats"], artists["population"]]
    axes = [ax]
    kl = [_finite(r["kl"]) for r in ok]
    if any(math.isfinite(v) for v in kl):
        ax2 = ax.twinx()
        axes.append(ax2)
        (artists["kl"],) = ax2.plot(g, kl, "s:", color="C3", label="KL(p_pop || p_g)")
        handles.append(artists["kl"])
        ax2.set_ylabel("KL(p_pop || p_g)", color="C3")
    if created:
        _root(ax).legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7)
    else:
        ax.legend(handles=handles, loc="best", fontsize=7)
    artists["title"] = ax.set_title("Model outputs vs normalization batch size")
    return Plot(_root(ax), tuple(axes), artists)


def staleness_figure(
    layers: Sequence,
    stale_z: float = 3.0,
    fig: FigureBase | None = None,
    *,
    material_gap: float = 0.05,
) -> Plot:
    """Staleness by depth, with both criteria of a ``stale`` layer (docs/statistics.md,
    section 5.5): d_mu and d_var (median and max over channels) between running and
    population statistics, with the ``material_gap`` line that the *median* of d_mu or of
    d_var must exceed, and the z-score of the gap against EMA noise (RMS over channels) with
    the ``stale_z`` line that z must exceed. Layers whose status is ``stale`` are shaded
    (both criteria met); pass the thresholds the report was made with
    (:data:`bnscope.ops.inspect.MATERIAL_GAP`, :data:`bnscope.ops.inspect.STALE_Z`).

    Three panels (``fig=``). Artists: ``d_mu_max``, ``d_mu_median``, ``d_var_max``,
    ``d_var_median``, ``z_mu``, ``z_var``, ``material_threshold`` (one line on each d panel),
    ``stale_threshold``, ``noise_level`` (z = 1), ``stale_spans`` (one per stale layer and
    panel), ``title``."""
    fig = _panels(fig, _by_depth_size(len(layers), 7.5))
    axes = fig.subplots(3, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.d_mu_median is not None]
    artists: dict[str, Any] = {"material_threshold": []}
    panels = ((axes[0], "d_mu", "d_mu = |μ_EMA − μ_pop| / σ"),
              (axes[1], "d_var", "d_var = |log var_EMA / var_pop|"))  # fmt: skip
    for ax, stem, label in panels:
        artists.update(_max_median(ax, layers, x, stem, label))
        artists["material_threshold"].append(
            ax.axhline(
                material_gap, color="k", ls=":", lw=1.2,
                label=f"material: median above {material_gap:g}",
            )
        )  # fmt: skip
    zx = [i for i in x if layers[i].z_mu is not None]
    (artists["z_mu"],) = axes[2].plot(
        zx, [_finite(layers[i].z_mu) for i in zx], "o-", color="C1", label="z (mean)"
    )
    zv = [i for i in x if layers[i].z_var is not None]
    (artists["z_var"],) = axes[2].plot(
        zv, [_finite(layers[i].z_var) for i in zv], "s--", color="C4", label="z (variance)"
    )
    artists["stale_threshold"] = axes[2].axhline(
        stale_z, color="k", ls=":", lw=1.2, label=f"stale: z above {stale_z:g}"
    )
    artists["noise_level"] = axes[2].axhline(
        1.0, color="0.6", ls=":", lw=0.8, label="z = 1: EMA noise"
    )
    zs = [_finite(layers[i].z_mu) for i in zx] + [_finite(layers[i].z_var) for i in zv]
    if any(z > 0 for z in zs):
        _log_scale(axes[2])
    axes[2].set_ylabel("gap / EMA noise (RMS z)", fontsize=8)
    axes[2].grid(True, alpha=0.3)
    artists["stale_spans"] = []
    for i, r in enumerate(layers):
        if r.status == "stale":
            for ax in axes:
                artists["stale_spans"].append(
                    ax.axvspan(
                        i - 0.4, i + 0.4, color="C3", alpha=0.1,
                        label=None if artists["stale_spans"] else "stale (both criteria)",
                    )
                )  # fmt: skip
    axes[0].legend(loc="best", fontsize=7)  # the d_var panel has the same styles
    axes[2].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers, "BN layer (module order); shaded: stale")
    artists["title"] = fig.suptitle(
        "Running statistics vs this model's population statistics, by depth"
    )
    return Plot(_root(fig), tuple(axes), artists)


def batch_means_figure(
    layer: str, arrays: dict, fig: FigureBase | None = None, *, status: str | None = None
) -> Plot:
    """For one layer's most stale channels (largest d_mu): the distribution of batch means
    (in units of the population sigma, centred on the population mean) with the population
    mean (0) and the running mean (EMA) marked. ``arrays`` is the layer's entry of an inspect
    report's ``arrays``: ``channels``, ``batch_means`` [batches, channels], ``running_mean``,
    ``population_mean`` and ``population_sigma``. ``status``, the layer's status in the
    report, goes into the title.

    One panel per channel (``fig=``). Artists: ``batch_means`` (one histogram's bars per
    channel with batch means), ``population`` and ``running_mean`` (one line per channel),
    ``title``."""
    channels = [int(c) for c in arrays["channels"]]
    fig = _panels(fig, (2.6 * max(len(channels), 1) + 1, 3.2))
    axes = fig.subplots(1, max(len(channels), 1), squeeze=False)[0]
    means = arrays["batch_means"]
    artists: dict[str, Any] = {"batch_means": [], "population": [], "running_mean": []}
    for j, (ax, c) in enumerate(zip(axes, channels, strict=False)):
        sigma = float(arrays["population_sigma"][j])
        pop = float(arrays["population_mean"][j])
        ema = (float(arrays["running_mean"][j]) - pop) / sigma
        values = [(float(v) - pop) / sigma for v in means[:, j]] if len(means) else []
        if values:
            _, _, bars = ax.hist(
                values,
                bins=min(30, max(5, len(values) // 3)),
                color="C0",
                alpha=0.7,
                label="batch means",
            )
            artists["batch_means"].append(bars)
        artists["population"].append(ax.axvline(0.0, color="C2", lw=2, label="population"))
        artists["running_mean"].append(
            ax.axvline(ema, color="C3", lw=2, ls="--", label="running (EMA)")
        )
        ax.set_title(f"channel {c}", fontsize=8)
        ax.set_xlabel("batch mean (μ_B − μ_pop) / σ", fontsize=8)
        ax.set_ylabel("batches", fontsize=8)
    axes[0].legend(fontsize=6, loc="best")
    named = f"{layer} ({status})" if status else layer
    artists["title"] = fig.suptitle(
        f"{named}: batch means of the channels whose running mean is furthest from the "
        "population mean"
    )
    return Plot(_root(fig), tuple(axes), artists)


#: how many converted layers ``conversion_figure`` draws (module order), beside one reference
CONVERSION_LAYERS = 3



def conversion_figure(
    layers: Sequence,
    arrays: dict,
    fig: FigureBase | None = None,
    *,
    limit: int = CONVERSION_LAYERS,
) -> Plot:
    """What running_var holds (docs/statistics.md, section 11.2): per channel, log running_var
    against log var_pop (x = log((1 - w) var_pop + w), corrected for an unwarmed EMA as the fit
    is), with the line of variances (slope 1), the Theil-Sen fit (``var_slope`` and the
    layer's ``var_intercept``) and, for a converted layer, the line its conversion predicts
    (slope 1/2, -1 or -1/2 through 0; slope 1 offset by log s for ``scale``). Draws the first
    ``limit`` converted layers (``var_convention`` set) in module order and, when some layer
    was fitted and holds variances, the first such one for comparison. ``arrays`` is an
    inspect report's ``arrays``: ``var_x``, ``var_y`` and ``var_intercept`` per fitted layer.

    One panel per layer drawn (``fig=``). Artists: ``points``, ``variances`` and ``fitted``
    (one per panel), ``expected`` (one per converted panel), ``title``."""
    fitted = [r for r in layers if r.var_slope is not None and "var_x" in arrays.get(r.name, {})]
    converted = [r for r in fitted if r.var_convention is not None][:limit]
    reference = [r for r in fitted if r.var_convention is None][:1]
    drawn = converted + reference
    fig = _panels(fig, (3.6 * max(len(drawn), 1) + 0.6, 3.9))
    axes = fig.subplots(1, max(len(drawn), 1), squeeze=False)[0]
    artists: dict[str, Any] = {"points": [], "variances": [], "fitted": [], "expected": []}
    for ax, r in zip(axes, drawn, strict=False):
        entry = arrays[r.name]
        x = [float(v) for v in entry["var_x"]]
        y = [float(v) for v in entry["var_y"]]
        lo, hi = min(x), max(x)
        line = [lo, hi]
        artists["points"].append(ax.scatter(x, y, s=9, color="0.35", alpha=0.6,
                                            label="channels"))  # fmt: skip
        (variances,) = ax.plot(line, line, color="C2", ls="--", lw=1.4,
                               label="variances (slope 1)")  # fmt: skip
        artists["variances"].append(variances)
        slope, intercept = float(r.var_slope), float(entry["var_intercept"])
        (fit,) = ax.plot(line, [intercept + slope * v for v in line], color="C0", lw=1.6,
                         label=f"fit: slope {slope:.2f}")  # fmt: skip
        artists["fitted"].append(fit)
        if r.var_convention is not None:
            expected = _expected_line(r, line)
            (exp,) = ax.plot(line, expected, color="C3", ls=":", lw=2.0,
                             label=_conversion_label(r.var_convention))  # fmt: skip
            artists["expected"].append(exp)
            scale = f", s = {r.var_scale:.4g}" if r.var_convention == "scale" else ""
            ax.set_title(f"{r.name}: {r.var_convention}{scale}", fontsize=9)
        else:
            ax.set_title(f"{r.name}: variances (for comparison)", fontsize=9)
        ax.set_xlabel("log var_pop", fontsize=8)
        ax.set_ylabel("log running_var", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    artists["title"] = fig.suptitle("What running_var holds: log running_var against log var_pop "
                                    "per channel")  # fmt: skip
    return Plot(_root(fig), tuple(axes), artists)


def _expected_line(layer: Any, line: list[float]) -> list[float]:
    """The line a conversion predicts: slope b_k through 0, or slope 1 offset by log s."""
    from ..ops.conventions import SLOPES

    if layer.var_convention == "scale":
        offset = math.log(layer.var_scale) if layer.var_scale else 0.0
        return [v + offset for v in line]
    return [SLOPES[layer.var_convention] * v for v in line]


def _conversion_label(conversion: str) -> str:
    """The legend of the predicted line, in the catalog's words (findings.VAR_CONVERSIONS)."""
    from ..findings import VAR_CONVERSIONS, conversion_slope

    if conversion == "scale":
        return "variances times a scale factor (slope 1, offset log s)"
    what = VAR_CONVERSIONS[conversion][0].split(" (")[0]
    return f"{what} (slope {conversion_slope(conversion)})"


def consistency_figure(
    consistency: dict, fig: FigureBase | None = None, *, ax: Axes | None = None
) -> Plot:
    """Bars: accuracy (with labels) or top-1 agreement with eval-mode outputs (without) for
    running statistics, precise statistics and batch statistics on the same batches; an
    unknown agreement (outputs that are not class scores) gets no bar and the label "n/a".

    One panel (``ax=`` or ``fig=``). Artists: ``bars`` (a BarContainer), ``labels`` (the
    percentages), ``title``."""
    keys = ("running", "precise", "batch")
    labels = ("running stats\n(eval)", "precise stats", "batch stats\n(train mode)")
    ax, _ = _one_axes(ax, fig, (5.5, 3.8))
    values: list[float | None]
    if consistency.get("has_labels"):
        values = [consistency["variants"][k]["accuracy"] for k in keys]
        ax.set_ylabel("accuracy")
    else:
        values = [consistency["variants"][k]["agreement"] for k in keys]
        ax.set_ylabel("top-1 agreement with eval mode")
    artists = _bars(ax, labels, values)
    ax.set_ylim(0, 1.08)
    artists["title"] = ax.set_title("Train/test consistency on the same batches", fontsize=9)
    return Plot(_root(ax), (ax,), artists)


# --------------------------------------------------------------------------------------------
# Separate statistics per domain (adapt with several target domains)

#: how many of the most divergent layers ``domain_divergence_figure`` draws beside the median
DIVERGENCE_LAYERS = 3


def _matrix_panel(
    ax: Axes, labels: Sequence[str], matrix: Sequence[Sequence[float | None]], norm: Any
) -> tuple[Any, list[Any]]:
    """One annotated heatmap of a (source + domains) matrix: the image and the cell texts
    (each value, "n/a" where there is none)."""
    import numpy as np

    from .text import num

    values = np.array([[_finite(v) for v in row] for row in matrix], dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="YlOrRd", norm=norm)
    texts = []
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            dark = v is not None and math.isfinite(v) and norm(v) > 0.6
            texts.append(
                ax.text(
                    j, i, num(v, 2), ha="center", va="center", fontsize=7,
                    color="white" if dark else ("0.5" if v is None else "black"),
                )
            )  # fmt: skip
    n = len(labels)
    ax.set_xticks(list(range(n)))
    ax.set_yticks(list(range(n)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    return image, texts


def domain_divergence_figure(
    labels: Sequence[str],
    matrix: Sequence[Sequence[float | None]],
    layers: Sequence = (),
    fig: FigureBase | None = None,
    *,
    top: int = DIVERGENCE_LAYERS,
    threshold: float | None = None,
) -> Plot:
    """How far apart the domains' BN statistics are: heatmaps of median symmetric KL between
    the source statistics and each domain's (an adapt report with several domains), each cell
    annotated with its value. The first panel is ``matrix`` (the report's ``divergence``: the
    median over layers), labelled with ``labels`` (``divergence_labels``: ``source`` then the
    domains); beside it the ``top`` layers of ``layers`` (the report's
    :class:`~bnscope.records.DomainLayer` records) whose most divergent pair of domains
    (``pair_kl``, else the largest entry) differs most, each with its own matrix. One colour
    scale (linear, from 0) for every panel, with a colour bar; ``threshold`` (the report's
    ``shift_threshold``, the median KL of ``domain-shift`` and ``domain-divergence``) is
    marked on the colour bar, and the scale reaches at least twice it, so that values below
    it never take the darkest colours.

    Panels side by side (``fig=``). Artists: ``matrix`` (the first panel's image), ``cells``
    (its value texts, row by row), ``layers`` (the other panels' images), ``layer_names``
    (their layer names, in panel order), ``colorbar``, ``threshold`` (when given: its line on
    the colour bar), ``title``."""
    from matplotlib.colors import Normalize

    def rank(rec: Any) -> float:
        if rec.pair_kl is not None:
            return float(rec.pair_kl)
        values = [_finite(v) for row in rec.divergence for v in row]
        return max((v for v in values if math.isfinite(v)), default=-1.0)

    drawn = sorted((r for r in layers if r.divergence is not None), key=lambda r: -rank(r))
    drawn = drawn[: max(top, 0)]
    every = [v for row in matrix for v in row] + [
        v for r in drawn for row in r.divergence for v in row
    ]
    finite = [v for v in every if v is not None and math.isfinite(v)]
    floor = [2 * threshold] if threshold is not None and math.isfinite(threshold) else []
    norm = Normalize(vmin=0.0, vmax=max([*finite, *floor, 1e-12]))
    side = 0.55 * len(labels) + 1.6
    fig = _panels(fig, (side * (1 + len(drawn)) + 1.0, side + 0.9))
    axes = fig.subplots(1, 1 + len(drawn), squeeze=False)[0]
    image, cells = _matrix_panel(axes[0], labels, matrix, norm)
    axes[0].set_title("median over layers", fontsize=9)
    artists: dict[str, Any] = {"matrix": image, "cells": cells, "layers": [], "layer_names": []}
    for ax, rec in zip(axes[1:], drawn, strict=True):
        img, _ = _matrix_panel(ax, labels, rec.divergence, norm)
        name = rec.name if len(rec.name) <= 32 else "…" + rec.name[-31:]
        ax.set_title(f"layer {name}", fontsize=9)
        artists["layers"].append(img)
        artists["layer_names"].append(rec.name)
    label = "median symmetric KL over channels"
    if floor:
        label += f"\n(black line: the threshold {threshold:g})"
    artists["colorbar"] = fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
    if floor:
        artists["threshold"] = artists["colorbar"].ax.axhline(threshold, color="k", lw=1.5)
    artists["title"] = fig.suptitle(
        "Divergence between domains' BN statistics"
        + (f" (and the {len(drawn)} most divergent layers)" if drawn else "")
    )
    return Plot(_root(fig), tuple(axes), artists)
#: colours of the leakage figure's arrangements: the noise floor, a leaking grouping, another
LEAK_COLORS = {"noise": "C7", "leak": "C3", "grouped": "C0"}


def _leak_color(row: dict) -> str:
    if row["role"] == "noise":
        return LEAK_COLORS["noise"]
    return LEAK_COLORS["leak"] if row.get("leak") else LEAK_COLORS["grouped"]


def leakage_figure(
    rows: Sequence[dict],
    changes: dict[str, Any] | None = None,
    fig: FigureBase | None = None,
    *,
    metric: str = "kl",
    ratio_threshold: float = 2.0,
) -> Plot:
    """Information leakage within a batch (docs/statistics.md, section 10), from a leakage
    report's ``arrangements`` rows: (1) the mean per-sample output change of each
    arrangement against the i.i.d. batches (``metric``: ``kl_mean`` or ``l2_mean``) on a log
    axis, with the noise floor (``iid-2``) and ``ratio_threshold`` times it, each grouping's
    bar labelled with its ratio; (2) accuracy (with labels) or top-1 agreement with the
    i.i.d. batches (without) per arrangement; (3) with ``changes`` (arrangement -> the
    per-sample changes, ``report.arrays["leakage"]["change"]``), their distribution as
    empirical CDFs on a log axis (zeros drawn at the axis floor).

    Panels are added to ``fig`` (a Figure or SubFigure) or a new figure. Artists: ``bars``
    and ``ratios`` (panel 1), ``noise`` and ``threshold`` (its lines), ``score_bars``,
    ``score_labels`` (panel 2), ``cdfs`` (one line per arrangement of ``changes``, labelled
    with its name; panel 3), ``title``."""
    shown = [r for r in rows if r["role"] != "reference"]
    panels = 3 if changes else 2
    target = _panels(fig, (4.2 * panels + 0.6, 3.9))
    axes = target.subplots(1, panels, squeeze=False)[0]
    artists: dict[str, Any] = {}
    key = "kl_mean" if metric == "kl" else "l2_mean"
    what = "symmetric KL" if metric == "kl" else "relative L2 change"

    ax = axes[0]
    labels = [r["name"] for r in shown]
    values = [_finite(r[key]) for r in shown]
    floor = _log_floor(values)
    heights = [v if v > 0 else floor for v in values]
    artists["bars"] = ax.bar(labels, heights, color=[_leak_color(r) for r in shown])
    artists["ratios"] = [
        ax.annotate(
            "-" if r["ratio"] is None else f"{r['ratio']:.3g}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip
        for bar, r in zip(artists["bars"], shown, strict=True)
        if r["role"] == "grouped"
    ]
    noise = next((r for r in shown if r["role"] == "noise"), None)
    if noise is not None and _finite(noise[key]) > 0:
        artists["noise"] = ax.axhline(
            noise[key], color=LEAK_COLORS["noise"], ls="-", lw=1, label="noise floor (iid-2)"
        )
        artists["threshold"] = ax.axhline(
            ratio_threshold * noise[key], color=LEAK_COLORS["leak"], ls="--", lw=1,
            label=f"{ratio_threshold:g}x the noise floor",
        )  # fmt: skip
        ax.legend(loc="upper left", fontsize=7)
    _log_scale(ax)
    top = max(heights + [floor])
    ax.set_ylim(floor, top * 6)
    ax.set_ylabel(f"mean per-sample {what}")
    ax.set_xlabel("arrangement", fontsize=8)
    ax.set_title("Output change vs the i.i.d. batches", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1]
    labelled = all(r["accuracy"] is not None for r in rows)
    field = "accuracy" if labelled else "agreement"
    scores = [_finite(r[field]) for r in rows]
    colors = ["C2" if r["role"] == "reference" else _leak_color(r) for r in rows]
    artists["score_bars"] = ax.bar([r["name"] for r in rows], scores, color=colors)
    artists["score_labels"] = [
        ax.annotate(
            "n/a" if not math.isfinite(v) else f"{100 * v:.1f}%",
            (bar.get_x() + bar.get_width() / 2, v if math.isfinite(v) else 0.0),
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip
        for bar, v in zip(artists["score_bars"], scores, strict=True)
    ]
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("arrangement", fontsize=8)
    ax.set_ylabel("accuracy" if labelled else "top-1 agreement with iid")
    ax.set_title(
        "Train-mode accuracy per arrangement" if labelled else "Agreement with the iid batches",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=8)

    if changes:
        ax = axes[2]
        import numpy as np

        series = {name: np.sort(np.asarray(v, dtype=float)) for name, v in changes.items()}
        positive = [float(s[s > 0].min()) for s in series.values() if (s > 0).any()]
        low = min(positive) / 10 if positive else 1e-6
        by_name = {r["name"]: r for r in rows}
        artists["cdfs"] = []
        for name, s in series.items():
            row = by_name.get(name, {"role": "grouped"})
            y = np.arange(1, len(s) + 1) / len(s)
            artists["cdfs"] += ax.step(
                np.maximum(s, low), y, where="post", color=_leak_color(row), label=name
            )
        _log_scale(ax, "x")
        ax.set_xlim(low, None)
        ax.set_xlabel(f"per-sample {what} vs iid")
        ax.set_ylabel("fraction of samples")
        ax.set_title("Distribution over the samples", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(True, alpha=0.3)
    artists["title"] = target.suptitle(
        "Information leakage within a batch: the same samples, batched differently"
    )
    return Plot(_root(target), tuple(axes), artists)

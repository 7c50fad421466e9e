"""matplotlib figures, built with ``matplotlib.figure.Figure`` (no pyplot state).

Each function takes computed records and an optional ``fig``, returns the figure and never
recomputes anything. matplotlib is imported inside the functions so that importing bnscope (and
``bnscope --help``) stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..records import StaticLayer

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


def _log_floor(values: Sequence[float]) -> float:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return min(positive) / 10 if positive else 1e-6


def _max_median(ax, layers: Sequence, x: list[int], stem: str, label: str) -> None:
    """Max and median over channels of ``<stem>_max``/``<stem>_median`` at layer positions
    ``x`` (log scale when positive), with the axis label and grid."""
    mx = [_finite(getattr(layers[i], f"{stem}_max")) for i in x]
    md = [_finite(getattr(layers[i], f"{stem}_median")) for i in x]
    ax.plot(x, mx, "o-", color="C3", label="max over channels")
    ax.plot(x, md, "s--", color="C0", label="median over channels")
    if any(v > 0 for v in mx + md):
        ax.set_yscale("log")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(True, alpha=0.3)


def _layer_axis(ax, layers: Sequence, xlabel: str = "BN layer (module order)") -> None:
    """Layer names (module order) along the x axis."""
    n = len(layers)
    ax.set_xlim(-0.6, max(n - 0.4, 0.6))
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels([r.name for r in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)


def static_ranges_figure(
    layers: Sequence[StaticLayer],
    fig: Figure | None = None,
    tiny_var: float | None = None,
    tiny_gain: float | None = None,
) -> Figure:
    """Per-layer running-statistic ranges by depth: running_mean, running_var and the eval-mode
    gain |gamma|/sqrt(var+eps), each as a min..max bar per layer (log scale for var and gain;
    zeros are drawn as 'x' at the bottom of the axis). Layers with tiny-variance or non-finite
    findings are shaded; ``tiny_var``/``tiny_gain`` draw the thresholds used."""
    from matplotlib.figure import Figure

    n = len(layers)
    fig = fig or Figure(figsize=(max(6.0, 0.35 * n + 3), 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = list(range(n))
    series = [
        (
            "running_mean",
            [_finite(r.mean_min) for r in layers],
            [_finite(r.mean_max) for r in layers],
        ),
        ("running_var", [_finite(r.var_min) for r in layers], [_finite(r.var_max) for r in layers]),
        (
            "gain |γ|/√(var+eps)",
            [_finite(r.gain_min) for r in layers],
            [_finite(r.gain_max) for r in layers],
        ),
    ]
    thresholds = [None, tiny_var, tiny_gain]
    for i, (ax, (label, lo, hi)) in enumerate(zip(axes, series, strict=True)):
        log = i > 0 and any(v > 0 for v in lo + hi if math.isfinite(v))
        if log:
            floor = _log_floor(lo + hi)
            if thresholds[i] is not None:
                floor = min(floor, thresholds[i] / 10)
            zeros = [(xi, floor) for xi, v in zip(x, lo, strict=True) if v <= 0]
            lo = [max(v, floor) if math.isfinite(v) else v for v in lo]
            hi = [max(v, floor) if math.isfinite(v) else v for v in hi]
            ax.set_yscale("log")
            if zeros:
                ax.plot(*zip(*zeros, strict=True), "x", color="C3", label="zero (clipped)")
        ax.vlines(x, lo, hi, color="C0", linewidth=3, label="min .. max over channels")
        ax.plot(x, lo, "v", color="C0", markersize=4)
        ax.plot(x, hi, "^", color="C0", markersize=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if tiny_var is not None:
        axes[1].axhline(tiny_var, color="C3", linestyle="--", linewidth=1, label="tiny threshold")
    if tiny_gain is not None:
        axes[2].axhline(tiny_gain, color="C3", linestyle="--", linewidth=1, label="tiny threshold")
    for i, r in enumerate(layers):
        if r.tiny_var_channels or r.nonfinite_values or r.negative_var_channels:
            for ax in axes:
                ax.axvspan(i - 0.4, i + 0.4, color="C3", alpha=0.12)
    axes[0].legend(loc="best", fontsize=7)
    axes[1].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers, "BN layer (module order); shaded: tiny or non-finite values")
    fig.suptitle("Running statistics by depth")
    return fig


def change_figure(layers: Sequence, fig: Figure | None = None, title: str | None = None) -> Figure:
    """Per-layer change of statistics by depth: d_mu and d_var (max and median over channels),
    log scale. Layers that were not updated are left out of the lines."""
    from matplotlib.figure import Figure

    n = len(layers)
    fig = fig or Figure(figsize=(max(6.0, 0.35 * n + 3), 5.5), layout="constrained")
    ax_mu, ax_var = fig.subplots(2, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.status == "updated"]
    for ax, stem, label in (
        (ax_mu, "d_mu", "d_mu = |Δμ| / σ"),
        (ax_var, "d_var", "d_var = |log var ratio|"),
    ):
        _max_median(ax, layers, x, stem, label)
        ax.legend(loc="best", fontsize=7)
    _layer_axis(ax_var, layers)
    fig.suptitle(title or "Change of BN statistics by depth (old running vs new)")
    return fig


def shift_figure(layers: Sequence, fig: Figure | None = None) -> Figure:
    """Where the domain differs: median and max over channels of the symmetric KL, d_mu and
    d_var between source and target statistics, by depth (log scale)."""
    from matplotlib.figure import Figure

    n = len(layers)
    fig = fig or Figure(figsize=(max(6.0, 0.35 * n + 3), 7.0), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.status == "updated"]
    rows = (
        ("kl", "symmetric KL"),
        ("d_mu", "d_mu = |Δμ| / σ_target"),
        ("d_var", "d_var = |log var ratio|"),
    )
    for ax, (stem, label) in zip(axes, rows, strict=True):
        _max_median(ax, layers, x, stem, label)
    axes[0].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers)
    fig.suptitle("Domain shift by depth: source vs target statistics")
    return fig


def adapt_metrics_figure(metrics: dict, fig: Figure | None = None) -> Figure:
    """Bars: accuracy (with labels) or top-1 agreement with the source model (without) for
    source statistics, adapted statistics and test-time batch statistics."""
    from matplotlib.figure import Figure

    keys = ("source", "adapted", "batch_stats")
    labels = ("source stats", "adapted stats", "test-batch stats")
    fig = fig or Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    if metrics.get("has_labels"):
        values = [metrics["metrics"][k]["accuracy"] for k in keys]
        ax.set_ylabel("accuracy")
    else:
        values = [metrics["agreement"][k] or 0.0 for k in keys]
        ax.set_ylabel("top-1 agreement with source")
    bars = ax.bar(labels, values, color=["C7", "C2", "C0"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{100 * v:.1f}%",
            (bar.get_x() + bar.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Evaluation on {metrics.get('data', 'target data')}", fontsize=9)
    return fig


def ghost_noise_figure(layers: Sequence, fig: Figure | None = None) -> Figure:
    """Log-log noise of chunk statistics vs ghost size g, one line per analysed layer (colour =
    depth): mean |mu_k - mu_pop| / sigma (left) and mean |log var ratio| (right), with each
    quantity's i.i.d. expectation for the median layer dashed in black (slope -1/2 for means)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(10.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    analysed = [layer for layer in layers if layer.status == "analysed" and layer.sizes]
    cmap = colormaps["viridis"]
    n = max(len(analysed) - 1, 1)
    keys = (("noise_mu", "iid_mu", "mean |μ_g − μ_pop| / σ"),
            ("noise_var", "iid_var", "mean |log var_g / var_pop|"))  # fmt: skip
    for ax, (key, iid_key, label) in zip(axes, keys, strict=True):
        for i, layer in enumerate(analysed):
            g = [s.size for s in layer.sizes if getattr(s, key) is not None]
            y = [getattr(s, key) for s in layer.sizes if getattr(s, key) is not None]
            ax.plot(g, y, "o-", color=cmap(i / n), lw=1, ms=3, label=layer.name)
        if analysed:
            mid = analysed[len(analysed) // 2]
            g = [s.size for s in mid.sizes if getattr(s, iid_key) is not None]
            y = [getattr(s, iid_key) for s in mid.sizes if getattr(s, iid_key) is not None]
            ax.plot(g, y, "k--", lw=1.5, label=f"i.i.d. expectation ({mid.name})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if analysed:
            ticks = [s.size for s in analysed[0].sizes]
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("ghost size g (samples per normalization batch)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if analysed:  # many layers: label only the i.i.d. line (colour already shows depth)
        handles = axes[0].lines if len(analysed) <= 12 else axes[0].lines[-1:]
        axes[0].legend(handles=handles, fontsize=6, loc="best")
    fig.suptitle("Noise of chunk statistics around the population statistics, by layer")
    return fig


def nbs_curve_figure(rows: Sequence[dict], population: dict, fig: Figure | None = None) -> Figure:
    """The NBS curve: accuracy (with labels) or top-1 agreement with population statistics
    (without) at each ghost size, with population statistics as a horizontal line; KL on a
    second axis."""
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ok = [r for r in rows if r["status"] == "ok"]
    g = [r["size"] for r in ok]
    labelled = population.get("accuracy") is not None and all(r["accuracy"] is not None for r in ok)
    if labelled:
        ax.plot(g, [r["accuracy"] for r in ok], "o-", color="C0", label="batch statistics at g")
        ax.axhline(population["accuracy"], color="C2", ls="--", label="population statistics")
        ax.set_ylabel("accuracy")
    else:
        ax.plot(g, [_finite(r["agreement"]) for r in ok], "o-", color="C0",
                label="agreement with population statistics")  # fmt: skip
        ax.axhline(1.0, color="C2", ls="--", label="population statistics")
        ax.set_ylabel("top-1 agreement")
    ax.set_xscale("log", base=2)
    ax.set_xticks(g)
    ax.set_xticklabels([str(v) for v in g])
    ax.set_xlabel("normalization batch size g")
    ax.grid(True, alpha=0.3)
    handles = list(ax.lines)
    kl = [_finite(r["kl"]) for r in ok]
    if any(math.isfinite(v) for v in kl):
        ax2 = ax.twinx()
        handles += ax2.plot(g, kl, "s:", color="C3", label="KL(p_pop || p_g)")
        ax2.set_ylabel("KL(p_pop || p_g)", color="C3")
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7)
    ax.set_title("Model outputs vs normalization batch size")
    return fig


def staleness_figure(layers: Sequence, stale_z: float = 3.0, fig: Figure | None = None) -> Figure:
    """Staleness by depth: d_mu and d_var (median and max over channels) between running and
    population statistics, and the z-score of the gap against EMA noise (RMS over channels)
    with the ``stale_z`` threshold; stale layers are shaded."""
    from matplotlib.figure import Figure

    n = len(layers)
    fig = fig or Figure(figsize=(max(6.0, 0.35 * n + 3), 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = [i for i, r in enumerate(layers) if r.d_mu_median is not None]
    _max_median(axes[0], layers, x, "d_mu", "d_mu = |μ_EMA − μ_pop| / σ")
    _max_median(axes[1], layers, x, "d_var", "d_var = |log var_EMA / var_pop|")
    zx = [i for i in x if layers[i].z_mu is not None]
    axes[2].plot(zx, [_finite(layers[i].z_mu) for i in zx], "o-", color="C1", label="z (mean)")
    zv = [i for i in x if layers[i].z_var is not None]
    axes[2].plot(zv, [_finite(layers[i].z_var) for i in zv], "s--", color="C4",
                 label="z (variance)")  # fmt: skip
    axes[2].axhline(stale_z, color="k", ls=":", label=f"stale above {stale_z:g}")
    axes[2].axhline(1.0, color="0.6", ls=":", lw=0.8)
    if any(layers[i].z_mu and layers[i].z_mu > 0 for i in zx):
        axes[2].set_yscale("log")
    axes[2].set_ylabel("gap / EMA noise (RMS z)", fontsize=8)
    axes[2].grid(True, alpha=0.3)
    for i, r in enumerate(layers):
        if r.status == "stale":
            for ax in axes:
                ax.axvspan(i - 0.4, i + 0.4, color="C3", alpha=0.08)
    axes[0].legend(loc="best", fontsize=7)
    axes[2].legend(loc="best", fontsize=7)
    _layer_axis(axes[-1], layers)
    fig.suptitle("Running statistics vs this model's population statistics, by depth")
    return fig


def batch_means_figure(layer: str, arrays: dict, fig: Figure | None = None) -> Figure:
    """For one layer's most stale channels: the distribution of batch means (in units of the
    population sigma, centred on the population mean) with the population mean (0) and the
    running mean (EMA) marked."""
    from matplotlib.figure import Figure

    channels = [int(c) for c in arrays["channels"]]
    fig = fig or Figure(figsize=(2.6 * max(len(channels), 1) + 1, 3.2), layout="constrained")
    axes = fig.subplots(1, max(len(channels), 1), squeeze=False)[0]
    means = arrays["batch_means"]
    for j, (ax, c) in enumerate(zip(axes, channels, strict=False)):
        sigma = float(arrays["population_sigma"][j])
        pop = float(arrays["population_mean"][j])
        ema = (float(arrays["running_mean"][j]) - pop) / sigma
        values = [(float(v) - pop) / sigma for v in means[:, j]] if len(means) else []
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="C0", alpha=0.7,
                    label="batch means")  # fmt: skip
        ax.axvline(0.0, color="C2", lw=2, label="population")
        ax.axvline(ema, color="C3", lw=2, ls="--", label="running (EMA)")
        ax.set_title(f"channel {c}", fontsize=8)
        ax.set_xlabel("(μ − μ_pop) / σ", fontsize=8)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{layer}: batch means of the most stale channels")
    return fig


def consistency_figure(consistency: dict, fig: Figure | None = None) -> Figure:
    """Bars: accuracy (with labels) or top-1 agreement with eval-mode outputs (without) for
    running statistics, precise statistics and batch statistics on the same batches."""
    from matplotlib.figure import Figure

    keys = ("running", "precise", "batch")
    labels = ("running stats\n(eval)", "precise stats", "batch stats\n(train mode)")
    fig = fig or Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    if consistency.get("has_labels"):
        values = [consistency["metrics"][k]["accuracy"] for k in keys]
        ax.set_ylabel("accuracy")
    else:
        agree = consistency["agreement"]
        values = [1.0, agree["precise"] or 0.0, agree["batch"] or 0.0]
        ax.set_ylabel("top-1 agreement with eval mode")
    bars = ax.bar(labels, values, color=["C7", "C2", "C0"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{100 * v:.1f}%", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylim(0, 1.08)
    ax.set_title("Train/test consistency on the same batches", fontsize=9)
    return fig

"""matplotlib figures, built with ``matplotlib.figure.Figure`` (no pyplot state).

Each function takes computed records and an optional ``ax``/``fig``, returns the figure and
never recomputes anything. matplotlib is imported lazily by callers of this module only.
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


def static_ranges_figure(layers: Sequence[StaticLayer], fig: Figure | None = None) -> Figure:
    """Per-layer running-statistic ranges by depth: running_mean, running_var and the eval-mode
    gain |gamma|/sqrt(var+eps), each as a min..max bar per layer (log scale for var and gain)."""
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(max(6.0, 0.35 * len(layers) + 3), 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = list(range(len(layers)))
    series = [
        ("running_mean", [_finite(r.mean_min) for r in layers], [_finite(r.mean_max) for r in layers]),
        ("running_var", [_finite(r.var_min) for r in layers], [_finite(r.var_max) for r in layers]),
        (
            "gain |γ|/√(var+eps)",
            [_finite(r.gain_min) for r in layers],
            [_finite(r.gain_max) for r in layers],
        ),
    ]
    for ax, (label, lo, hi) in zip(axes, series, strict=True):
        ax.vlines(x, lo, hi, color="C0", linewidth=3, label="min .. max")
        ax.plot(x, lo, "v", color="C0", markersize=4)
        ax.plot(x, hi, "^", color="C0", markersize=4)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        positive = [v for v in lo + hi if v > 0 and math.isfinite(v)]
        if label != "running_mean" and positive:
            ax.set_yscale("log")
    bad = [i for i, r in enumerate(layers) if r.tiny_var_channels or r.nonfinite_values]
    for i in bad:
        for ax in axes:
            ax.axvspan(i - 0.4, i + 0.4, color="C3", alpha=0.15)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([r.name for r in layers], rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlabel("BN layer (module order)")
    fig.suptitle("Running statistics by depth")
    return fig

"""Formatting shared by tables (plain data in, strings out); the number formats live in
:mod:`bnscope.fmt` and are re-exported here."""

from __future__ import annotations

from typing import Any

from ..fmt import num, pct, percent, span

__all__ = ["momentum_cell", "num", "pct", "percent", "prior_text", "span"]


def momentum_cell(layer: Any) -> str:
    """A layer's momentum for tables: the value, "cum." for a cumulative average
    (``momentum=None``), "-" for a frozen layer (no EMA)."""
    if getattr(layer, "status", None) == "frozen":
        return "-"
    momentum = getattr(layer, "momentum", None)
    return "cum." if momentum is None else num(momentum)


def prior_text(prior: Any) -> str:
    """A test-time prior N as tables and figures write it: ``16``, ``1000``, ``inf`` (a JSON
    document's ``"inf"`` too)."""
    if isinstance(prior, str):
        return prior
    return f"{float(prior):g}"

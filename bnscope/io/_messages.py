"""Wording shared by the io modules' one-line error messages."""

from __future__ import annotations

import re

_MAX_LISTED = 5


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception message, shortened; the type name if it has none."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        if found:
            text = found.group(1)
    line = text.splitlines()[0].strip() if text else ""
    line = line.split(". ", 1)[0].rstrip(".")
    if not line:
        return type(exc).__name__
    if len(line) > 200:
        line = line[:197] + "..."
    return line


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")


def _exc_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, shortened to ``limit`` characters."""
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."

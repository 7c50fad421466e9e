"""Command-line interface: a thin typer layer over the library (one module per command)."""

from __future__ import annotations

from collections.abc import Sequence

from . import (  # noqa: F401 (importing registers the commands)
    adapt_cmd,
    corrupt_cmd,
    demo_cmd,
    ghost_cmd,
    inspect_cmd,
    precise_cmd,
)
from .app import app


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code when ``argv`` is given."""
    from typer.main import get_command

    command = get_command(app)
    if argv is None:
        command.main(prog_name="bnscope")
        return 0
    return int(command.main(args=list(argv), prog_name="bnscope", standalone_mode=False) or 0)


__all__ = ["app", "main"]

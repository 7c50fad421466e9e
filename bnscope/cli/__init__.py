"""Command-line interface: a thin typer layer over the library (one module per command)."""

from __future__ import annotations

from collections.abc import Sequence

from . import (  # noqa: F401 (importing registers the commands)
    adapt_cmd,
    completion_cmd,
    corrupt_cmd,
    demo_cmd,
    ghost_cmd,
    inspect_cmd,
    leakage_cmd,
    precise_cmd,
)
from .app import app


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code when ``argv`` is given.

    Run from the command line (``argv`` None), the current folder goes first on ``sys.path``
    as ``python -m bnscope`` puts it there (not under ``python -P``/``PYTHONSAFEPATH``): a
    pickled whole module whose class lives in a module of the current folder, and
    ``pkg.module:factory`` specs of local modules, load the same under either."""
    from typer.main import get_command

    command = get_command(app)
    if argv is None:
        _current_folder_on_path()
        command.main(prog_name="bnscope")
        return 0
    return int(command.main(args=list(argv), prog_name="bnscope", standalone_mode=False) or 0)


def _current_folder_on_path() -> None:
    import os
    import sys

    if getattr(sys.flags, "safe_path", False):  # Python 3.11+
        return
    try:
        cwd = os.getcwd()
    except OSError:  # the folder was removed under us
        return
    from ..io.modelspec import add_to_sys_path

    add_to_sys_path(cwd)


__all__ = ["app", "main"]

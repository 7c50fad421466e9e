"""Running the CLI in-process in tests: ``run(...)`` and the one-error-line contract."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from bnscope.cli import app

runner = CliRunner()


def run(*args: str, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_error_line(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnscope: error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""

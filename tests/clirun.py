"""Running the CLI in-process in tests: ``run(...)``, which checks every ``--json`` document
against its JSON Schema, and the one-error-line contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from bnscope.cli import app

from .schemacheck import check_document

runner = CliRunner()


def run(*args: str, cwd: Path | None = None):
    """Run ``bnscope ARGS``; with ``--json``, what it printed must be one document that
    validates against the schema it names."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    if "--json" in map(str, args) and result.stdout.lstrip().startswith("{"):
        check_document(json.loads(result.stdout))
    return result


def one_error_line(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnscope: error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""

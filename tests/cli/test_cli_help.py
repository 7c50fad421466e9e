"""Every command and every option has help text; --help and --version work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from bnscope import __version__
from bnscope.cli import app

COMMANDS = ["inspect", "precise", "adapt", "ghost", "demo", "corrupt"]


def test_every_command_and_option_has_help():
    group = get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    for name, command in group.commands.items():
        assert command.help and len(command.help) > 20, name
        for param in command.params:
            assert getattr(param, "help", None), f"{name} {param.name} has no help"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command):
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.stdout


def test_version_and_bare_invocation():
    res = CliRunner().invoke(app, ["--version"])
    assert res.stdout.strip() == f"bnscope {__version__}"
    res = CliRunner().invoke(app, [])
    assert res.exit_code == 0 and "inspect" in res.stdout


def test_python_m_and_help_do_not_import_torch():
    code = (
        "import sys, runpy; sys.argv=['bnscope','--help']\n"
        "try:\n    runpy.run_module('bnscope', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout

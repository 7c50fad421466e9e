"""Every command and every option has help text and names its value (``--batches N``, not
``<int>``; switches name none); --help, --version and -V work."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.core import TyperArgument, TyperOption
from typer.main import get_command
from typer.testing import CliRunner

from bnscope import __version__
from bnscope.cli import app

COMMANDS = ["inspect", "precise", "adapt", "ghost", "leakage", "demo", "corrupt", "completion"]
#: an upper-case word (PATH, SPEC, N), or the values themselves (bf16|fp16)
METAVAR = re.compile(r"^([A-Z]+|[a-z0-9]+(\|[a-z0-9]+)+)$")


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


def test_every_value_has_a_metavar_and_no_switch_shows_a_type():
    group = get_command(app)
    ctx = group.make_context("bnscope", ["inspect"], resilient_parsing=True)
    checked = 0
    for name, command in [("bnscope", group), *group.commands.items()]:
        params = [*command.params, command.get_help_option(ctx)]
        for param in params:
            where = f"{name} {param.name}"
            if isinstance(param, TyperOption) and param.is_flag:
                assert param.metavar == "" and param.display_type_rich(ctx) == "", where
            elif isinstance(param, TyperOption):
                assert METAVAR.match(param.metavar or ""), where
                assert param.display_type_rich(ctx) == param.metavar, where
            else:
                assert isinstance(param, TyperArgument), where
                assert METAVAR.match(param.metavar or ""), where
                assert param.display_type_rich(ctx) is None, where
            checked += 1
    assert checked >= 100  # every parameter of every command


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_shows_metavars_not_python_types(command):
    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.stderr
    assert not re.search(r"<(str|bool|int|float|path)", res.stdout), res.stdout
    if command in (["precise"], ["inspect"]):
        assert "[CKPT]" in res.stdout  # the usage line
        for flag, metavar in (("--batches", "N"), ("--model", "SPEC"), ("--report-dir", "DIR")):
            assert re.search(rf"│ {flag} +{metavar} ", res.stdout), flag
        assert re.search(r"│ --force +[A-Z]", res.stdout)  # no value: the help text follows
        assert "--out " not in res.stdout  # the deprecated spelling is hidden


def test_version_and_bare_invocation():
    for flag in ("--version", "-V"):
        res = CliRunner().invoke(app, [flag])
        assert res.exit_code == 0
        assert res.stdout == f"bnscope {__version__}\n"
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

"""Shell completion: ``bnscope completion SHELL`` prints the script, and the completion protocol
the scripts use (``_BNSCOPE_COMPLETE``) answers with commands, options and option values, in
process, through ``python -m bnscope``, and in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnscope.cli import app

from ..clirun import one_error_line, run

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def complete_bash(words: str) -> list[str]:
    """What bash's completion function gets for the command line ``words`` (the last word
    is the one being completed; a trailing space starts a new word)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_BNSCOPE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    res = runner.invoke(app, [], env=env)
    assert res.exit_code == 0, res.output
    return res.stdout.split()


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o default -F _bnscope_completion bnscope"),
        ("zsh", "#compdef bnscope"),
        ("fish", "complete --command bnscope"),
        ("powershell", "Register-ArgumentCompleter -Native -CommandName bnscope"),
    ],
)
def test_completion_prints_the_script(shell, marker):
    res = run("completion", shell)
    assert res.exit_code == 0, res.stderr
    assert marker in res.stdout
    assert f"_BNSCOPE_COMPLETE=complete_{shell}" in res.stdout or shell == "powershell"
    assert res.stderr == ""


def test_completion_of_an_unknown_shell_is_one_error_line():
    one_error_line(run("completion", "tcsh"), "no completion for the shell 'tcsh'")
    one_error_line(run("completion"), "Missing argument 'SHELL'")


def test_commands_options_and_values_complete():
    assert complete_bash("bnscope ins") == ["inspect"]
    assert complete_bash("bnscope c") == ["completion", "corrupt"]
    assert complete_bash("bnscope precise --report") == ["--report-dir"]
    assert complete_bash("bnscope precise --ou") == ["--output"]  # --out is hidden
    assert complete_bash("bnscope precise --amp ") == ["bf16", "fp16"]
    assert complete_bash("bnscope inspect --fail-on w") == ["warning"]
    assert complete_bash("bnscope ghost --device c") == ["cpu", "cuda"]
    assert complete_bash("bnscope corrupt src dst --corruption sh") == ["shot_noise"]
    assert complete_bash("bnscope completion f") == ["fish"]
    assert complete_bash("bnscope precise --data ") == []  # paths: left to the shell


def test_both_spellings_of_the_protocol_and_every_shell():
    """typer's ``complete_bash`` (what the scripts use) and click's ``bash_complete``."""
    env = {"COMP_WORDS": "bnscope gh", "COMP_CWORD": "1"}
    for instruction in ("complete_bash", "bash_complete"):
        res = runner.invoke(app, [], env={**env, "_BNSCOPE_COMPLETE": instruction})
        assert (res.exit_code, res.stdout.strip()) == (0, "ghost"), instruction
    zsh = {"_BNSCOPE_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "bnscope pre"}
    res = runner.invoke(app, [], env=zsh)
    assert res.exit_code == 0 and '"precise"' in res.stdout
    fish = {"_BNSCOPE_COMPLETE": "fish_complete", "_TYPER_COMPLETE_ARGS": "bnscope ad",
            "_TYPER_COMPLETE_FISH_ACTION": "get-args"}  # fmt: skip
    res = runner.invoke(app, [], env=fish)
    assert res.exit_code == 0 and res.stdout.startswith("adapt\t")
    res = runner.invoke(app, [], env={"_BNSCOPE_COMPLETE": "source_bash"})
    assert res.exit_code == 0 and "_bnscope_completion" in res.stdout


def test_python_m_bnscope_completes_without_importing_torch():
    code = (
        "import sys, runpy; sys.argv = ['bnscope']\n"
        "try:\n    runpy.run_module('bnscope', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for completion'\n"
    )
    env = {**os.environ, "_BNSCOPE_COMPLETE": "complete_bash",
           "COMP_WORDS": "bnscope precise --batch", "COMP_CWORD": "2"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["--batch-size", "--batches"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_a_real_bash_completes_with_the_printed_script(tmp_path: Path):
    """The script of ``bnscope completion bash``, sourced in bash, completes through the
    ``bnscope`` on PATH (here a wrapper around ``python -m bnscope``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "bnscope"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bnscope "$@"\n')
    wrapper.chmod(0o755)
    script = (
        'source <(bnscope completion bash)\n'
        "complete -p bnscope\n"
        "COMP_WORDS=(bnscope pre); COMP_CWORD=1; _bnscope_completion bnscope\n"
        'printf "reply:%s\\n" "${COMPREPLY[@]}"\n'
        "COMP_WORDS=(bnscope inspect --fail-on e); COMP_CWORD=3; _bnscope_completion bnscope\n"
        'printf "reply:%s\\n" "${COMPREPLY[@]}"\n'
    )
    path = os.pathsep.join([str(bindir), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "complete -o default -F _bnscope_completion bnscope"
    assert lines[1:] == ["reply:precise", "reply:error"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_the_zsh_and_fish_scripts_parse(shell: str, tmp_path: Path):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    script = tmp_path / f"bnscope.{shell}"
    script.write_text(run("completion", shell).stdout)
    check = [shell, "-n", str(script)] if shell == "zsh" else [shell, "--no-execute", str(script)]
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

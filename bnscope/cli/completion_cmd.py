"""``bnscope completion SHELL``: the shell-completion script for bash, zsh, fish or PowerShell."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import UsageError
from .app import SHELLS, BnscopeCommand, app, completion_script
from .options import complete_from

HELP = (
    "Print the script that makes SHELL complete bnscope's commands, options and their values "
    "(paths are left to the shell).\n\n"
    "bash: bnscope completion bash > ~/.local/share/bash-completion/completions/bnscope "
    "(or add eval \"$(bnscope completion bash)\" to ~/.bashrc).\n\n"
    "zsh: bnscope completion zsh > ~/.zfunc/_bnscope, with fpath+=~/.zfunc; autoload -Uz "
    "compinit; compinit in ~/.zshrc.\n\n"
    "fish: bnscope completion fish > ~/.config/fish/completions/bnscope.fish\n\n"
    "PowerShell: bnscope completion powershell >> $PROFILE"
)


@app.command("completion", help=HELP, cls=BnscopeCommand)
def completion_command(
    shell: Annotated[
        str,
        typer.Argument(
            metavar="SHELL",
            help="bash, zsh, fish, powershell or pwsh.",
            show_default=False,
            autocompletion=complete_from(*SHELLS),
        ),
    ],
) -> None:
    name = shell.strip().lower()
    if name not in SHELLS:
        raise UsageError(
            f"no completion for the shell {shell!r}", f"name one of: {', '.join(SHELLS)}"
        )
    sys.stdout.write(completion_script(name) + "\n")

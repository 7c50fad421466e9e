"""The typer application and its error -> exit-code mapping.

Exit codes: 0 ran; 1 ``--fail-on`` matched a finding; 2 usage or input error; 130 interrupted.
Every expected error is one line on stderr (``bnscope: error: what; what to do``); ``--debug``
adds the traceback. Under ``torchrun`` that line is shown once, by the failing rank.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .. import __version__
from ..errors import BnscopeError
from .runtime import DistributedSession, Outcome

PROG = "bnscope"
#: the environment variable of the shell-completion protocol (``bnscope completion SHELL``)
COMPLETE_VAR = "_BNSCOPE_COMPLETE"
#: shells whose completion scripts ``bnscope completion`` prints
SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def _error_line(message: str, stream: Any = None) -> None:
    from .options import as_flags

    text = as_flags(" ".join(str(message).split()))
    stream = stream if stream is not None else sys.stderr
    stream.write(f"{PROG}: error: {text}\n")
    stream.flush()


class _Argument(TyperArgument):
    """An argument whose help row shows its metavar (``CKPT``), not a Python type (``<str>``)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _conventional(param: Any) -> Any:
    """A parameter's help row as command-line tools write it: a switch (``--force``,
    ``--help``) shows no value, an argument its metavar and no type."""
    if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
        param.metavar = ""
    elif type(param) is TyperArgument:
        param.__class__ = _Argument
    return param


class BnscopeCommand(TyperCommand):
    """A command whose help shows metavars (``--batches N``, ``[CKPT]``) and bare switches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _conventional(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _conventional(super().get_help_option(ctx))


def completion_request(complete_var: str | None = None) -> str | None:
    """The shell-completion instruction in the environment (``complete_bash``), or None.

    Both spellings of the protocol are accepted: typer's (``complete_bash``, which the scripts
    of ``bnscope completion`` use) and click's (``bash_complete``, ``bash_source``); the
    environment is set to typer's, and typer's completion classes are registered."""
    var = complete_var or COMPLETE_VAR
    instruction = os.environ.get(var)
    if not instruction:
        return None
    first, _, second = instruction.partition("_")
    if first in SHELLS and second in ("complete", "source"):
        instruction = f"{second}_{first}"
        os.environ[var] = instruction
    from typer.completion import completion_init

    completion_init()
    return instruction


def completion_script(shell: str) -> str:
    """The script that makes ``shell`` complete bnscope's commands and options."""
    from typer.completion import completion_init, get_completion_script

    completion_init()
    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)


class BnscopeGroup(TyperGroup):
    """A typer group whose ``main`` turns every expected error into one line and exit 2.

    Under ``torchrun`` it also joins the process group first and, at the end, makes every rank
    agree on the outcome (see :class:`~bnscope.cli.runtime.DistributedSession`): the error
    line is shown once, every rank exits 2 when any rank failed, and nobody waits forever."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if completion_request(complete_var) is not None:  # answered, then exits
            return super().main(
                args=argv,
                prog_name=prog_name or PROG,
                complete_var=complete_var,
                standalone_mode=standalone_mode,
                **extra,
            )
        debug = "--debug" in argv
        try:
            session = DistributedSession.start()
        except BnscopeError as exc:  # could not join the process group: no one to tell
            _error_line(exc.line())
            return self._exit(2, standalone_mode)
        # A torchrun worker that joined the group itself leaves through os._exit once every
        # rank agreed on the outcome (see DistributedSession.leave): never through the
        # interpreter's teardown, where a process-group thread may still be joinable.
        leave = session.owned and session.active and standalone_mode
        code = 1
        try:
            outcome = self._invoke(argv, prog_name, complete_var, extra, session.active)
            code = session.conclude(outcome, debug, _error_line)
        except KeyboardInterrupt:
            if not leave:
                raise
            code = 130  # a second Ctrl-C while the ranks were agreeing: no more collectives
        finally:
            if leave:
                session.leave(code)  # does not return
            session.close()
        return self._exit(code, standalone_mode)

    @staticmethod
    def _exit(code: int, standalone_mode: bool) -> Any:
        if not standalone_mode:
            return code
        sys.exit(code)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _conventional(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _conventional(super().get_help_option(ctx))

    def _invoke(
        self,
        argv: list[str],
        prog_name: str | None,
        complete_var: str | None,
        extra: dict[str, Any],
        catch_all: bool,
    ) -> Outcome:
        """Run the command; how it ended (nothing is printed here)."""
        try:
            result = super().main(
                args=argv,
                prog_name=prog_name or PROG,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = result if isinstance(result, int) else 0
            if code == 130:  # typer turned a KeyboardInterrupt into exit code 130
                return Outcome(130, None, "interrupted; nothing was written", interrupted=True)
            return Outcome(code)
        except BnscopeError as exc:
            return Outcome(2, exc, exc.line(), failed=True)
        except typer.TyperException as exc:  # click's usage errors (vendored or not)
            if type(exc).__name__ == "NoArgsIsHelpError":
                return Outcome(0)  # the help text was already printed
            code = getattr(exc, "exit_code", 2) or 2
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else PROG
            return Outcome(code, exc, f"{exc.format_message()}; see '{where} --help'", True)
        except typer.Abort as exc:
            return Outcome(130, exc, "aborted", interrupted=True)
        except KeyboardInterrupt as exc:
            return Outcome(130, exc, "interrupted; nothing was written", interrupted=True)
        except BrokenPipeError:
            return Outcome(1)
        except Exception as exc:
            if not catch_all:
                raise
            return Outcome(1, exc, None, failed=True, unexpected=True)


app = typer.Typer(
    name=PROG,
    cls=BnscopeGroup,
    help="Diagnose and fix BatchNorm statistics in PyTorch checkpoints.\n\n"
    "inspect: what is wrong with the BN statistics (from the checkpoint alone, or with the "
    "model and its training data: stale EMA, train/test gap). precise: exact population "
    "statistics (Precise BN). adapt: statistics for a new domain (Adaptive BN). ghost: how the "
    "model depends on the normalization batch size. corrupt: a corrupted copy of an image "
    "folder. demo: all of it on built-in data. completion: tab completion for bash, zsh and "
    "fish.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"{PROG} {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Print the version and exit.",
        callback=_version,
        is_eager=True,
    ),
) -> None:
    """Diagnose and fix BatchNorm statistics in PyTorch checkpoints."""

"""The typer application and its error -> exit-code mapping.

Exit codes: 0 ran; 1 ``--fail-on`` matched a finding; 2 usage or input error; 130 interrupted.
Every expected error is one line on stderr (``bnscope: error: what; what to do``); ``--debug``
adds the traceback. Under ``torchrun`` that line is shown once, by the failing rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import BnscopeError
from .runtime import DistributedSession, Outcome

PROG = "bnscope"


def _error_line(message: str, stream: Any = None) -> None:
    from .options import as_flags

    text = as_flags(" ".join(str(message).split()))
    stream = stream if stream is not None else sys.stderr
    stream.write(f"{PROG}: error: {text}\n")
    stream.flush()


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
        debug = "--debug" in argv
        try:
            session = DistributedSession.start()
        except BnscopeError as exc:  # could not join the process group: no one to tell
            _error_line(exc.line())
            return self._exit(2, standalone_mode)
        try:
            outcome = self._invoke(argv, prog_name, complete_var, extra, session.active)
            code = session.conclude(outcome, debug, _error_line)
        finally:
            session.close()
        return self._exit(code, standalone_mode)

    @staticmethod
    def _exit(code: int, standalone_mode: bool) -> Any:
        if not standalone_mode:
            return code
        sys.exit(code)

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
    "folder. demo: all of it on built-in data.",
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
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Diagnose and fix BatchNorm statistics in PyTorch checkpoints."""

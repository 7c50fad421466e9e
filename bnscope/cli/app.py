"""The typer application and its error -> exit-code mapping.

Exit codes: 0 ran; 1 ``--fail-on`` matched a finding; 2 usage or input error; 130 interrupted.
Every expected error is one line on stderr (``bnscope: error: what; what to do``); ``--debug``
adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import BnscopeError

PROG = "bnscope"


def _error_line(message: str) -> None:
    text = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


class BnscopeGroup(TyperGroup):
    """A typer group whose ``main`` turns every expected error into one line and exit 2."""

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
        code = 0
        try:
            result = super().main(
                args=argv,
                prog_name=prog_name or PROG,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = result if isinstance(result, int) else 0
        except BnscopeError as exc:
            if debug:
                traceback.print_exc()
            _error_line(exc.line())
            code = 2
        except typer.TyperException as exc:  # click's usage errors (vendored or not)
            code = getattr(exc, "exit_code", 2) or 2
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":
                code = 0  # the help text was already printed
            else:
                where = ctx.command_path if ctx is not None else PROG
                _error_line(f"{exc.format_message()}; see '{where} --help'")
        except typer.Abort:
            _error_line("aborted")
            code = 130
        except KeyboardInterrupt:
            _error_line("interrupted; nothing was written")
            code = 130
        except BrokenPipeError:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name=PROG,
    cls=BnscopeGroup,
    help="Diagnose and fix BatchNorm statistics in PyTorch checkpoints.\n\n"
    "inspect: static report from a checkpoint alone. precise: exact population statistics "
    "(Precise BN). adapt: statistics for a new domain (Adaptive BN). ghost: how the model depends "
    "on the normalization batch size. demo: all of it on built-in data.",
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

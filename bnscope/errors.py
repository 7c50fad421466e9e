"""Expected errors: each carries one line saying what is wrong and what to do.

Library errors speak in the library's parameters, written ``name=`` (``batches=100``,
``force=True``, ``key=state_dict:ema``), never in command-line flags. The CLI turns a
:class:`BnscopeError` into that single line on stderr and exit code 2, spelling each such
parameter as its flag (``--batches 100``, ``--force``, ``--key state_dict:ema``; see
:func:`bnscope.cli.options.as_flags`); ``--debug`` shows the traceback as well. Library
callers catch the subclasses.
"""

from __future__ import annotations


class BnscopeError(Exception):
    """An expected error: bad input or an impossible request.

    ``message`` says what is wrong, ``fix`` what to do about it. Both are single lines.
    """

    kind = "error"

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.fix = " ".join(fix.split()) if fix else None

    def line(self) -> str:
        """The one line the CLI prints (without the ``bnscope: error:`` lead)."""
        if self.fix:
            return f"{self.message}; {self.fix}"
        return self.message

    def __str__(self) -> str:
        return self.line()


class CheckpointError(BnscopeError):
    """The checkpoint cannot be read, located, trusted or written."""

    kind = "checkpoint"


class ModelError(BnscopeError):
    """The model spec cannot be resolved or the checkpoint does not fit it."""

    kind = "model"


class DataError(BnscopeError):
    """The data spec cannot be read or does not fit the model."""

    kind = "data"


class UsageError(BnscopeError):
    """An option or combination of options is not valid."""

    kind = "usage"


class NotAvailableError(BnscopeError):
    """A command exists in the interface but is not built in this version."""

    kind = "not-available"

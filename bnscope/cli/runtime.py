"""What every command shares: consoles, the project file, report output, ``--fail-on``, and
the command's part in a ``torchrun`` launch. No computation happens here.

Under ``torchrun`` (see :class:`DistributedSession`): every rank runs the command on its share
of the data; ranks other than 0 have ``sys.stdout``/``sys.stderr`` silenced for the whole
command, so the :class:`Ui` there prints nothing; files are written on rank 0 only (commands
call :func:`begin_output` once before writing or printing their result); an error on any rank
ends every rank, with one error line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import typer
from rich.console import Console

from ..errors import BnscopeError, UsageError
from ..io.config import ProjectConfig, load_project_config
from ..records import SEVERITIES, Report, severity_rank

if TYPE_CHECKING:
    from rich.progress import Progress

FAIL_LEVELS = SEVERITIES


def _width() -> int | None:
    if "COLUMNS" in os.environ:
        try:
            return max(40, int(os.environ["COLUMNS"]))
        except ValueError:
            return None
    return None


def stdout_console() -> Console:
    """The console for results (stdout). Wide when not a terminal so tables do not fold."""
    tty = sys.stdout.isatty()
    return Console(
        file=sys.stdout,
        width=_width() or (None if tty else 120),
        highlight=False,
        soft_wrap=False,
    )


def stderr_console() -> Console:
    """The console for progress, warnings and errors (stderr)."""
    return Console(file=sys.stderr, width=_width(), highlight=False, stderr=True)


@dataclass
class Ui:
    """Output switches of one invocation."""

    json: bool = False
    quiet: bool = False
    out: Console = field(default_factory=stdout_console)
    err: Console = field(default_factory=stderr_console)

    def info(self, message: str) -> None:
        """A status line on stderr, only for a person at a terminal: silent with --quiet or
        --json, and when stderr is not a terminal (so a failing run's stderr is the one error
        line)."""
        if self.show_progress:
            self.line(message)

    def line(self, message: str) -> None:
        """``message`` on stderr as one line: never wrapped at the console's width (the
        terminal wraps it; a file or a pipe keeps it whole)."""
        self.err.print(message, markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning line on stderr (silent with --quiet; kept with --json: stderr is free)."""
        if not self.quiet:
            from .options import as_flags

            text = as_flags(" ".join(message.split()))  # one line, never wrapped
            self.err.file.write(f"bnscope: warning: {text}\n")
            self.err.file.flush()

    @property
    def show_progress(self) -> bool:
        return not (self.quiet or self.json) and sys.stderr.isatty()


def project_config() -> ProjectConfig:
    return load_project_config(Path.cwd())


# --------------------------------------------------------------------------------------------
# torchrun

#: What torchrun sets for every worker (as :data:`bnscope.engine.distributed.TORCHRUN_ENV`).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def distributed_active() -> bool:
    """True when ``torch.distributed`` is initialized (never imports torch)."""
    if "torch.distributed" not in sys.modules:
        return False
    from ..engine import distributed

    return distributed.is_initialized()


def is_main_process() -> bool:
    """True on rank 0 of a process group, and without one (never imports torch)."""
    if not distributed_active():
        return True
    from ..engine import distributed

    return distributed.is_main_process()


def begin_output() -> bool:
    """Call once on every rank when the result is computed, before writing files or printing
    it. Under a process group it first checks that no rank failed (a status exchange: when one
    did, it raises and nothing is written), then returns True on rank 0 only. Without a
    process group it returns True."""
    if not distributed_active():
        return True
    from ..engine import distributed

    distributed.check_peers()
    return distributed.is_main_process()


@dataclass
class Outcome:
    """How one invocation ended on this rank: exit code, the exception (if any), the one error
    line to show, and what kind of ending it was."""

    code: int = 0
    exc: BaseException | None = None
    line: str | None = None
    failed: bool = False
    interrupted: bool = False
    unexpected: bool = False


class DistributedSession:
    """The CLI's part in a ``torchrun`` launch (inactive otherwise).

    :meth:`start` joins the process group from torchrun's environment (``gloo`` for CPU
    tensors, ``nccl`` for CUDA tensors when available) unless ``torch.distributed`` is already
    initialized, and silences ``sys.stdout``/``sys.stderr`` on ranks other than 0.
    :meth:`conclude` runs a last status exchange so that a rank that failed after the last
    collective stops nobody from finishing, prints the failure once (on the lowest failing
    rank), waits for every rank, and returns the exit code: 2 on every rank when any rank
    failed. :meth:`close` restores the streams and destroys the group it created.
    """

    def __init__(self) -> None:
        self.active = False
        self.owned = False
        self.real_err: TextIO = sys.stderr
        self._quiet: Any = None

    @classmethod
    def start(cls) -> DistributedSession:
        session = cls()
        torchrun = all(name in os.environ for name in TORCHRUN_ENV)
        if not torchrun and "torch.distributed" not in sys.modules:
            return session  # the common case: no torch import
        from ..engine import distributed

        session.owned = distributed.init_from_env()
        if not distributed.is_initialized():
            return session
        session.active = distributed.get_world_size() > 1
        session._quiet = distributed.quiet_unless_main()
        session.real_err = session._quiet.__enter__()
        return session

    def leave(self, code: int) -> NoReturn:
        """End this torchrun worker with ``code`` now: restore and flush the streams, then
        ``os._exit``, without destroying the process group or running the interpreter's
        teardown.

        Every rank calls it only after the ranks agreed on the outcome (:meth:`conclude`), so
        no collective is pending. The interpreter's normal exit destroys the gloo/NCCL
        process group in C++ static destructors, and when a peer has already gone that
        teardown can find a joinable worker thread and abort (``terminate called without an
        active exception``, SIGABRT, measured about one run in 20 of a failing rank's
        peer). Every rank's result is written and flushed before this point (outputs are
        atomic renames), so nothing is lost; DataLoader workers were already stopped by the
        collection loop."""
        import logging

        with contextlib.suppress(Exception):
            self.close_streams()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(code)

    def close_streams(self) -> None:
        """Restore ``sys.stdout``/``sys.stderr`` on ranks other than 0."""
        if self._quiet is not None:
            with contextlib.suppress(Exception):
                self._quiet.__exit__(None, None, None)
            self._quiet = None

    def close(self) -> None:
        """Restore the streams and destroy the process group this session created."""
        self.close_streams()
        if self.owned:
            from ..engine import distributed

            distributed.destroy()
            self.owned = False

    def conclude(self, outcome: Outcome, debug: bool, error_line: Any) -> int:
        """The exit code of this rank; shows the failure once (see the class docstring)."""
        if not self.active:
            if outcome.unexpected and outcome.exc is not None:
                raise outcome.exc
            if outcome.line is not None:
                if debug and isinstance(outcome.exc, BnscopeError):
                    traceback.print_exception(outcome.exc)
                error_line(outcome.line, sys.stderr)
            return outcome.code
        from ..engine import distributed

        rank, world = distributed.get_rank(), distributed.get_world_size()
        if outcome.interrupted:  # no collective: the others may be anywhere
            if rank == 0 and outcome.line is not None:
                error_line(outcome.line, self.real_err)
            return outcome.code
        status = distributed.status_of(outcome.exc)
        if status is None:
            if isinstance(outcome.exc, distributed.CommunicationError):
                status = distributed.RankStatus(rank, world, broken=True)
            else:
                text = outcome.line
                if outcome.failed and text is None:
                    text = distributed.error_text(outcome.exc or RuntimeError("failed"))
                status = distributed.exchange_status(
                    distributed.resolve_group(), text if outcome.failed else None
                )
        if status.broken:  # no more collectives: every rank that knows says so
            if outcome.line is not None:
                error_line(f"rank {rank} of {world}: {outcome.line}", self.real_err)
            return outcome.code or 2
        if status.ok:
            return outcome.code
        if status.reporter:
            if outcome.unexpected or (debug and isinstance(outcome.exc, BnscopeError)):
                traceback.print_exception(outcome.exc, file=self.real_err)
            if outcome.line is not None:
                where = "" if len(status.failed) == world else f"rank {rank} of {world}: "
                error_line(where + outcome.line, self.real_err)
            self.real_err.flush()
        distributed.barrier()  # the line is out before any rank exits
        return outcome.code if outcome.failed and outcome.code else 2


def report_folder(
    ui: Ui,
    report_dir: str | None,
    out: str | None = None,
    *,
    force: bool = False,
    output: str | None = None,
) -> str | None:
    """The command's report folder, checked before anything runs: ``--report-dir``, or its
    deprecated spelling ``--out`` (with a warning), refused when it is named like a
    checkpoint, names the checkpoint given as ``-o``, or holds an earlier report without
    ``--force`` (:func:`bnscope.render.reports.check_report_dir`)."""
    if out is not None:
        if report_dir is not None:
            raise UsageError(
                "--out is the old spelling of --report-dir, and both were given",
                "drop --out",
            )
        ui.warn(
            "--out is deprecated and will be removed: use --report-dir for the report folder "
            "(-o/--output is the checkpoint)"
        )
        report_dir = out
    if report_dir is None:
        return None
    if output is not None and os.path.abspath(output) == os.path.abspath(report_dir):
        raise UsageError(
            f"--report-dir {report_dir} and -o {output} name the same path: -o is the "
            "checkpoint file, --report-dir the folder for the report",
            "give them different paths",
        )
    from ..render.reports import check_report_dir

    check_report_dir(report_dir, force=force)
    return report_dir


def emit_report(ui: Ui, report: Report, report_dir: str | None, *, force: bool = False) -> None:
    """The one way a command shows its result: with ``--report-dir`` first the report folder
    (:func:`bnscope.render.reports.write_report`: report.json, figures, report.html; an
    earlier report there is replaced with ``--force``, and a status line says so); then
    stdout gets exactly one JSON document with ``--json`` (the folder's report.json, with its
    ``report_files``), else the report's view; the files written are listed on stderr for a
    person at a terminal."""
    from ..render.jsonout import report_json

    written: list[Path] = []
    if report_dir is not None:
        from ..render.reports import write_report
        from .options import as_flags

        written = write_report(
            report, report_dir, force=force, notify=lambda message: ui.info(as_flags(message))
        )
    if ui.json:
        from ..render.reports import report_document

        files = [p.name for p in written] if report_dir is not None else None
        ui.out.file.write(report_json(report_document(report, files)))
        ui.out.file.flush()
    else:
        from ..render.reports import report_view

        ui.out.print(report_view(report))
    if written:
        ui.info(f"wrote {', '.join(str(p) for p in written)}")


def check_fail_on(level: str | None) -> str | None:
    if level is None:
        return None
    level = level.lower()
    if level not in FAIL_LEVELS:
        raise UsageError(
            f"--fail-on {level!r} is not one of {', '.join(FAIL_LEVELS)}", "e.g. --fail-on warning"
        )
    return level


def exit_code_for(report: Report, fail_on: str | None) -> int:
    """1 when a finding is at or above ``fail_on``, else 0."""
    if fail_on is None:
        return 0
    threshold = severity_rank(fail_on)
    return 1 if any(severity_rank(f.severity) >= threshold for f in report.findings) else 0


def finish(code: int) -> None:
    if code:
        raise typer.Exit(code)


def new_progress(console: Console, get_time: Callable[[], float] | None = None) -> Progress:
    """The progress display: what runs, a bar, batches done and the total (``12/50``), the
    time spent and the estimated time left (``eta 0:00:40``). While the total is unknown (a
    data iterable without ``len()`` and no ``--batches``) the bar pulses, the count reads
    ``12/?`` and no time left is shown. ``get_time`` is rich's clock (tests pass their
    own)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TimeLeft(TimeRemainingColumn):
        """``eta 0:01:23`` once the total is known; nothing before."""

        def render(self, task: Task) -> Text:
            if task.total is None:
                return Text("")
            return Text.assemble("eta ", super().render(task))

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeLeft(),
        console=console,
        transient=True,
        get_time=get_time,
    )


@contextlib.contextmanager
def progress_bar(ui: Ui, description: str, total: int | None) -> Iterator[Any]:
    """A transient rich progress bar on stderr (:func:`new_progress`), only when stderr is a
    terminal and neither --quiet nor --json; yields the ``progress(done, total)`` callback or
    None. ``total`` is what the command knows before the run (from ``--batches``); the
    operation's callback brings the data's length when it is known."""
    if not ui.show_progress:
        yield None
        return
    with new_progress(ui.err) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, tot: int | None) -> None:
            bar.update(task, completed=done, total=tot)

        yield update

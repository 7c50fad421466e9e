"""What every command shares: consoles, option merging with the project file, device choice,
report output and ``--fail-on``. No computation happens here."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..config import ProjectConfig, load_project_config
from ..errors import UsageError
from ..records import SEVERITIES, Report, severity_rank

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
            self.err.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        """A warning line on stderr (silent with --quiet; kept with --json: stderr is free)."""
        if not self.quiet:
            text = " ".join(message.split())  # one line, never wrapped
            self.err.file.write(f"bnscope: warning: {text}\n")
            self.err.file.flush()

    @property
    def show_progress(self) -> bool:
        return not (self.quiet or self.json) and sys.stderr.isatty()


def merged(flag: Any, config: ProjectConfig, key: str, default: Any = None) -> Any:
    """A flag's value, else the project file's, else the default (flags override the file)."""
    if flag is not None:
        return flag
    return config.get(key, default)


def project_config() -> ProjectConfig:
    return load_project_config(Path.cwd())


def require_checkpoint(arg: str | None, config: ProjectConfig) -> Path:
    value = merged(arg, config, "checkpoint")
    if value is None:
        raise UsageError(
            "no checkpoint given",
            'pass CKPT, or set checkpoint = "..." in bnscope.toml or [tool.bnscope]',
        )
    return Path(value)


def parse_floats(text: str | list[float] | None, option: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    if isinstance(text, list):
        items: list[Any] = list(text)
    else:
        items = [t for t in text.replace(" ", "").split(",") if t]
    try:
        values = tuple(float(t) for t in items)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{option} must be comma-separated numbers, got {text!r}", f"e.g. {option} 0.5,0.5,0.5"
        ) from exc
    if not values:
        raise UsageError(f"{option} is empty", f"e.g. {option} 0.5,0.5,0.5")
    return values


def resolve_device(spec: str | None) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``; ``cuda`` or ``cuda:i``."""
    spec = (spec or "auto").strip().lower()
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here", "use --device cpu")
        if ":" in spec and int(spec[5:]) >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA devices",
                "pick an existing index",
            )
        return spec
    raise UsageError(f"--device {spec!r} is not auto, cpu, cuda or cuda:N", "e.g. --device cpu")


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


@contextlib.contextmanager
def progress_bar(ui: Ui, description: str, total: int | None) -> Iterator[Any]:
    """A transient rich progress bar on stderr, only when stderr is a terminal and neither
    --quiet nor --json; yields the ``progress(done, total)`` callback or None."""
    if not ui.show_progress:
        yield None
        return
    from rich.progress import Progress

    with Progress(console=ui.err, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, tot: int | None) -> None:
            bar.update(task, completed=done, total=tot)

        yield update

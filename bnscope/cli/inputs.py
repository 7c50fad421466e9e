"""Command-line inputs to a :class:`~bnscope.session.Job`: the flags of a command, merged
with the project file and the defaults by :func:`bnscope.session.resolve_options`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..io.config import ProjectConfig
from ..session import Job, resolve_options

if TYPE_CHECKING:
    from .runtime import Ui

@dataclass
class JobFlags:
    """The options of a command that reach the job, as given on the command line (None: not
    given, so the project file or the default applies)."""

    key: str | None = None
    trust: bool = False
    model: str | None = None
    model_kwargs: str | None = None
    data: str | None = None
    eval_data: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    input_key: str | None = None
    call: str | None = None
    image_size: int | None = None
    resize: int | None = None
    channels: int | None = None
    mean: str | None = None
    std: str | None = None
    seed: int = 0
    drop_last: bool | None = None
    skip_unreadable: bool | None = None
    device: str | None = None
    amp: str | None = None
    channels_last: bool = False


def require_checkpoint(arg: str | None, config: ProjectConfig) -> Path:
    """``CKPT``, else the project file's ``checkpoint``."""
    value = arg if arg is not None else config.get("checkpoint")
    if value is None:
        raise UsageError(
            "no checkpoint given",
            'pass CKPT, or set checkpoint = "..." in bnscope.toml or [tool.bnscope]',
        )
    return Path(value)


def open_job(
    ui: Ui,
    config: ProjectConfig,
    checkpoint: str | Path | None,
    flags: JobFlags,
    *,
    literal: tuple[str, ...] = (),
) -> Job:
    """The job of one invocation: notices go to stderr as warnings, status lines as
    ``ui.info``, both with the library's ``name=value`` spelled as flags. How the model runs
    (``--device``, ``--amp``) is checked here, before anything is loaded."""
    from .options import as_flags

    path = checkpoint if isinstance(checkpoint, Path) else require_checkpoint(checkpoint, config)
    job = Job(
        path,
        resolve_options(config, asdict(flags), literal=literal),
        notify=ui.warn,
        info=lambda message: ui.info(as_flags(message)),
    )
    job.check_run()
    return job

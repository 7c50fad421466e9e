"""Atomic file output: every file bnscope writes goes through :func:`atomic_path`.

A temporary file is created in the target's folder, written, flushed to disk and renamed onto
the target, so a reader never sees half a file, and a failure or interrupt at any point leaves
neither a partial file nor a temporary one. A new file gets the permissions any program's new
file gets, ``0666`` less the umask (``open()``'s default; ``tempfile.mkstemp`` would make it
``0600``); a file that is replaced keeps its permissions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError

_TEMP_TRIES = 100


def create_temp(folder: Path, prefix: str, suffix: str = "", *, directory: bool = False) -> Path:
    """Create a new, empty file (or, with ``directory``, a folder) named ``prefix`` + random +
    ``suffix`` in ``folder`` and return its path.

    It is created with mode ``0666`` (``0777`` for a folder) and the kernel applies the umask
    (and a default ACL), exactly as for any file a program creates. Raises ``OSError``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(_TEMP_TRIES):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, flags, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on clean exit it replaces ``target``.

    The temporary file exists (empty) when the block starts; write it by path. On a clean exit
    it is synced to disk and renamed onto ``target`` (then the folder is synced, where the
    platform allows); on any exception, ``KeyboardInterrupt`` included, it is removed and the
    exception propagates. Permissions: see the module docstring. OS errors propagate as
    ``OSError``; callers word them (:func:`write_error`).
    """
    target = Path(target)
    folder = target.parent
    tmp = create_temp(folder, f".{target.name}.", ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its permissions
            os.chmod(tmp, os.stat(target).st_mode & 0o777)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable where the platform allows opening folders."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(target: str | Path, exc: OSError) -> UsageError:
    """The one-line error for a file that could not be written: what and why, and a fix that
    fits the cause (permissions, a full disk, anything else)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to"
    elif exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free some disk space, or write elsewhere"
    else:
        fix = "check that the folder exists, is writable and has free space"
    return UsageError(f"cannot write {target} ({reason})", fix)


def write_text(target: str | Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise write_error(target, exc) from exc
    return Path(target)


def save_figure(fig: Any, target: str | Path, dpi: int = 120) -> Path:
    """Atomically save a figure (anything with matplotlib's ``savefig``) as PNG."""
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    except OSError as exc:
        raise write_error(target, exc) from exc
    return Path(target)


def check_out_dir(out: str | Path | None) -> None:
    """Refuse an ``--out`` folder that cannot be created, before anything runs (so a long run
    never ends with nothing but an error, and no checkpoint is written next to a bad --out):
    an existing file in its place, or a file where one of its parent folders should be."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"out={path} exists and is not a folder", "choose a folder path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"cannot create out= folder {path} ({parent} is a file)",
                    "choose a folder you can write to",
                )
            break


def prepare_out_dir(out: str | Path) -> Path:
    """Create the ``--out`` folder (and parents); a file in its place is an error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={out} exists and is not a folder", "choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create out= folder {out} ({exc.strerror or exc})",
            "choose a folder you can write to",
        ) from exc
    return out


def write_report_dir(
    out: str | Path,
    report_text: str,
    figures: dict[str, Any],
    texts: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``report.json``, each figure (``name -> Figure``) as ``name.png`` and each extra
    text file (``file name -> text``, e.g. ``report.html``) into ``out``, each atomically."""
    folder = prepare_out_dir(out)
    written = [write_text(folder / "report.json", report_text)]
    for name, fig in figures.items():
        written.append(save_figure(fig, folder / f"{name}.png"))
    for name, text in (texts or {}).items():
        written.append(write_text(folder / name, text))
    return written

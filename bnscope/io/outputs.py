"""Atomic file output: every file bnscope writes goes through :func:`atomic_path`.

A temporary file is created in the target's folder, written, flushed to disk and renamed onto
the target, so a reader never sees half a file, and a failure or interrupt at any point leaves
neither a partial file nor a temporary one. A new file gets the permissions any program's new
file gets, ``0666`` less the umask (``open()``'s default; ``tempfile.mkstemp`` would make it
``0600``); a file that is replaced keeps its permissions.

The report folder (``report_dir=``, ``--report-dir``) holds one report: :func:`check_report_dir`
refuses a folder named like a checkpoint file and a folder that holds an earlier report (unless
``force=True``), and :func:`write_report_dir` replaces an earlier report as a whole: every new
file is written before any earlier file is touched, and the earlier report's files that the new
one does not write are removed, so files of two runs never share a folder. ``report.json`` is
the manifest: its ``report_files`` lists the files of its report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
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


#: suffixes of checkpoint files: a report folder named like one is refused (the checkpoint is
#: ``output=``, the report folder ``report_dir=``: a folder named ``fixed.pt`` is a mix-up)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
#: the report's own document, which lists the report's files under ``report_files``
MANIFEST = "report.json"


@dataclass(frozen=True)
class EarlierReport:
    """A report found in a report folder: the ``command`` and ``checkpoint`` its report.json
    names (None when unknown) and the names of its files in the folder."""

    folder: Path
    command: str | None
    checkpoint: str | None
    files: tuple[str, ...]

    def describe(self) -> str:
        """``'an earlier inspect report of runs/ck.pt (report.json, running_stats.png)'``"""
        what = f"an earlier {self.command} report" if self.command else "an earlier report"
        if self.checkpoint:
            what += f" of {self.checkpoint}"
        shown = ", ".join(self.files[:4])
        if len(self.files) > 4:
            shown += f" and {len(self.files) - 4} more"
        return f"{what} ({shown})"


@dataclass(frozen=True)
class ReportWrite:
    """What :func:`write_report_dir` did: the files written (in the order given), the files of
    the earlier report that it removed (not part of the new report), and that report."""

    written: list[Path]
    removed: list[Path]
    earlier: EarlierReport | None


def _plain_name(name: object) -> bool:
    """A file name inside the folder (never a path out of it)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def earlier_report(folder: str | Path, known: Iterable[str] = ()) -> EarlierReport | None:
    """The report already in ``folder``, or None: its report.json (whatever wrote it) with the
    files its ``report_files`` lists, and any file named in ``known`` (the names bnscope
    writes into report folders: reports of older versions listed no files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    names: dict[str, None] = {}
    command = checkpoint = None
    manifest = folder / MANIFEST
    if manifest.is_file():
        names[MANIFEST] = None
        doc = _read_manifest(manifest)
        if doc is not None and str(doc.get("schema", "")).startswith("bnscope."):
            command = doc.get("command") if isinstance(doc.get("command"), str) else None
            ckpt = doc.get("checkpoint")
            checkpoint = ckpt if isinstance(ckpt, str) else None
            listed = doc.get("report_files")
            for name in listed if isinstance(listed, list) else ():
                if _plain_name(name):
                    names[name] = None
    for name in known:
        names[name] = None
    present = tuple(n for n in names if (folder / n).is_file() or (folder / n).is_symlink())
    if not present:
        return None
    return EarlierReport(folder, command, checkpoint, present)


def check_report_dir(
    report_dir: str | Path, *, force: bool = False, known: Iterable[str] = ()
) -> EarlierReport | None:
    """Refuse a report folder before anything runs (so a long run never ends with nothing but
    an error, and no checkpoint is written beside a bad report folder): a name that ends in a
    checkpoint suffix (``fixed.pt``: the checkpoint is ``output=``), a file in its place or in
    place of a parent folder, and, without ``force``, a folder that holds an earlier report.
    Returns that earlier report (which ``force`` replaces), or None."""
    path = Path(report_dir)
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        raise UsageError(
            f"report_dir={path} ends in {suffix} like a checkpoint file, but report_dir= names "
            "the folder for report.json and the figures",
            "name a folder, e.g. report_dir=report/ (the checkpoint to write is output=PATH)",
        )
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"report_dir={path} exists and is not a folder", "name a folder for the report"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"cannot create report_dir= folder {path} ({parent} is a file)",
                    "choose a folder you can write to",
                )
            break
    earlier = earlier_report(path, known)
    if earlier is not None and not force:
        raise UsageError(
            f"report_dir={path} already holds {earlier.describe()}, and a report folder holds "
            "one report",
            "pass force=True to replace that report, or choose another report_dir=",
        )
    return earlier


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created (deepest
    last), so that a failure can remove them again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create report_dir= folder {folder} ({exc.strerror or exc})",
            "choose a folder you can write to",
        ) from exc
    return list(reversed(missing))


def write_report_dir(
    report_dir: str | Path,
    files: Mapping[str, bytes],
    *,
    force: bool = False,
    known: Iterable[str] = (),
) -> ReportWrite:
    """Write the report ``files`` (``name -> bytes``, :data:`MANIFEST` among them) into the
    folder ``report_dir`` (created with its parents if needed), after
    :func:`check_report_dir` (``force`` replaces an earlier report).

    Every file is first written to a temporary file in the folder and synced; only then are
    the earlier report's files that the new report does not write removed, and the temporary
    files renamed into place, the manifest last. A failure while writing (a full disk, an
    interrupt) leaves the folder as it was: no new file, no temporary file, the earlier report
    untouched, and a folder this call created removed again."""
    folder = Path(report_dir)
    names = list(files)
    bad = [n for n in names if not _plain_name(n)]
    if bad:
        raise ValueError(f"report file names must be plain names, got {bad!r}")
    earlier = check_report_dir(folder, force=force, known=known)
    created = _make_folder(folder)
    temps: dict[str, Path] = {}
    removed: list[Path] = []
    try:
        for name in names:  # created like any new file: 0666 less the umask
            tmp = create_temp(folder, f".{name}.", ".tmp")
            temps[name] = tmp
            with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its mode
                os.chmod(tmp, os.stat(folder / name).st_mode & 0o777)
            with open(tmp, "wb") as fh:
                fh.write(files[name])
                fh.flush()
                os.fsync(fh.fileno())
        for name in earlier.files if earlier is not None else ():
            if name not in files:
                (folder / name).unlink(missing_ok=True)
                removed.append(folder / name)
        order = [n for n in names if n != MANIFEST] + [n for n in names if n == MANIFEST]
        for name in order:
            os.replace(temps.pop(name), folder / name)
    except BaseException as exc:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()  # only when still empty
        if isinstance(exc, OSError):
            raise UsageError(
                f"cannot write the report in {folder} ({exc.strerror or exc})",
                "check the disk and the folder's permissions",
            ) from exc
        raise
    return ReportWrite([folder / n for n in names], removed, earlier)

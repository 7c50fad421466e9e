"""Atomic file output: temporary file in the target folder, then ``os.replace``.

A failure or interrupt at any point leaves neither a partial file nor a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on clean exit it replaces ``target``."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(
            f"cannot write in {folder} ({exc.strerror or exc})",
            "choose a folder you can write to",
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(target: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"cannot write {target} ({exc.strerror or exc})", "check the disk"
        ) from exc
    return Path(target)


def save_figure(fig: Any, target: str | Path, dpi: int = 120) -> Path:
    """Atomically save a figure (anything with matplotlib's ``savefig``) as PNG."""
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    except OSError as exc:
        raise UsageError(
            f"cannot write {target} ({exc.strerror or exc})", "check the disk"
        ) from exc
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

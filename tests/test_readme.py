"""Every ```bash and ```python block of README.md runs as pasted, in the README's order.

The test does what a new user does after cloning: it copies this checkout (tracked files and
untracked files git does not ignore) into a fresh temporary folder and runs the blocks there,
one after the other, as if pasted into one terminal:

- a ``bash`` block runs in ``bash`` with ``set -e -o pipefail`` (the first failing command
  fails the test; so a block that runs has no ``&&`` or ``||``, which ``set -e`` would not stop
  at) and with this Python's ``bin`` folder first on ``PATH`` (``bnscope``,
  ``python``, ``torchrun``); a ``cd`` in a block carries over to the next blocks, as it would
  in a terminal;
- a ``python`` block is fed to ``python -`` in the current folder, with the copied checkout on
  ``PYTHONPATH`` (the package importable, as after ``pip install -e .``).

A block is left out only when the line right before its fence (blank lines aside) is a
visible HTML comment that gives the reason, e.g. ``<!-- not run: needs a GPU -->``; the test
reports what it left out (a warning in pytest's summary). Other fences (``toml``, ``text``,
plain ```````) are not run; a ``toml`` block whose first line names a file (``# path``) must
parse and hold the same keys and values as that file.

The run includes ``bnscope demo`` (the quick start) and every command shown on the demo
folder: about two minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from .reallibs import subprocess_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN = ("bash", "python")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 900
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".hypothesis",
    "bnscope-demo*",
)  # fmt: skip


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason given in the comment before the fence

    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'plain'} block)"


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: code block never closed")
        before = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(
            Block(
                opening["lang"],
                "\n".join(lines[start + 1 : i]) + "\n",
                start + 1,
                marker["reason"] if marker else None,
            )
        )
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_blocks_are_well_formed() -> None:
    """Fast checks of every block: bash parses, python compiles, a not-run marker sits only
    before a block that would run, toml blocks that name a file match it."""
    assert any(b.lang in RUN and b.not_run is None for b in BLOCKS)
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.lang in RUN, f"{block.where()}: 'not run' marks a block that never runs"
        if block.lang == "bash":
            res = subprocess.run(["bash", "-n"], input=block.code, text=True,
                                 capture_output=True, check=False)  # fmt: skip
            assert res.returncode == 0, f"{block.where()}: {res.stderr}"
            if block.not_run is None:  # bash -e does not stop at a failure before && or ||
                assert not re.search(r"&&|\|\|", block.code), (
                    f"{block.where()}: put each command on its own line (no && or ||), so that "
                    "a failing command fails the test"
                )
        elif block.lang == "python":
            compile(block.code, block.where(), "exec")
        elif block.lang == "toml":
            parsed = tomllib.loads(block.code)
            first = block.code.splitlines()[0]
            named = re.match(r"#\s*(\S+\.toml)\b", first)
            if named and (ROOT / named[1]).is_file():
                on_disk = tomllib.loads((ROOT / named[1]).read_text(encoding="utf-8"))
                assert parsed == on_disk, f"{block.where()} differs from {named[1]}"


def test_readme_parser() -> None:
    text = "\n".join([
        "intro", "```bash", "echo 1", "```", "", "<!-- not run: needs a GPU -->", "",
        "```python", "print(2)", "```", "```toml", "a = 1", "```",
    ])  # fmt: skip
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.not_run) for b in blocks] == [
        ("bash", 2, None), ("python", 8, "needs a GPU"), ("toml", 11, None),
    ]  # fmt: skip
    assert blocks[0].code == "echo 1\n"
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("```bash\necho")


def copy_checkout(dest: Path) -> None:
    """This checkout as a user's clone has it: the files git tracks and the untracked ones it
    does not ignore (or, outside git, the tree less caches, builds and demo folders)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=COPY_IGNORE)
        return
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # skips files deleted but not yet staged
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_every_block_runs_as_pasted(tmp_path: Path) -> None:
    checkout = tmp_path / "bnscope"
    checkout.mkdir()
    copy_checkout(checkout)
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        # and, where torchvision needs it, its operator schemas (lightning imports it)
        PYTHONPATH=os.pathsep.join([str(checkout), *subprocess_path()]),
        MPLBACKEND="Agg",
        COLUMNS="120",
        PYTHONDONTWRITEBYTECODE="1",
    )
    state = tmp_path / "cwd"
    cwd = checkout
    skipped = []
    for block in BLOCKS:
        if block.lang not in RUN:
            continue
        if block.not_run is not None:
            skipped.append(f"{block.where()}: {block.not_run}")
            continue
        if block.lang == "bash":
            save_cwd = f"printf '%s' \"$PWD\" > {shlex.quote(str(state))}"
            cmd, stdin = ["bash", "-c", f"set -e -o pipefail\n{block.code}\n{save_cwd}\n"], None
        else:
            cmd, stdin = [sys.executable, "-"], block.code
        started = time.monotonic()
        try:
            res = subprocess.run(
                cmd, cwd=cwd, env=env, input=stdin, text=True, capture_output=True,
                timeout=BLOCK_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where()} ran longer than {BLOCK_TIMEOUT_S} s:\n{block.code}")
        if res.returncode != 0:
            pytest.fail(
                f"{block.where()} failed (exit {res.returncode}) in {cwd}:\n{block.code}\n"
                f"--- stdout (end) ---\n{tail(res.stdout)}\n"
                f"--- stderr (end) ---\n{tail(res.stderr)}"
            )
        print(f"{block.where()}: {time.monotonic() - started:.1f} s")  # shown with -rA or -s
        if block.lang == "bash":
            cwd = Path(state.read_text())
    if skipped:
        warnings.warn(
            "README blocks not run:\n" + "\n".join(f"  {s}" for s in skipped),
            UserWarning,
            stacklevel=1,
        )

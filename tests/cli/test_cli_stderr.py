"""stderr: progress bars with a count and an eta when the data's length is known (a pulse
when it is not), only on a terminal; status, demo and warning lines never hard-wrapped, on a
terminal or redirected to a file or a pipe."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from bnscope.cli.runtime import Ui, new_progress, progress_bar

from ..clirun import run
from ..conftest import tiny_spec, trained_tiny

pytestmark = pytest.mark.timing  # tests/repeat.py reruns these

LONG = " ".join(["a status line that is much longer than eighty columns"] * 3)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def render_progress(progress) -> str:
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(progress.get_renderable())
    return out.getvalue()


def test_progress_shows_count_and_eta_when_the_total_is_known():
    clock = [0.0]
    progress = new_progress(Console(file=io.StringIO()), get_time=lambda: clock[0])
    known = progress.add_task("collecting statistics", total=None)
    for done in range(1, 11):
        clock[0] = float(done)  # one batch a second: 40 left, 40 s
        progress.update(known, completed=done, total=50)
    unknown = progress.add_task("inspecting", total=None)
    progress.update(unknown, completed=7, total=None)
    lines = render_progress(progress).splitlines()
    assert "10/50" in lines[0] and "0:00:10" in lines[0] and "eta 0:00:40" in lines[0]
    assert "7/?" in lines[1] and "eta" not in lines[1]  # pulses: no total, no eta


def test_progress_bar_on_a_terminal_takes_the_callbacks_total(monkeypatch):
    tty = FakeTty()
    monkeypatch.setattr(sys, "stderr", tty)
    ui = Ui(err=Console(file=tty, force_terminal=True, width=100, color_system=None))
    with progress_bar(ui, "collecting statistics", None) as update:
        assert update is not None
        for done in (1, 2, 3):
            update(done, 3)
    assert "3/3" in tty.getvalue()  # the final state is drawn once before it is cleared


def test_no_progress_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    for ui in (Ui(), Ui(quiet=True), Ui(json=True)):
        with progress_bar(ui, "collecting statistics", 10) as update:
            assert update is None
    monkeypatch.setattr(sys, "stderr", FakeTty())
    for ui in (Ui(quiet=True), Ui(json=True)):
        with progress_bar(ui, "collecting statistics", 10) as update:
            assert update is None


def test_stderr_lines_are_never_wrapped(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    redirected = io.StringIO()  # a file: rich would wrap at 80 columns
    ui = Ui(err=Console(file=redirected, highlight=False))
    ui.line(LONG)
    ui.warn(LONG)
    monkeypatch.setattr(sys, "stderr", FakeTty())
    ui.info(LONG)  # a status line on a terminal of 80 columns: the terminal wraps it
    lines = redirected.getvalue().splitlines()
    assert lines == [LONG, f"bnscope: warning: {LONG}", LONG]


def test_demo_lines_are_not_wrapped_when_redirected(tmp_path, monkeypatch):
    import bnscope.demo.walkthrough as walkthrough
    from bnscope.errors import DataError

    def fake_walkthrough(folder, *, say, **_):
        say(LONG)
        raise DataError("stopped by the test", "nothing to do")

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(walkthrough, "run_walkthrough", fake_walkthrough)
    res = run("demo", tmp_path / "demo", "--device", "cpu")
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert lines[0] == f"[demo] {LONG}" and lines[1].startswith("bnscope: error:")


@pytest.fixture
def short_last_batch(tmp_path):
    """A checkpoint and 91 samples: batches of 10 leave a last batch of 1, which is left out
    with a warning much longer than 80 columns."""
    torch.save(trained_tiny(steps=5).state_dict(), tmp_path / "ck.pt")
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(91, 3, 8, 8, generator=g), "y": torch.randint(0, 3, (91,))}
    torch.save(data, tmp_path / "d.pt")
    args = [sys.executable, "-m", "bnscope", "precise", str(tmp_path / "ck.pt"), "--model",
            tiny_spec(), "--data", str(tmp_path / "d.pt"), "--batch-size", "10", "-o",
            str(tmp_path / "out.pt")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return args, env


def test_warning_is_one_line_through_a_pipe(short_last_batch):
    args, env = short_last_batch
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnscope: warning: --data: left out"), lines
    assert len(lines[0]) > 100 and lines[0].endswith(")")  # whole, never wrapped at 80
    assert "━" not in proc.stderr  # no progress bar off a terminal


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
def test_progress_on_a_terminal_counts_the_datas_batches(short_last_batch):
    args, env = short_last_batch
    main, secondary = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=secondary, env={**env, "TERM": "xterm"})  # fmt: skip
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "9/9" in text  # 90 samples in batches of 10: the total without --batches
    assert "collecting statistics" in text and "Precise BN" in stdout.decode()

"""Interrupted or failing runs write nothing: no output checkpoint, no temporary file, the input
unchanged (docs/cli.md, section 11: temporary file, then rename).

- Ctrl-C (a real SIGINT to ``python -m bnscope``) while ``precise``/``adapt`` read the data, and
  a data factory that raises ``KeyboardInterrupt`` itself: exit 130, one line, nothing written.
- A data factory that raises ``RuntimeError`` after two batches: exit 2, one line, nothing.
- :func:`bnscope.io.saving.save_checkpoint` when the disk fills up (or the rename or fsync
  fails, or Ctrl-C arrives) in the middle of writing: a one-line error naming the cause, no
  target, no temporary file; the same through the CLI.
- An output folder that cannot be written to, through the CLI: exit 2, one line.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bnscope.io.outputs as outputs_mod
import bnscope.io.saving as saving_mod
from bnscope.cli import app
from bnscope.errors import BnscopeError, CheckpointError
from bnscope.io.checkpoint import load_checkpoint
from bnscope.io.outputs import save_figure, write_text
from bnscope.io.saving import save_checkpoint

from ..conftest import sha256, tiny_spec, trained_tiny

pytestmark = pytest.mark.timing  # tests/repeat.py reruns these

runner = CliRunner()
TAGS = {"precise": "precise", "adapt": "adapted"}

FACTORIES = """
import os
import time

import torch

MARKER = {marker!r}


def _batch(batch_size, i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(batch_size, 3, 8, 8, generator=g) * 2 + 1


def slow(batch_size=4):
    \"\"\"Endless slow batches; the marker appears once collection is under way.\"\"\"
    def batches():
        for i in range(100_000):
            if i == 2:
                with open(MARKER, "w") as fh:
                    fh.write("started")
            yield _batch(batch_size, i)
            time.sleep(0.02)

    return batches()


def interrupt_after_two(batch_size=4):
    def batches():
        for i in range(6):
            if i == 2:
                raise KeyboardInterrupt
            yield _batch(batch_size, i)

    return batches()


class _Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        if i == 9:
            raise ValueError(f"sample {{i}} is corrupt")
        return _batch(1, i)[0]


def worker_fails(batch_size=4):
    return torch.utils.data.DataLoader(_Samples(), batch_size=batch_size, num_workers=1)


def fail_after_two(batch_size=4):
    def batches():
        for i in range(6):
            if i == 2:
                raise RuntimeError("the data server went away")
            yield _batch(batch_size, i)

    return batches()
"""


@pytest.fixture
def env(tmp_path: Path):
    """``run/`` holds only the input checkpoint (outputs go there); ``code/`` the factories;
    the marker file lands in ``flags/``."""
    run_dir, code, flags = tmp_path / "run", tmp_path / "code", tmp_path / "flags"
    for folder in (run_dir, code, flags):
        folder.mkdir()
    ckpt = run_dir / "ck.pt"
    sd = trained_tiny(steps=5).state_dict()
    torch.save({"model": sd, "epoch": 3}, ckpt)
    marker = flags / "started"
    (code / "factories.py").write_text(FACTORIES.format(marker=str(marker)))
    return run_dir, ckpt, code / "factories.py", marker


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_one_line(stderr: str, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bnscope: error: "), lines[0]
    assert fragment in lines[0], lines[0]


def assert_interrupted(code: int, stderr: str) -> None:
    """Exit 130, no traceback, one line: "interrupted; nothing was written"."""
    assert code == 130, (code, stderr)
    assert_one_line(stderr, "interrupted")


def assert_nothing_written(run_dir: Path, ckpt: Path, digest: str) -> None:
    assert listing(run_dir) == ["ck.pt"]  # no output checkpoint, no temporary file
    assert sha256(ckpt) == digest


def cli_args(command: str, ckpt: Path, data: str) -> list[str]:
    return [command, str(ckpt), "--model", tiny_spec(), "--data", data, "--batch-size", "4"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "160"}
    return subprocess.Popen(
        [sys.executable, "-m", "bnscope", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"bnscope did not exit within {timeout} s: {err}")
    return proc.returncode, out, err


# --------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_sigint_while_collecting(env, command):
    run_dir, ckpt, factories, marker = env
    digest = sha256(ckpt)
    proc = start(cli_args(command, ckpt, f"{factories}:slow"), run_dir)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"bnscope exited before collecting: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the data factory never started")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert_interrupted(code, err)
    assert out == ""
    assert_nothing_written(run_dir, ckpt, digest)


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_keyboard_interrupt_from_the_data(env, command):
    """The same contract in a real process, the interrupt raised inside the data factory."""
    run_dir, ckpt, factories, _ = env
    digest = sha256(ckpt)
    proc = start(cli_args(command, ckpt, f"{factories}:interrupt_after_two"), run_dir)
    code, out, err = finish(proc)
    assert_interrupted(code, err)
    assert out == ""
    assert_nothing_written(run_dir, ckpt, digest)


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_keyboard_interrupt_while_writing(env, command, monkeypatch):
    """Ctrl-C arriving after part of the checkpoint is on disk: the temporary file goes."""
    run_dir, ckpt, _, _ = env
    digest = sha256(ckpt)
    data = run_dir.parent / "data.pt"
    torch.save(torch.randn(12, 3, 8, 8), data)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, cli_args(command, ckpt, str(data)))
    assert_interrupted(res.exit_code, res.stderr)
    assert_nothing_written(run_dir, ckpt, digest)


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_interrupt_is_reported_in_one_line(env, command, monkeypatch):
    run_dir, ckpt, factories, _ = env
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, cli_args(command, ckpt, f"{factories}:interrupt_after_two"))
    assert res.exit_code == 130
    assert_one_line(res.stderr, "interrupted")


# --------------------------------------------------------------------------------------------
# An error in the middle of the data


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_data_error_midway(env, command, monkeypatch):
    run_dir, ckpt, factories, _ = env
    digest = sha256(ckpt)
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, cli_args(command, ckpt, f"{factories}:fail_after_two"))
    assert res.exit_code == 2, (res.exception, res.stderr)
    assert_one_line(res.stderr, "raised RuntimeError: the data server went away")
    assert "batch 2" in res.stderr
    assert res.stdout == ""
    assert_nothing_written(run_dir, ckpt, digest)


def test_data_error_in_a_dataloader_worker(env, monkeypatch):
    """A factory's DataLoader whose worker raises: the worker's own line, not its traceback."""
    run_dir, ckpt, factories, _ = env
    digest = sha256(ckpt)
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, cli_args("precise", ckpt, f"{factories}:worker_fails"))
    assert res.exit_code == 2, (res.exception, res.stderr)
    assert_one_line(res.stderr, "raised ValueError: sample 9 is corrupt while producing batch 2")
    assert_nothing_written(run_dir, ckpt, digest)


def test_data_error_midway_in_a_real_process(env):
    run_dir, ckpt, factories, _ = env
    digest = sha256(ckpt)
    proc = start(cli_args("precise", ckpt, f"{factories}:fail_after_two"), run_dir)
    code, out, err = finish(proc)
    assert code == 2, (code, err)
    assert_one_line(err, "the data server went away")
    assert out == ""
    assert_nothing_written(run_dir, ckpt, digest)


# --------------------------------------------------------------------------------------------
# Atomic save


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 4096)  # part of the archive reached the disk
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def _updates(ckpt) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in ckpt.state_dict.items() if "running_mean" in k}


@pytest.mark.parametrize("stage", ["write", "fsync", "rename"])
def test_save_checkpoint_disk_full(env, stage, monkeypatch):
    run_dir, ckpt_path, _, _ = env
    digest = sha256(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    target = run_dir / "out.pt"
    if stage == "write":
        monkeypatch.setattr(torch, "save", disk_full_save)
    elif stage == "fsync":
        monkeypatch.setattr(saving_mod.os, "fsync", enospc)
    else:
        monkeypatch.setattr(saving_mod.os, "replace", enospc)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(ckpt, _updates(ckpt), target)
    line = info.value.line()
    assert "\n" not in line
    assert str(target) in line and "No space left on device" in line
    assert "free space" in line  # what to do
    monkeypatch.undo()
    assert_nothing_written(run_dir, ckpt_path, digest)


def test_save_checkpoint_safetensors_disk_full(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    src = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_tiny(steps=2).state_dict().items()}, src)
    digest = sha256(src)
    ckpt = load_checkpoint(src)
    monkeypatch.setattr(saving_mod.os, "fsync", enospc)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(ckpt, _updates(ckpt), tmp_path / "w.out.safetensors")
    monkeypatch.undo()
    assert listing(tmp_path) == ["w.safetensors"]
    assert sha256(src) == digest


def test_save_checkpoint_interrupted_mid_write(env, monkeypatch):
    run_dir, ckpt_path, _, _ = env
    ckpt = load_checkpoint(ckpt_path)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, _updates(ckpt), run_dir / "out.pt")
    assert listing(run_dir) == ["ck.pt"]


def test_save_checkpoint_keeps_an_existing_target_on_failure(env, monkeypatch):
    """With --force the old file stays intact until the new one is complete."""
    run_dir, ckpt_path, _, _ = env
    ckpt = load_checkpoint(ckpt_path)
    target = run_dir / "out.pt"
    target.write_bytes(b"the previous result")
    monkeypatch.setattr(torch, "save", disk_full_save)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(ckpt, _updates(ckpt), target, force=True)
    assert target.read_bytes() == b"the previous result"
    assert listing(run_dir) == ["ck.pt", "out.pt"]


@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_cli_disk_full(env, command, monkeypatch):
    run_dir, ckpt, _, _ = env
    digest = sha256(ckpt)
    data = run_dir.parent / "data.pt"
    torch.save(torch.randn(12, 3, 8, 8), data)
    monkeypatch.setattr(torch, "save", disk_full_save)
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, cli_args(command, ckpt, str(data)))
    assert res.exit_code == 2, (res.exception, res.stderr)
    assert_one_line(res.stderr, "No space left on device")
    assert f"ck.{TAGS[command]}.pt" in res.stderr
    assert res.stdout == ""
    assert_nothing_written(run_dir, ckpt, digest)


def test_report_files_disk_full(tmp_path, monkeypatch):
    """Files written one by one (outputs.write_text / save_figure) are atomic too."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(BnscopeError, match="No space left on device"):
        write_text(tmp_path / "report.json", "{}")
    fig = Figure()
    fig.add_subplot().plot([1, 2])
    with pytest.raises(BnscopeError, match="No space left on device"):
        save_figure(fig, tmp_path / "plot.png")
    monkeypatch.undo()
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Unwritable output folder


@pytest.mark.parametrize("command", ["precise", "adapt"])
@pytest.mark.parametrize("how", ["under-a-file", "chmod", "permission-denied"])
def test_cli_unwritable_output_folder(env, command, how, monkeypatch):
    run_dir, ckpt, _, _ = env
    data = run_dir.parent / "data.pt"
    torch.save(torch.randn(12, 3, 8, 8), data)
    if how == "under-a-file":
        (run_dir / "afile.txt").write_text("x")
        target, fragment = run_dir / "afile.txt" / "out.pt", "afile.txt"
    elif how == "chmod":
        folder = run_dir / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):
            pytest.skip("permissions are not enforced here (root); see permission-denied")
        target, fragment = folder / "out.pt", "Permission denied"
    else:  # what creating the temporary file does in a folder without write permission

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

        (run_dir / "ro").mkdir()
        monkeypatch.setattr(outputs_mod, "create_temp", denied)
        target, fragment = run_dir / "ro" / "out.pt", "Permission denied"
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    digest = sha256(ckpt)
    monkeypatch.chdir(run_dir)
    res = runner.invoke(app, [*cli_args(command, ckpt, str(data)), "-o", str(target)])
    assert res.exit_code == 2, (res.exception, res.stderr)
    assert_one_line(res.stderr, fragment)
    assert res.stdout == ""
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    assert sha256(ckpt) == digest

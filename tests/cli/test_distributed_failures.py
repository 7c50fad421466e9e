"""A rank that fails under ``torchrun --nproc-per-node 2`` ends every rank cleanly.

Each case runs real torchrun processes (gloo on 127.0.0.1) and plants one fault on one rank:
an exception in its data, in its model's forward or in the output step, a SIGKILL or a hang in
the middle of the collection, a Ctrl-C. What must hold, whatever the timing:

- the surviving ranks exit 2 (130 after Ctrl-C), or are stopped by torchrun itself with SIGTERM
  after it saw the faulty rank end (torchrun's call); never an abort (SIGABRT), a core or a
  traceback from bnscope;
- at most one ``bnscope: error:`` line, and exactly one when a rank's own error can be told
  (it names the rank, and what failed or which rank stopped answering);
- nothing on stdout, no output file, no temporary file.

The faults are placed at a fixed batch on a fixed rank, so each case is deterministic; every
case runs :data:`REPEATS` times in the suite to catch a race (``BNSCOPE_TEST_REPEATS`` sets
it; ``tests/repeat.py`` runs these tests many times over). This file is also the ``--model`` /
``--data`` spec of the runs, so it uses absolute imports.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cli.test_distributed_cli import (
    HERE as CLI_SPEC,
)
from tests.cli.test_distributed_cli import (
    ROOT,
    TwoBranch,
    error_lines,
    free_port,
    loopback_interface,
    make_samples,
)

pytestmark = pytest.mark.timing

HERE = Path(__file__).resolve()
REPEATS = int(os.environ.get("BNSCOPE_TEST_REPEATS", "2"))
#: BNSCOPE_DIST_TIMEOUT of the runs: long enough that a busy machine never times out a slow
#: rank, except in the hang case, where the others wait HANG_TIMEOUT_S for the hung rank
TIMEOUT_S = 60
HANG_TIMEOUT_S = 8
FAULT_BATCH = 3
BATCHES = 8
BATCH_SIZE = 8


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------------------------
# Specs the runs load (each fault at batch FAULT_BATCH of rank 1, or in rank 0's output step)


def _batches(rank: int, world_size: int, fault: str = "") -> Iterator[tuple]:
    x, y = make_samples(BATCHES * BATCH_SIZE * world_size)
    x, y = x[rank::world_size], y[rank::world_size]
    for i in range(BATCHES):
        if rank == 1 and i == FAULT_BATCH:
            if fault == "raise":
                raise RuntimeError("the data broke on rank 1")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(3600)
            if fault == "nan":
                x = x.clone()
                x[i * BATCH_SIZE + 2, 1, 4, 4] = float("nan")
        if fault == "ready" and i == FAULT_BATCH:
            Path(os.environ["BNSCOPE_TEST_READY"], f"rank{rank}").touch()
            time.sleep(3600)  # until Ctrl-C
        yield x[i * BATCH_SIZE : (i + 1) * BATCH_SIZE], y[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]


def data_ok(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size)


def data_raises(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size, "raise")


def data_killed(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size, "kill")


def data_hangs(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size, "hang")


def data_nan_on_rank_1(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size, "nan")


def data_waits_for_ctrl_c(rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    return _batches(rank, world_size, "ready")


class FailsOnRank1(TwoBranch):
    """Its forward raises at the FAULT_BATCH-th call on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if rank() == 1 and self.calls == FAULT_BATCH + 1:
            raise RuntimeError("the model broke on rank 1")
        return super().forward(x)


def model_fails_on_rank_1() -> TwoBranch:
    return FailsOnRank1()


def model_disk_full_on_rank_0() -> TwoBranch:
    """A plain model; on rank 0 the disk is full when the checkpoint is written (the output
    step, after every rank agreed that the collection succeeded)."""
    if rank() == 0:
        import bnscope.io.saving as saving

        def enospc(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        saving.os.fsync = enospc  # type: ignore[assignment]
    return TwoBranch()


# --------------------------------------------------------------------------------------------
# Running


def launch(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m bnscope ARGS`` in its own session (a process group
    that a test can signal as a terminal's Ctrl-C does)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "bnscope", *map(str, args),
    ]  # fmt: skip
    full = dict(os.environ)
    full.update(
        GLOO_SOCKET_IFNAME=loopback_interface(),
        BNSCOPE_DIST_TIMEOUT=str(TIMEOUT_S),
        OMP_NUM_THREADS="1",
        COLUMNS="160",
        PYTHONFAULTHANDLER="1",  # an abort would print "Fatal Python error"
        PYTHONPATH=os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]),
    )
    full.update(env or {})
    return subprocess.Popen(
        cmd, cwd=cwd, env=full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s:\n{err}")


def worker_exits(stderr: str) -> dict[int, str]:
    """Each worker's end as torchrun's summary gives it: rank -> ``2``, ``-15`` ... (ranks
    that ended with 0 are not listed)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                       stderr)  # fmt: skip
    return {int(r): code for r, code in found}


def check_clean(
    proc: subprocess.Popen, out: str, err: str, tmp: Path, allowed: set[str] | None
) -> None:
    """The contract every case shares (see the module docstring); ``allowed``: the exit
    codes torchrun's summary may list for the workers (None: it prints none)."""
    assert proc.returncode != 0, err
    assert out == ""
    assert "Fatal Python error" not in err and "terminate called" not in err, err
    assert "SIGABRT" not in err and "core dumped" not in err, err
    assert f'File "{ROOT / "bnscope"}' not in err, err  # no traceback from a rank
    if allowed is not None:
        exits = worker_exits(err)
        assert exits and set(exits.values()) <= allowed, (exits, err)
    assert sorted(p.name for p in tmp.iterdir()) == ["ck.pt"], err


def assert_first_exit_is_2(err: str) -> None:
    """After a rank's own error, every rank agreed to stop and leaves with 2 at once: the first
    rank to end always ends with 2 (torchrun's root cause); a rank still on its way out when
    torchrun saw that may get torchrun's SIGTERM instead (its call), never anything else."""
    exits = worker_exits(err)
    assert set(exits.values()) <= {"2", "-15"} and "2" in exits.values(), err
    root = err.split("Root Cause", 1)[1]
    assert re.search(r"exitcode\s*:\s*2 ", root), err


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = TwoBranch()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path


def precise(ckpt: Path, model: str, data: str, *extra: object) -> list[object]:
    return ["precise", ckpt, "--model", f"{HERE}:{model}", "--data", f"{HERE}:{data}",
            "-o", ckpt.parent / "out.pt", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------
# An error raised on one rank: that rank's line, exit 2 from every rank


RAISED = {
    "data": ("TwoBranch_spec", "data_raises", "the data broke on rank 1",
             "bnscope: error: rank 1 of 2: data factory "),
    "model": ("model_fails_on_rank_1", "data_ok", "the model broke on rank 1",
              "bnscope: error: rank 1 of 2: the model failed on batch 3"),
    "output": ("model_disk_full_on_rank_0", "data_ok", "No space left on device",
               "bnscope: error: rank 0 of 2: "),
}  # fmt: skip


def TwoBranch_spec() -> TwoBranch:  # noqa: N802 - named as the model class it returns
    return TwoBranch()


@pytest.mark.parametrize("run", range(REPEATS))
@pytest.mark.parametrize("where", sorted(RAISED))
def test_an_error_on_one_rank_ends_every_rank_with_2(ckpt, where, run):
    model, data, cause, start = RAISED[where]
    proc = launch(*precise(ckpt, model, data, "--report-dir", ckpt.parent / "rep"),
                  cwd=ckpt.parent)  # fmt: skip
    out, err = finish(proc)
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(start), lines[0]
    assert cause in lines[0]
    check_clean(proc, out, err, ckpt.parent, allowed={"2", "-15"})
    assert_first_exit_is_2(err)


# --------------------------------------------------------------------------------------------
# A rank that is gone or silent: the others name it


@pytest.mark.parametrize("run", range(REPEATS))
def test_a_rank_killed_mid_collection(ckpt, run):
    """Rank 1 is SIGKILLed at its 4th batch. Rank 0 finds its connection closed at the end of
    its collection and says so (exit 2), unless torchrun, having seen rank 1 die, stops it
    first with SIGTERM: then there is no line at all."""
    proc = launch(*precise(ckpt, "TwoBranch_spec", "data_killed"), cwd=ckpt.parent)
    out, err = finish(proc)
    exits = worker_exits(err)
    assert exits[1] == "-9", err
    lines = error_lines(err)
    if exits.get(0) == "2":
        assert lines == [
            "bnscope: error: rank 0 of 2: rank 1 stopped answering: its connection closed (the "
            "process exited or was killed); check the output of rank 1 and torchrun's summary "
            "(a signal, or the system running out of memory)"
        ], err
    else:
        assert exits.get(0) == "-15" and lines == [], err
    check_clean(proc, out, err, ckpt.parent, allowed={"2", "-9", "-15"})


@pytest.mark.parametrize("run", range(REPEATS))
def test_a_rank_that_hangs_is_named_after_the_timeout(ckpt, run):
    """Rank 1 hangs in its data; rank 0 waits BNSCOPE_DIST_TIMEOUT seconds at the end of its
    collection, then says which rank stopped answering and exits 2; torchrun then stops the
    hung rank (SIGTERM)."""
    proc = launch(*precise(ckpt, "TwoBranch_spec", "data_hangs"), cwd=ckpt.parent,
                  env={"BNSCOPE_DIST_TIMEOUT": str(HANG_TIMEOUT_S)})  # fmt: skip
    out, err = finish(proc)
    assert error_lines(err) == [
        f"bnscope: error: rank 0 of 2: rank 1 stopped answering: no reply within "
        f"{HANG_TIMEOUT_S} s; check the output of rank 1: it may hang in its data or model; if "
        "it is only slow, raise BNSCOPE_DIST_TIMEOUT (seconds)"
    ], err
    assert worker_exits(err) == {0: "2", 1: "-15"}, err
    check_clean(proc, out, err, ckpt.parent, allowed={"2", "-15"})


# --------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("run", range(REPEATS))
def test_ctrl_c_ends_every_rank_with_130(ckpt, tmp_path_factory, run):
    """Ctrl-C at a terminal signals the whole foreground process group: torchrun and both
    workers. Both are in the middle of their data (each has touched its marker): one
    "interrupted" line from rank 0, nothing written. torchrun then forwards SIGINT to the
    workers, raises its own SignalException (its traceback, not ours) and prints no summary
    of the workers' exit codes."""
    ready = tmp_path_factory.mktemp("ready")
    proc = launch(*precise(ckpt, "TwoBranch_spec", "data_waits_for_ctrl_c"), cwd=ckpt.parent,
                  env={"BNSCOPE_TEST_READY": str(ready)})  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(ready.iterdir())) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the workers never reached their data: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert error_lines(err) == ["bnscope: error: interrupted; nothing was written"], err
    check_clean(proc, out, err, ckpt.parent, allowed=None)
    assert "SignalException" in err and worker_exits(err) == {}, err


# --------------------------------------------------------------------------------------------
# Bad data in the middle of the run: the rank that meets it names it; every rank exits 2

N_IMAGES = 1000
BAD_IMAGE = 900  # 1-based, in name order: sample 899, in rank 1's share (samples 1, 3, 5...)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folders of 1,000 8x8 PNGs in two classes: in ``cut/`` image 900 is cut in half, in
    ``size/`` it is 10x12."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(N_IMAGES, 8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    for name in ("cut", "size"):
        for i in range(N_IMAGES):
            folder = root / name / ("a" if i < N_IMAGES // 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i])
            if name == "size" and i == BAD_IMAGE - 1:
                image = image.resize((10, 12))
            image.save(folder / f"{i:04d}.png")
    bad = root / "cut" / "b" / f"{BAD_IMAGE - 1:04d}.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root


def bad_image_line(folders: Path, kind: str) -> str:
    path = folders / kind / "b" / f"{BAD_IMAGE - 1:04d}.png"
    if kind == "cut":
        return (
            f"bnscope: error: rank 1 of 2: image {BAD_IMAGE} of {N_IMAGES} cannot be read: {path}"
        )
    return (
        f"bnscope: error: rank 1 of 2: image {BAD_IMAGE} of {N_IMAGES} has a different size: {path}"
    )


@pytest.mark.parametrize("run", range(REPEATS))
@pytest.mark.parametrize("kind", ["cut", "size"])
def test_a_bad_image_late_in_the_folder(ckpt, folders, kind, run):
    """Image 900 of 1,000 (rank 1's share): rank 1 names it, rank 0 stops too, both exit 2."""
    proc = launch("precise", ckpt, "--model", f"{HERE}:TwoBranch_spec", "--data",
                  folders / kind, "--batch-size", "10", "-o", ckpt.parent / "out.pt",
                  cwd=ckpt.parent)  # fmt: skip
    out, err = finish(proc)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(bad_image_line(folders, kind)), err
    check_clean(proc, out, err, ckpt.parent, allowed={"2", "-15"})
    assert_first_exit_is_2(err)


@pytest.mark.parametrize("run", range(REPEATS))
def test_a_nan_batch_on_one_rank(ckpt, run):
    proc = launch(*precise(ckpt, "TwoBranch_spec", "data_nan_on_rank_1"), cwd=ckpt.parent)
    out, err = finish(proc)
    assert error_lines(err) == [
        f"bnscope: error: rank 1 of 2: NaN or Inf reached BN layer bn_a in batch {FAULT_BATCH}; "
        "check the data and the checkpoint (bnscope inspect CKPT)"
    ], err
    check_clean(proc, out, err, ckpt.parent, allowed={"2", "-15"})
    assert_first_exit_is_2(err)


def test_the_specs_run_in_one_process(ckpt):
    """The specs themselves: without faults the data gives BATCHES batches and the model
    runs (so every failure above comes from the planted fault)."""
    batches = list(data_ok())
    assert len(batches) == BATCHES and batches[0][0].shape == (BATCH_SIZE, 3, 8, 8)
    assert model_fails_on_rank_1()(batches[0][0]).shape == (BATCH_SIZE, 3)
    assert CLI_SPEC.exists()
    nan = list(data_nan_on_rank_1(rank=1, world_size=2))
    assert [bool(b[0].isnan().any()) for b in nan] == [i == FAULT_BATCH for i in range(BATCHES)]

"""Run a function on 2 gloo processes on 127.0.0.1 and collect what each rank returned.

``spawn_ranks(cases, folder)`` starts ``world`` processes (spawn), each joining a gloo group
through a file store, calling ``cases(rank)`` and saving its result; every wait is bounded (the
process-group timeout, a join deadline). A worker ends with ``os._exit(0)``, as bnscope's CLI
ends a torchrun worker: not through the interpreter's teardown, where gloo's threads can abort
the process once its peer is gone. ``cases`` must be a module-level function (spawn pickles
it by reference).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _worker(rank: int, cases: Callable[[int], Any], world: int, out: str, timeout: float) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout),
    )  # fmt: skip
    try:
        res = cases(rank)
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(res, Path(out) / f"rank{rank}.pt")
    os._exit(0)


def spawn_ranks(
    cases: Callable[[int], Any],
    out: Path,
    world: int = 2,
    timeout_s: float = 30,
    deadline_s: float = 120,
) -> list[Any]:
    """``[cases(0), cases(1), ...]`` as computed by ``world`` gloo processes; a worker's
    exception fails the test with its traceback."""
    ctx = mp.start_processes(
        _worker, args=(cases, world, str(out), timeout_s), nprocs=world, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    errors = [f.read_text() for f in out.glob("error*.txt")]
    assert not errors, errors
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]

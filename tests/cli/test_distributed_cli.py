"""The CLI under `torchrun --nproc-per-node 2` (gloo on 127.0.0.1): one result, one error line.

This file is also a ``--model``/``--data`` spec for the runs (``tests/cli/test_distributed_cli.py:
make_two_branch``), so it uses absolute imports only. The models' BN layers see per-sample
functions of the input, so their population statistics do not depend on how the data is split
into batches or ranks: the 2-rank checkpoint must equal the single-process one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.timing  # tests/repeat.py reruns these

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]  # the repository
TIMEOUT_S = 120


class TwoBranch(nn.Module):
    """Two convolutions of the input, each followed by its own BN (or SyncBatchNorm)."""

    def __init__(self, sync: bool = False) -> None:
        super().__init__()
        norm = nn.SyncBatchNorm if sync else nn.BatchNorm2d
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = norm(4)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.bn_b = norm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_a(self.a(x))) + torch.relu(self.bn_b(self.b(x)))
        return self.fc(h.mean((2, 3)))


def make_two_branch(sync: bool = False) -> nn.Module:
    return TwoBranch(sync)


def make_samples(n: int = 91, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def failing_data(rank: int = 0, world_size: int = 1, batch_size: int = 32):
    """A data factory that fails on rank 1 only."""
    if rank == 1:
        raise RuntimeError("no data on rank 1")
    x, y = make_samples()
    ds = torch.utils.data.TensorDataset(x[rank::world_size], y[rank::world_size])
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def eval_data_bad_on_rank_1(batch_size: int = 32):
    """Evaluation batches (not sharded) that do not fit the model on rank 1 only."""
    x, y = make_samples(16)
    if os.environ.get("RANK") == "1":
        x = torch.randn(16, 5, 8, 8)
    return [(x, y)]


# --------------------------------------------------------------------------------------------
# Running


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: object, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --nproc-per-node 2 -m bnscope ARGS`` on 127.0.0.1, bounded in time."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "bnscope", *map(str, args),
    ]  # fmt: skip
    env = dict(os.environ)
    env.update(
        GLOO_SOCKET_IFNAME=loopback_interface(),
        BNSCOPE_DIST_TIMEOUT="30",
        OMP_NUM_THREADS="1",
        COLUMNS="160",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    t0 = time.monotonic()
    res = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    return res, time.monotonic() - t0


def check_document(doc: dict) -> None:
    """The document validates against its JSON Schema (imported here: this file is also
    loaded as a model spec, outside the tests package)."""
    from ..schemacheck import check_document as check

    check(doc)


def single(*args: object, cwd: Path):
    """The same command in this process (no process group)."""
    from typer.testing import CliRunner

    from bnscope.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        os.chdir(old)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "bnscope: error:" in line]


def bn_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


@pytest.fixture
def env(tmp_path):
    torch.manual_seed(1)
    model = make_two_branch()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, ckpt)
    x, y = make_samples()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    return tmp_path, ckpt


# --------------------------------------------------------------------------------------------
# Tests


def test_precise_under_torchrun_equals_single_process(env):
    tmp, ckpt = env
    common = ["precise", ckpt, "--model", f"{HERE}:make_two_branch", "--data", tmp / "d.pt",
              "--eval-data", tmp / "d.pt", "--batch-size", "16", "--json"]  # fmt: skip
    ref = single(*common, "-o", tmp / "one.pt", cwd=tmp)
    assert ref.exit_code == 0, ref.stderr
    res, _ = torchrun(*common, "-o", tmp / "two.pt", cwd=tmp)
    assert res.returncode == 0, res.stderr

    doc, want = json.loads(res.stdout), json.loads(ref.stdout)  # exactly one document
    assert error_lines(res.stderr) == []
    assert doc["world_size"] == 2 and "world_size" not in want
    assert doc["samples"] == want["samples"] == 91
    assert doc["batches"] == want["batches"] == 6  # 46 + 45 samples in batches of 16
    assert doc["output"] == str(tmp / "two.pt")
    for got, exp in zip(doc["layers"], want["layers"], strict=True):
        assert (got["name"], got["calls"], got["samples"]) == (exp["name"], exp["calls"], 91)
        assert got["d_mu_max"] == pytest.approx(exp["d_mu_max"], rel=1e-5)
    for name, exp in want["metrics"]["variants"].items():
        got = doc["metrics"]["variants"][name]
        assert (got["accuracy"], got["agreement"]) == (exp["accuracy"], exp["agreement"]), name
    check_document(doc)  # world_size: only under torchrun

    one = torch.load(tmp / "one.pt", weights_only=True)
    two = torch.load(tmp / "two.pt", weights_only=True)
    assert two.keys() == one.keys() and two["epoch"] == 3
    assert list(two["model"]) == list(one["model"])
    changed = bn_keys(two["model"])
    assert len(changed) == 4
    for k, v in one["model"].items():
        if k in changed:
            torch.testing.assert_close(two["model"][k], v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(two["model"][k], v), k
    # exactly one checkpoint written, no temporary files
    assert sorted(p.name for p in tmp.iterdir()) == ["ck.pt", "d.pt", "one.pt", "two.pt"]


def test_adapt_syncbatchnorm_whole_module_under_torchrun(tmp_path):
    """A pickled whole module with SyncBatchNorm: runs on CPU under gloo (collection and
    batch-statistics evaluation) and is written back as SyncBatchNorm."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    torch.save(model, tmp_path / "m.pt")
    x, y = make_samples(60, seed=4)
    torch.save({"x": x * 0.5 - 2, "y": y}, tmp_path / "t.pt")
    common = ["adapt", "m.pt", "--trust-checkpoint", "--data", "t.pt", "--eval-data", "t.pt",
              "--prior", "16", "--batch-size", "8", "--json"]  # fmt: skip
    ref = single(*common, "-o", "one.pt", cwd=tmp_path)
    assert ref.exit_code == 0, ref.stderr
    res, _ = torchrun(*common, "-o", "two.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc, want = json.loads(res.stdout), json.loads(ref.stdout)
    assert doc["samples"] == want["samples"] == 60
    assert doc["layers"][0]["weight_source"] == pytest.approx(16 / 76)
    for variant, metrics in want["metrics"]["variants"].items():
        assert doc["metrics"]["variants"][variant] == pytest.approx(metrics, rel=1e-5), variant
    check_document(doc)

    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert type(two[1]) is nn.SyncBatchNorm and "forward" not in two[1].__dict__
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(two[1], name), getattr(one[1], name), rtol=1e-6,
                                   atol=1e-7)  # fmt: skip
    assert not torch.equal(two[1].running_mean, model[1].running_mean)


def test_a_failing_rank_fails_the_command_with_one_line(env):
    tmp, ckpt = env
    res, _ = torchrun(
        "precise", ckpt, "--model", f"{HERE}:make_two_branch",
        "--data", f"{HERE}:failing_data", "-o", tmp / "out.pt", cwd=tmp,
    )  # fmt: skip
    assert res.returncode != 0
    lines = error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bnscope: error: rank 1 of 2: data factory")
    assert "RuntimeError: no data on rank 1" in lines[0]
    assert f'File "{ROOT / "bnscope"}' not in res.stderr  # no traceback from a rank
    # torchrun's summary: the first rank to exit did so with 2 (it then stops the other one)
    assert "exitcode  : 2" in res.stderr
    assert res.stdout == ""
    assert not (tmp / "out.pt").exists()



def test_a_rank_failing_after_collection_stops_the_writing(env):
    """Rank 1 fails in the evaluation, after the statistics were pooled: rank 0 learns it
    before writing, so nothing is written or printed but the one error line."""
    tmp, ckpt = env
    res, _ = torchrun(
        "precise", ckpt, "--model", f"{HERE}:make_two_branch", "--data", tmp / "d.pt",
        "--eval-data", f"{HERE}:eval_data_bad_on_rank_1", "-o", tmp / "out.pt", "--report-dir",
        tmp / "report", cwd=tmp,
    )  # fmt: skip
    assert res.returncode != 0
    lines = error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bnscope: error: rank 1 of 2: evaluation failed on batch 0")
    assert res.stdout == ""
    assert not (tmp / "out.pt").exists() and not (tmp / "report").exists()


def test_an_error_on_every_rank_is_shown_once(env):
    tmp, ckpt = env
    res, _ = torchrun("precise", ckpt, "--model", f"{HERE}:make_two_branch",
                      "--data", tmp / "missing.pt", cwd=tmp)  # fmt: skip
    assert res.returncode != 0
    assert error_lines(res.stderr) == [
        "bnscope: error: data not found: "
        f"{tmp / 'missing.pt'}; pass an image folder, a tensor file (.pt .pth .npy .npz), "
        "a folder of them, or pkg.module:factory"
    ], res.stderr
    assert res.stdout == ""


def test_batches_help_says_per_rank():
    from bnscope.cli import options

    help_text = options.Batches.__metadata__[0].help
    assert "per rank under torchrun" in help_text


def test_factory_sharding_is_read_from_the_signature():
    from bnscope.cli.runtime import begin_output, is_main_process
    from bnscope.engine.distributed import get_rank, get_world_size
    from bnscope.session import _factory_shards

    assert _factory_shards(f"{HERE}:failing_data")
    assert not _factory_shards(f"{HERE}:make_two_branch")
    assert begin_output() and is_main_process() and (get_rank(), get_world_size()) == (0, 1)


def test_ghost_and_inspect_under_torchrun(env):
    """One report from rank 0 covering both ranks' shards, --report-dir written once."""
    tmp, ckpt = env
    model = ["--model", f"{HERE}:make_two_branch", "--data", tmp / "d.pt", "--batch-size", "16"]
    res, _ = torchrun("ghost", ckpt, *model, "--sizes", "2,4,32", "--json", "--report-dir",
                      tmp / "g", cwd=tmp)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["samples"] == 91 and doc["metrics"]["has_labels"] is True
    check_document(doc)
    assert [r["status"] for r in doc["sizes"]] == ["ok", "ok", "skipped"]
    assert all(0 <= r["agreement"] <= 1 for r in doc["sizes"][:2])
    assert sorted(p.name for p in (tmp / "g").iterdir()) == [
        "ghost_noise.png", "nbs_curve.png", "report.json",
    ]  # fmt: skip
    res, _ = torchrun("inspect", ckpt, *model, "--json", cwd=tmp)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    ref = single("inspect", ckpt, *model, "--json", cwd=tmp)
    want = json.loads(ref.stdout)
    assert doc["metrics"]["samples"] == want["metrics"]["samples"] == 91
    check_document(doc)
    assert [x["batch_calls"] for x in doc["layers"]] == [6, 6]  # 46 + 45 samples by 16
    for got, exp in zip(doc["layers"], want["layers"], strict=True):
        assert got["d_mu_max"] == pytest.approx(exp["d_mu_max"], rel=1e-4)
    assert error_lines(res.stderr) == []

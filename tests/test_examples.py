"""The programs in examples/ run as their docstrings say, and do what they say.

Each runs in a subprocess, in a copy of the examples folder (they write their data and
checkpoints next to themselves), with this Python's ``bin`` folder first on ``PATH``
(``python``, ``bnscope``, ``torchrun``) and this checkout on ``PYTHONPATH``. ``torchrun`` runs
2 processes on the CPU (gloo over the loopback interface, a free port from ``--standalone``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from .reallibs import subprocess_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 600


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def run(cmd: list[str], cwd: Path, path: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(ROOT), *path, env.get("PYTHONPATH", "")]),
        GLOO_SOCKET_IFNAME=loopback_interface(),
        BNSCOPE_DIST_TIMEOUT="120",
        COLUMNS="120",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ (without data, checkpoints or caches a local run left there)."""
    copy = tmp_path / "examples"
    ignore = shutil.ignore_patterns("__pycache__", "data", "runs")
    shutil.copytree(EXAMPLES, copy, ignore=ignore)
    return copy


def test_train_and_fix(examples: Path) -> None:
    res = run([sys.executable, str(examples / "train_and_fix.py")], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("Stale running statistics"), res.stdout  # the inspect verdict
    assert "Precise BN: 32 batches, 1024 samples" in lines
    found = re.search(r"validation accuracy: ([\d.]+)% with the running statistics training "
                      r"left, ([\d.]+)% with Precise BN statistics", res.stdout)  # fmt: skip
    assert found, res.stdout
    before, after = float(found[1]), float(found[2])
    assert after > before + 1, (before, after)  # measured: 93.9% -> 98.8%
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing


def test_test_time_prior(examples: Path) -> None:
    res = run([sys.executable, str(examples / "test_time_prior.py")], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    found = re.search(r"source model: ([\d.]+)% on clean images, ([\d.]+)% shifted", out)
    assert found, out
    clean, shifted = float(found[1]), float(found[2])
    prior = {n: float(a) for n, a in re.findall(r"test-time prior N=(\w+): ([\d.]+)%", out)}
    assert list(prior) == ["0", "16", "64", "inf"], out
    # measured: 99.0% clean, 88.1% shifted; N=0 97.3%, N=16 98.6%, N=inf 88.1% (the source)
    assert clean > shifted + 5 and prior["inf"] == shifted
    assert prior["16"] > shifted + 5 and prior["0"] > shifted + 5
    assert "state dict unchanged by convert/revert: True" in out
    found = re.search(r"means only ([\d.]+)% \(mean, mean, mean\); first BN layer ([\d.]+)% "
                      r"\(mean\+var, -, -\); all statistics ([\d.]+)%", out)  # fmt: skip
    assert found, out
    assert float(found[3]) > shifted + 5  # measured: 98.4%
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing


def test_per_domain_bn(examples: Path) -> None:
    res = run([sys.executable, str(examples / "per_domain_bn.py")], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    out = res.stdout

    def accuracies(label: str) -> dict[str, float]:
        found = re.search(rf"^{label}: ([\d.]+)% dim, ([\d.]+)% glare$", out, re.M)
        assert found, out
        return {"dim": float(found[1]), "glare": float(found[2])}

    source = accuracies("source statistics")
    shared = accuracies("one set of statistics for both domains")
    per_domain = accuracies("a set of statistics per domain")
    # measured: source 27.3% / 80.5%, one set 27.3% / 96.5%, one per domain 85.4% / 99.2%
    assert per_domain["dim"] > max(source["dim"], shared["dim"]) + 20
    assert per_domain["glare"] >= shared["glare"] > source["glare"]
    layers = dict(re.findall(r"(\d+): ([\d.]+)", out.split("per BN layer: ")[1].splitlines()[0]))
    assert float(layers["1"]) > 10  # the first BN layer sees the two domains far apart
    assert "predicts as the per-domain models: True" in out
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing


def test_project(examples: Path) -> None:
    """``python prepare.py``, then ``bnscope precise --batches 100`` with nothing but the
    project file; one batch more than the data holds is refused before reading it."""
    project = examples / "project"
    res = run([sys.executable, "prepare.py"], cwd=project)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (project / "data").iterdir()) == ["train.pt", "val.pt"]
    res = run(["bnscope", "precise", "--batches", "100", "--json"], cwd=project)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["project_file"] == str(project / "bnscope.toml")
    assert (doc["batches"], doc["samples"]) == (100, 1600)
    assert doc["output"] == str(project / "runs" / "ckpt.precise.pt")
    assert (project / "runs" / "ckpt.precise.pt").is_file()
    variants = doc["metrics"]["variants"]
    assert variants["precise"]["accuracy"] > variants["running"]["accuracy"]  # 94.8% -> 99.0%
    res = run(["bnscope", "precise", "--batches", "101", "--force"], cwd=project)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("bnscope: error: --batches 101, but the data holds 100 batches")
    assert len(res.stderr.splitlines()) == 1


def test_torchrun_library(examples: Path) -> None:
    script = examples / "torchrun" / "precise_ddp.py"
    res = run(["torchrun", "--standalone", "--nproc-per-node", "2", str(script)], cwd=examples)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "2 ranks, 1000 samples in 32 batches",
        "statistics identical on every rank: True",
        "the same as one process on all the batches: True",
    ]


def test_torchrun_cli(examples: Path) -> None:
    """``bash examples/torchrun/precise_cli.sh``: prepares the project (once), then
    ``torchrun -m bnscope precise`` on 2 processes; rank 0 prints and writes."""
    res = run(["bash", "examples/torchrun/precise_cli.sh"], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    out = examples / "project" / "runs" / "ckpt.ddp.pt"
    assert out.is_file()
    assert res.stdout.count("Precise BN: 3 of 3 BN layers recomputed from 100 batches") == 1
    assert "(1600 samples)" in res.stdout and "Wrote runs/ckpt.ddp.pt" in res.stdout
    assert "bnscope: error" not in res.stderr


#: an epoch line of precise_bn_hook.py: epoch, accuracy with the running statistics and after
EPOCH_LINE = (
    r"epoch (\d): validation accuracy ([\d.]+)% with the running statistics, ([\d.]+)% after "
    r"Precise BN on 512 samples \(largest change of a mean: ([\d.]+) sigma\)"
)
EMA_LINE = (
    r"EMA weights: validation accuracy ([\d.]+)% with the statistics the copy was made with, "
    r"([\d.]+)% with Precise BN statistics of the averaged weights"
)


def test_precise_bn_hook(examples: Path) -> None:
    res = run([sys.executable, str(examples / "precise_bn_hook.py")], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    epochs = [re.fullmatch(EPOCH_LINE, line) for line in lines[:3]]
    assert all(epochs), res.stdout
    first = epochs[0]
    assert first is not None and float(first[3]) > float(first[2]) + 10  # measured: 36.5 -> 80.7
    ema = re.fullmatch(EMA_LINE, lines[3])
    assert ema, res.stdout
    assert float(ema[2]) > float(ema[1]) + 10  # measured: 70.3 -> 98.2
    assert lines[4] == "hook history: [(1, 512), (2, 512), (3, 512)]"
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")
def test_lightning_precise_bn(examples: Path) -> None:
    script = examples / "lightning_precise_bn.py"
    # lightning imports torchvision through torchmetrics: tests/reallibs.py
    res = run([sys.executable, str(script)], cwd=examples.parent, path=subprocess_path())
    assert res.returncode == 0, res.stderr
    found = re.findall(r"^epoch (\d): validation accuracy ([\d.]+)% with the running statistics "
                       r"training kept, ([\d.]+)% with PreciseBN$", res.stdout, re.M)  # fmt: skip
    assert [epoch for epoch, _, _ in found] == ["0", "1"], res.stdout
    before, after = float(found[-1][1]), float(found[-1][2])
    assert after > before + 5, (before, after)  # measured: 73.0% -> 97.3%
    assert "PreciseBN before the last validation: 32 batches, 1024 samples" in res.stdout
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing


def test_conversion_check(examples: Path) -> None:
    res = run([sys.executable, str(examples / "conversion_check.py")], cwd=examples.parent)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    found = re.search(r"accuracy: trained model ([\d.]+)%, converted checkpoint ([\d.]+)%", out)
    assert found, out
    trained, converted = float(found[1]), float(found[2])
    assert converted < trained - 10, (trained, converted)  # measured: 72.3% -> 45.0%
    assert "Converted checkpoint: running_var holds standard deviations in 2 of 2" in out
    assert "error var-convention: running_var holds standard deviations" in out
    assert "fix: bnscope precise" in out and "running_var = running_var ** 2" in out
    fixed = re.search(r"after running_var = running_var \*\* 2: accuracy ([\d.]+)%, "
                      r"var-convention findings: 0", out)  # fmt: skip
    assert fixed and abs(float(fixed[1]) - trained) <= 0.5, out  # the statistics are back
    assert sorted(p.name for p in examples.parent.iterdir()) == ["examples"]  # writes nothing

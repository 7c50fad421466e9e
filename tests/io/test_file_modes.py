"""Permissions of every file bnscope writes.

A new file gets ``0666`` less the umask and a new folder ``0777`` less the umask, as any
program's new files do (a temporary file from ``tempfile.mkstemp``/``mkdtemp`` would keep
``0600``/``0700`` after the rename); a file that is replaced keeps its permissions. Checked
under umask 022 (files 0644) and 077 (files 0600).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from matplotlib.figure import Figure
from PIL import Image

from bnscope.demo.run import build_demo
from bnscope.io.checkpoint import load_checkpoint
from bnscope.io.outputs import atomic_path, save_figure, write_report_dir, write_text
from bnscope.io.saving import save_checkpoint
from bnscope.ops.corruptions import corrupt_folder

from ..clirun import run
from ..conftest import tiny_spec, trained_tiny


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_modes(root: Path, umask: int) -> list[str]:
    """Every file under ``root`` is 0666 & ~umask, every folder (``root`` too) 0777 & ~umask;
    no temporary file is left. Returns the relative paths checked."""
    assert mode(root) == 0o777 & ~umask, f"{root}: {oct(mode(root))}"
    seen = []
    for path in sorted(root.rglob("*")):
        want = 0o777 & ~umask if path.is_dir() else 0o666 & ~umask
        assert mode(path) == want, f"{path}: {oct(mode(path))}, expected {oct(want)}"
        assert not path.name.endswith(".tmp") and ".tmp-" not in path.name, path
        seen.append(str(path.relative_to(root)))
    return seen


def figure() -> Figure:
    fig = Figure()
    fig.add_subplot().plot([1, 2])
    return fig


def test_report_files(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "out"
    write_text(tmp_path / "a.json", "{}")
    save_figure(figure(), tmp_path / "a.png")
    files = {"plot.png": b"png", "report.html": b"<html></html>", "report.json": b"{}"}
    write_report_dir(out, files)
    assert mode(tmp_path / "a.json") == 0o666 & ~umask
    assert mode(tmp_path / "a.png") == 0o666 & ~umask
    assert assert_modes(out, umask) == ["plot.png", "report.html", "report.json"]


@pytest.mark.parametrize("form", ["torch", "safetensors"])
def test_checkpoints(tmp_path: Path, umask: int, form: str) -> None:
    model = trained_tiny(steps=2)
    src = tmp_path / ("ck.pt" if form == "torch" else "ck.safetensors")
    if form == "torch":
        torch.save({"model": model.state_dict()}, src)
    else:
        safetensors.torch.save_file(model.state_dict(), src)
    os.chmod(src, 0o600)  # the output's permissions come from the umask, not from the input
    ckpt = load_checkpoint(src)
    out = save_checkpoint(ckpt, {}, tmp_path / f"new{src.suffix}")
    assert mode(out) == 0o666 & ~umask


def test_corrupt_destination(tmp_path: Path, umask: int) -> None:
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            pixels = np.full((8, 8, 3), 40 * i + 60, dtype=np.uint8)
            Image.fromarray(pixels).save(src / cls / f"{i}.png")
    dst = tmp_path / "new" / "dst"  # its parent folder is created too
    assert corrupt_folder(src, dst, "contrast", 2) == 4
    assert mode(tmp_path / "new") == 0o777 & ~umask
    assert assert_modes(dst, umask) == ["a", "a/0.png", "a/1.png", "b", "b/0.png", "b/1.png"]
    corrupt_folder(src, dst, "contrast", 3, force=True)  # replacing the folder
    assert assert_modes(dst, umask) == ["a", "a/0.png", "a/1.png", "b", "b/0.png", "b/1.png"]


def test_demo_folder(tmp_path: Path, umask: int) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    build_demo(folder, train_per_class=8, val_per_class=1, epochs=0)
    written = assert_modes(folder, umask)
    assert {"bnscope.toml", "ckpt.pt", "model.py", "data/train/circle"} <= set(written)


def test_cli_outputs(tmp_path: Path, umask: int) -> None:
    """``bnscope precise`` with ``--out``: the checkpoint and every report file."""
    ckpt, data = tmp_path / "ck.pt", tmp_path / "d.pt"
    torch.save(trained_tiny(steps=3).state_dict(), ckpt)
    torch.save(torch.randn(24, 3, 8, 8), data)
    os.chmod(ckpt, 0o640)
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "8",
              "--out", tmp_path / "report", "--json", cwd=tmp_path)  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["output"] == str(tmp_path / "ck.precise.pt")
    assert mode(tmp_path / "ck.precise.pt") == 0o666 & ~umask
    assert assert_modes(tmp_path / "report", umask) == ["precise_change.png", "report.json"]


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o640
    src = tmp_path / "ck.pt"
    torch.save(trained_tiny(steps=2).state_dict(), src)
    out = tmp_path / "ck.precise.pt"
    out.write_bytes(b"old")
    os.chmod(out, 0o604)
    save_checkpoint(load_checkpoint(src), {}, out, force=True)
    assert mode(out) == 0o604 and out.read_bytes() != b"old"


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "x.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.txt.")
        assert mode(tmp) == 0o666 & ~umask  # created so, before anything is written
        tmp.write_text("half")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []

"""Bad data in the middle of a long run, in one process: a damaged image at position 900 of
1,000, a batch with NaN, a batch or an image of another size. Every command that reads data
stops with exactly one ``bnscope: error:`` line naming the image or batch, exit 2, no
traceback, and nothing written: no ``-o`` checkpoint, no ``--report-dir`` folder, no temporary
file, no worker process left behind (docs/cli.md, section 8). ``--skip-unreadable`` (library:
``skip_unreadable=True``, project file: ``skip_unreadable``) leaves damaged images out with one
warning instead.

A batch of another size that the model can take (global pooling) is not an error: statistics
pool every element of every batch (docs/statistics.md), which is what multi-scale data asks for;
the test here pins that down."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import bnscope
from bnscope.errors import DataError

from ..clirun import run
from ..conftest import MODELS, tiny_spec, trained_tiny

N_IMAGES = 1000
BAD_IMAGE = 900  # the damaged image's position, 1-based, in name order
BATCHES = 40  # of the tensor file and the factories, in batches of 4
BAD_BATCH = 29  # the batch with bad data: the 30th of 40 (the engine counts from 0)
NAN_SAMPLE = 117  # the tensor file's sample with a NaN
READ_FIX = (
    "remove or replace the file, or pass --skip-unreadable to leave unreadable images out "
    "(a warning names them)"
)

FACTORIES = f"""
import torch


def _batches(batch_size, edit):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range({BATCHES}):
        x = torch.randn(batch_size, 3, 8, 8, generator=g)
        out.append(edit(x, g) if i == {BAD_BATCH} else x)
    return out


def nan_batch(batch_size=4):
    def edit(x, g):
        x[1, 0, 2, 3] = float("nan")
        return x

    return _batches(batch_size, edit)


def other_size(batch_size=4):
    return _batches(batch_size, lambda x, g: torch.randn(batch_size, 3, 16, 16, generator=g))
"""


def image_name(position: int) -> str:
    return f"{position - 1:04d}.png"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints, two folders of 1,000 8x8 images (one with image 900 cut in half, one with
    image 900 of another size), a tensor file and data factories with a bad batch 30 of 40."""
    root = tmp_path_factory.mktemp("midrun")
    torch.save(trained_tiny(steps=5).state_dict(), root / "ck.pt")
    torch.manual_seed(0)
    from .. import models

    torch.save(models.make_fixed_size().state_dict(), root / "fixed.pt")
    rng = np.random.default_rng(0)
    good = root / "good"
    good.mkdir()
    for i in range(1, N_IMAGES + 1):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(good / image_name(i))
    shutil.copytree(good, root / "truncated")
    damaged = root / "truncated" / image_name(BAD_IMAGE)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    shutil.copytree(good, root / "sizes")
    Image.new("RGB", (10, 12), (1, 2, 3)).save(root / "sizes" / image_name(BAD_IMAGE))
    x = torch.randn(BATCHES * 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[NAN_SAMPLE, 1, 4, 4] = float("nan")
    torch.save(x, root / "nan.pt")
    (root / "fac.py").write_text(FACTORIES)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` -> (size, mtime in ns): what a write would change."""
    seen: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # Python's own import cache
        for name in dirs + files:
            stat = os.stat(os.path.join(folder, name))
            seen[os.path.relpath(os.path.join(folder, name), root)] = (
                stat.st_size if name in files else -1,
                stat.st_mtime_ns,
            )
    return seen


def nan_batch_of_the_tensor_file(root: Path) -> int:
    """The batch that holds the NaN sample, in the order the commands read the tensor file
    (the library's defaults: shuffled with seed 0, the same order every time)."""
    for index, batch in enumerate(bnscope.load_data(str(root / "nan.pt"), batch_size=4)):
        if torch.isnan(batch).any():
            return index
    raise AssertionError("no batch holds the NaN")


# --------------------------------------------------------------------------------------------
# The cases: (data arguments, checkpoint, model, the expected error line without its lead)

CASES = {
    "truncated-image": (("{W}/truncated",), "ck.pt", tiny_spec(), "image"),
    "truncated-image-image-size": (
        ("{W}/truncated", "--image-size", "8"), "ck.pt", tiny_spec(), "image",
    ),
    "truncated-image-workers": (("{W}/truncated", "--workers", "2"), "ck.pt", tiny_spec(),
                                "image"),
    "image-of-another-size": (("{W}/sizes",), "ck.pt", tiny_spec(), "size"),
    "image-of-another-size-workers": (("{W}/sizes", "--workers", "2"), "ck.pt", tiny_spec(),
                                      "size"),
    "nan-batch-factory": (("{W}/fac.py:nan_batch",), "ck.pt", tiny_spec(), "nan-factory"),
    "nan-batch-tensor-file": (("{W}/nan.pt",), "ck.pt", tiny_spec(), "nan-file"),
    "batch-of-another-size": (
        ("{W}/fac.py:other_size",), "fixed.pt", f"{MODELS}:make_fixed_size", "shape",
    ),
}  # fmt: skip

COMMANDS = {
    "inspect": ("inspect",),
    "precise": ("precise", "-o", "{T}/new.pt"),
    "adapt": ("adapt", "-o", "{T}/new.pt"),
    "ghost": ("ghost", "--sizes", "2,4"),
}


def expected(kind: str, root: Path) -> tuple[str, str]:
    """The start and the end of the error line (the reason in between is Pillow's/torch's)."""
    bad = root / ("truncated" if kind == "image" else "sizes") / image_name(BAD_IMAGE)
    if kind == "image":
        return f"image {BAD_IMAGE} of {N_IMAGES} cannot be read: {bad}: ", f"; {READ_FIX}"
    if kind == "size":
        line = (
            f"image {BAD_IMAGE} of {N_IMAGES} has a different size: {bad} is 10x12, "
            f"{root / 'sizes' / image_name(1)} is 8x8; pass --image-size N to resize and crop"
        )
        return line, line
    if kind in ("nan-factory", "nan-file"):
        batch = BAD_BATCH if kind == "nan-factory" else nan_batch_of_the_tensor_file(root)
        line = (
            f"NaN or Inf reached BN layer 1 in batch {batch}; check the data and the "
            "checkpoint (bnscope inspect CKPT)"
        )
        return line, line
    return (
        f"the model failed on batch {BAD_BATCH} (input 4x3x16x16) in 4 (Linear): RuntimeError: ",
        "; check that --data fits the model (channels, image size, --input-key, "
        "--model-kwargs)",
    )


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_midrun_is_one_line_and_nothing_written(
    tree: Path, tmp_path: Path, case: str, command: str
) -> None:
    data, ckpt, model, kind = CASES[case]
    args = [
        *(a.replace("{T}", str(tmp_path)) for a in COMMANDS[command]),
        tree / ckpt, "--model", model, "--batch-size", "32" if "image" in case else "4",
        "--report-dir", tmp_path / "report", "--data",
        *(a.replace("{W}", str(tree)) for a in data),
    ]  # fmt: skip
    before = snapshot(tree)

    res = run(*args)

    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    (line,) = res.stderr.splitlines()
    start, end = expected(kind, tree)
    assert line.startswith("bnscope: error: " + start), line
    assert line.endswith(end), line
    assert list(tmp_path.iterdir()) == []  # no checkpoint, report folder or temporary file
    assert snapshot(tree) == before  # nothing next to the checkpoint or in the data
    assert multiprocessing.active_children() == []  # the workers were stopped


# --------------------------------------------------------------------------------------------
# --skip-unreadable, the project file, the library


@pytest.mark.parametrize("command", list(COMMANDS))
def test_skip_unreadable_leaves_the_image_out_with_one_warning(
    tree: Path, tmp_path: Path, command: str
) -> None:
    args = [*(a.replace("{T}", str(tmp_path)) for a in COMMANDS[command]), tree / "ck.pt",
            "--model", tiny_spec(), "--data", tree / "truncated", "--skip-unreadable",
            "--json"]  # fmt: skip
    res = run(*args)
    assert res.exit_code == 0, res.stderr
    (line,) = res.stderr.splitlines()
    bad = tree / "truncated" / image_name(BAD_IMAGE)
    assert line.startswith(f"bnscope: warning: --data: left out 1 image that could not be "
                           f"read: {bad} (")  # fmt: skip
    assert line.endswith(") (remove or replace them)")
    if command in ("precise", "adapt"):
        assert (tmp_path / "new.pt").is_file()


def test_the_project_file_can_skip_and_a_flag_can_insist(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "bnscope.toml").write_text(
        f'model = "{tiny_spec()}"\ndata = "{tree / "truncated"}"\nskip_unreadable = true\n'
    )
    res = run("precise", tree / "ck.pt", "-o", tmp_path / "new.pt", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    assert "left out 1 image that could not be read" in res.stderr
    (tmp_path / "new.pt").unlink()
    res = run("precise", tree / "ck.pt", "-o", tmp_path / "new.pt", "--no-skip-unreadable",
              cwd=tmp_path)  # fmt: skip
    assert res.exit_code == 2
    assert f"image {BAD_IMAGE} of {N_IMAGES} cannot be read" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnscope.toml"]


@pytest.mark.parametrize("workers", [0, 2])
def test_library_stops_on_a_damaged_image_unless_asked_to_skip(tree: Path, workers: int) -> None:
    notes: list[str] = []
    options = dict(model=tiny_spec(), data=str(tree / "truncated"), workers=workers,
                   notify=notes.append)  # fmt: skip
    with pytest.raises(DataError) as info:
        bnscope.open(tree / "ck.pt", **options).precise()
    bad = tree / "truncated" / image_name(BAD_IMAGE)
    assert info.value.message.startswith(f"image {BAD_IMAGE} of {N_IMAGES} cannot be read: {bad}: ")
    assert "skip_unreadable=True" in (info.value.fix or "")
    assert notes == []
    assert multiprocessing.active_children() == []
    result = bnscope.open(tree / "ck.pt", skip_unreadable=True, **options).precise()
    assert result.report.extra["samples"] == N_IMAGES - 1
    assert len(notes) == 1 and str(bad) in notes[0]


def test_a_batch_of_another_size_the_model_can_take_is_pooled_element_by_element(
    tree: Path, tmp_path: Path
) -> None:
    # multi-scale data is legitimate (a factory chooses its resolutions): the batch of 16x16
    # inputs counts with its 4x as many elements per sample, as population statistics pool
    # every element of every call
    res = run("precise", tree / "ck.pt", "--model", tiny_spec(), "--data",
              tree / "fac.py:other_size", "--batch-size", "4", "-o", tmp_path / "new.pt",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    batches.append(torch.randn(4, 3, 16, 16, generator=g))
    model = nn.Sequential(nn.BatchNorm2d(3))
    bnscope.precise_bn(model, batches)
    pooled = torch.cat([b.double().transpose(0, 1).reshape(3, -1) for b in batches], dim=1)
    torch.testing.assert_close(model[0].running_mean.double(), pooled.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        model[0].running_var.double(), pooled.var(1, unbiased=False), rtol=1e-5, atol=1e-6
    )

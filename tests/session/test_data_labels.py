"""``bnscope.open`` with data that does not fit the model's classes, and data mistakes: class
folders matched to the training classes by name (from the checkpoint or the training data),
labels set aside when they cannot be matched, refused when they cannot fit, unreadable images
refused (or, with skip_unreadable, left out and announced), split-like class folders
announced, a pickled module whose code lies next to the model spec."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnscope
from bnscope.errors import CheckpointError, DataError

from ..conftest import color_ckpt, color_folder, color_spec

SUBSET = ("circle", "stripes", "triangle")  # "cross" (label 1) is missing


def job(ckpt: Path, notes: list[str], **options):
    return bnscope.open(ckpt, model=color_spec(), batch_size=4, notify=notes.append, **options)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": color_folder(tmp_path / "train"),
        "subset": color_folder(tmp_path / "subset", SUBSET),
        "five": color_folder(tmp_path / "five", (*SUBSET, "cross", "zebra")),
        "plain": color_ckpt(tmp_path / "plain.pt", classes=False),
        "named": color_ckpt(tmp_path / "named.pt", classes=True),
    }


def test_precise_matches_eval_folders_to_the_training_folder(folders) -> None:
    notes: list[str] = []
    res = job(folders["plain"], notes, data=str(folders["train"]),
              eval_data=str(folders["subset"])).precise()  # fmt: skip
    m = res.report.extra["metrics"]
    # the 3 folders keep their training labels 0, 2 and 3: the model is right on every image
    assert m["has_labels"] and m["variants"]["running"]["accuracy"] == 1.0 and m["samples"] == 6
    assert "(3 of the 4 training classes, 6 images)" in m["data"]
    assert notes == []


def test_checkpoint_class_names_match_the_folders(folders, tmp_path: Path) -> None:
    # training data without class names (a tensor file): the checkpoint names the classes
    x = torch.randn(8, 3, 4, 4)
    torch.save(x, tmp_path / "x.pt")
    notes: list[str] = []
    res = job(folders["named"], notes, data=str(tmp_path / "x.pt"),
              eval_data=str(folders["subset"])).precise()  # fmt: skip
    assert res.report.extra["metrics"]["variants"]["running"]["accuracy"] == 1.0
    ins = job(folders["named"], notes, data=str(folders["subset"])).inspect()
    assert ins.report.extra["metrics"]["variants"]["running"]["accuracy"] == 1.0
    gho = job(folders["named"], notes, data=str(folders["subset"])).ghost(sizes=[2])
    assert gho.report.extra["metrics"]["has_labels"]
    # the same labels as the folders numbered with an empty folder in the missing class's place
    (folders["subset"] / "cross").mkdir()
    same = job(folders["plain"], notes, data=str(folders["subset"])).ghost(sizes=[2])
    assert gho.report.extra["metrics"]["variants"] == same.report.extra["metrics"]["variants"]
    assert gho.report.extra["sizes"] == same.report.extra["sizes"]
    assert notes == []


def test_adapt_matches_eval_folders_to_the_jobs_training_data(folders) -> None:
    notes: list[str] = []
    res = job(folders["plain"], notes, data=str(folders["train"])).adapt(
        str(folders["train"]), eval_data=str(folders["subset"])
    )
    assert res.report.extra["metrics"]["variants"]["running"]["accuracy"] == 1.0
    assert notes == []


def test_unmatched_fewer_folders_set_the_labels_aside_with_a_notice(folders) -> None:
    notes: list[str] = []
    ins = job(folders["plain"], notes, data=str(folders["subset"])).inspect()
    metrics = ins.report.extra["metrics"]
    assert not metrics["has_labels"]
    assert metrics["variants"]["running"]["accuracy"] is None
    assert notes == [
        "data=: the labels of its 3 class folders were not used (no accuracy or loss): the "
        "model does not output 3 class scores and its class names are unknown, so folder i "
        "(in name order) need not be the model's class i; to use them, store the class names "
        "in the checkpoint (a 'classes' list), or add an empty folder for each missing class"
    ]
    notes.clear()
    tensors = folders["train"].parent / "x.pt"
    torch.save(torch.randn(8, 3, 4, 4), tensors)
    res = job(folders["plain"], notes, data=str(tensors),
              eval_data=str(folders["subset"])).precise()  # fmt: skip
    assert res.report.extra["metrics"]["variants"]["running"]["accuracy"] is None
    assert len(notes) == 1
    assert ", pass data= the training image folder with its class folders," in notes[0]
    notes.clear()
    res = job(folders["plain"], notes).adapt(str(tensors), eval_data=str(folders["subset"]))
    assert res.report.extra["metrics"]["variants"]["running"]["accuracy"] is None
    assert len(notes) == 1 and "make the job's data the source training image folder" in notes[0]


def test_an_empty_class_folder_keeps_the_missing_class_in_its_place(folders) -> None:
    (folders["subset"] / "cross").mkdir()
    notes: list[str] = []
    ins = job(folders["plain"], notes, data=str(folders["subset"])).inspect()
    assert ins.report.extra["metrics"]["variants"]["running"]["accuracy"] == 1.0
    assert notes == []


def test_folders_that_cannot_fit_are_refused_before_anything_runs(folders) -> None:
    notes: list[str] = []
    out = folders["plain"].parent / "out.pt"
    with pytest.raises(DataError) as info:
        job(folders["plain"], notes, data=str(folders["train"]),
            eval_data=str(folders["five"])).precise(output=out)  # fmt: skip
    assert info.value.message.startswith(
        f"{folders['five']} has a class folder that is not among the 4 training classes: zebra"
    )
    assert not out.exists()
    # without a reference: 5 folders cannot be the classes of 4 outputs
    for run in (
        lambda j: j.inspect(),
        lambda j: j.ghost(sizes=[2]),
    ):
        with pytest.raises(DataError, match="data= has labels of 5 classes but the model"):
            run(job(folders["plain"], notes, data=str(folders["five"])))
    with pytest.raises(DataError, match="eval_data= has labels of 5 classes"):
        job(folders["plain"], notes).adapt(str(folders["train"]), eval_data=str(folders["five"]))
    # with the checkpoint's names, the unknown folder is named
    with pytest.raises(DataError, match="not among the 4 training classes: zebra"):
        job(folders["named"], notes, data=str(folders["five"])).inspect()


def test_unreadable_images_stop_the_job_or_are_counted_and_named(folders) -> None:
    broken = folders["subset"] / "circle" / "9.jpg"
    broken.write_bytes(b"not an image")
    notes: list[str] = []
    with pytest.raises(DataError) as info:
        job(folders["named"], notes, data=str(folders["subset"])).inspect()
    assert info.value.message == (
        f"image 3 of 7 cannot be read: {broken}: not an image, or a format Pillow cannot read"
    )
    assert notes == []
    res = job(folders["named"], notes, data=str(folders["subset"]), skip_unreadable=True).inspect()
    assert res.report.extra["samples"] == 6
    assert notes == [
        f"data=: left out 1 image that could not be read: {broken} (not an image, or a format "
        "Pillow cannot read) (remove or replace them)"
    ]


def test_split_like_class_folders_are_announced(tmp_path: Path, folders) -> None:
    color_folder(tmp_path / "ds", ("train", "val"))
    notes: list[str] = []
    job(folders["plain"], notes).adapt(str(tmp_path / "ds"))
    assert notes == [
        f"data={tmp_path / 'ds'} has class folders named like dataset splits (train, val): "
        f"each is read as one class of images; point data= at one split, e.g. "
        f"{tmp_path / 'ds' / 'train'}"
    ]


def test_a_model_spec_makes_a_pickled_modules_code_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = tmp_path / "code"
    code.mkdir()
    (code / "picklenet_s.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    pass\n\n\n"
        "def make():\n    return Net(nn.Linear(4, 3), nn.BatchNorm1d(3))\n"
    )
    sys.path.insert(0, str(code))
    import picklenet_s  # type: ignore[import-not-found]

    torch.save(picklenet_s.make(), tmp_path / "whole.pt")
    sys.path.remove(str(code))
    monkeypatch.delitem(sys.modules, "picklenet_s")
    torch.save(torch.randn(8, 4), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'picklenet_s', which cannot be imported here"):
        bnscope.open(tmp_path / "whole.pt", trust=True).inspect()
    res = bnscope.open(tmp_path / "whole.pt", trust=True, model=f"{code / 'picklenet_s.py'}:make",
                       data=str(tmp_path / "x.pt")).inspect()  # fmt: skip
    assert res.report.extra["format"] == "module"
    assert isinstance(sys.modules["picklenet_s"].Net(), nn.Module)
    monkeypatch.delitem(sys.modules, "picklenet_s")

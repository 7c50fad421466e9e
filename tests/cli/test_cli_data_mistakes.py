"""Data that does not fit the model, and data mistakes, on the command line: one error line and
exit 2 where the labels cannot be the model's classes (class folders, factories), class folders
matched to the training classes by name, a warning line where labels were set aside, unreadable
images left out with --skip-unreadable (tests/cli/test_bad_data_midrun.py: refused without it)
and split-like class folders, and a pickled module whose code cannot be imported."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ..clirun import one_error_line, run
from ..conftest import color_ckpt, color_folder, color_spec

SUBSET = ("circle", "stripes", "triangle")  # "cross" (label 1) is missing


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    factory = tmp_path / "batches.py"
    factory.write_text(
        textwrap.dedent(
            """
            import torch


            def make(batch_size=4):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(12, 3, 4, 4, generator=g)
                y = torch.tensor([0, 1, 2, 3, 0, 1, 7, 3, 0, 1, 2, 4])  # 7 and 4: not classes
                return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, 12, 4)]
            """
        )
    )
    return {
        "train": color_folder(tmp_path / "train"),
        "subset": color_folder(tmp_path / "subset", SUBSET),
        "five": color_folder(tmp_path / "five", (*SUBSET, "cross", "zebra")),
        "ckpt": color_ckpt(tmp_path / "ck.pt", classes=False),
        "factory": factory,
        "out": tmp_path / "out.pt",
    }


def common(env: dict[str, Path]) -> list[str]:
    return ["--model", color_spec(), "--batch-size", "4"]


def test_more_class_folders_than_outputs_is_one_line(env) -> None:
    for command, flag, more in (
        ("inspect", "--data", []),
        ("ghost", "--data", ["--sizes", "2"]),
        ("adapt", "--eval-data", ["--data", env["train"], "-o", env["out"]]),
        ("precise", "--eval-data", ["--data", env["factory"].with_name("x.pt"), "-o", env["out"]]),
    ):
        torch.save(torch.randn(8, 3, 4, 4), env["factory"].with_name("x.pt"))
        res = run(command, env["ckpt"], *common(env), flag, env["five"], *more)
        one_error_line(
            res,
            f"{flag} has labels of 5 classes but the model outputs 4 class scores; point {flag} "
            "at data of the model's classes (at most 4 class folders, named as in training)",
        )
        assert not env["out"].exists()


def test_a_class_folder_not_among_the_training_classes_is_one_line(env) -> None:
    res = run("precise", env["ckpt"], *common(env), "--data", env["train"], "--eval-data",
              env["five"], "-o", env["out"])  # fmt: skip
    one_error_line(
        res,
        f"{env['five']} has a class folder that is not among the 4 training classes: zebra "
        "(training classes: circle, cross, stripes, triangle); class folders are matched to the "
        "training classes by name: rename or remove it",
    )
    assert not env["out"].exists()


def test_factory_labels_outside_the_classes_are_one_line(env) -> None:
    spec = f"{env['factory']}:make"
    res = run("inspect", env["ckpt"], *common(env), "--data", spec)
    one_error_line(
        res,
        "--data has labels outside the model's 4 classes (0 to 3): 2 of 12 labels; labels must "
        "be class indices of the model's outputs",
    )
    res = run("precise", env["ckpt"], *common(env), "--data", spec, "--eval-data", spec,
              "-o", env["out"])  # fmt: skip
    one_error_line(res, "--eval-data has labels outside the model's 4 classes (0 to 3)")
    assert not env["out"].exists()
    res = run("ghost", env["ckpt"], *common(env), "--data", spec, "--sizes", "2")
    one_error_line(res, "--data has labels outside the model's 4 classes")


def test_eval_folder_lacking_a_class_keeps_the_training_labels(env) -> None:
    res = run("precise", env["ckpt"], *common(env), "--data", env["train"], "--eval-data",
              env["subset"], "-o", env["out"], "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["metrics"]
    # was 1/3: every label shifted past the missing class
    assert m["variants"]["running"]["accuracy"] == 1.0
    assert "3 of the 4 training classes" in m["data"]
    assert res.stderr == ""


def test_adapt_eval_folder_matched_to_the_project_files_data(env, tmp_path: Path) -> None:
    (tmp_path / "bnscope.toml").write_text(f'data = "{env["train"]}"\n')
    res = run("adapt", env["ckpt"], *common(env), "--data", env["subset"], "--eval-data",
              env["subset"], "-o", env["out"], "--json", cwd=tmp_path)  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["metrics"]["variants"]["running"]["accuracy"] == 1.0
    assert doc["data"].startswith(f"image folder {env['subset']} (3 classes")  # the target
    assert res.stderr == ""


def test_labels_that_cannot_be_matched_are_set_aside_with_a_warning(env) -> None:
    res = run("inspect", env["ckpt"], *common(env), "--data", env["subset"], "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["has_labels"] is False
    assert res.stderr.splitlines() == [
        "bnscope: warning: --data: the labels of its 3 class folders were not used (no "
        "accuracy or loss): the model does not output 3 class scores and its class names are "
        "unknown, so folder i (in name order) need not be the model's class i; to use them, "
        "store the class names in the checkpoint (a 'classes' list), or add an empty folder for "
        "each missing class"
    ]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_are_left_out_with_one_warning(env, workers: str) -> None:
    good = env["subset"] / "circle" / "0.png"
    broken = env["subset"] / "stripes" / "5.jpg"
    data = good.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a truncated file
    (env["subset"] / "triangle" / "6.png").write_bytes(b"")
    (env["subset"] / "cross").mkdir()  # the labels are then the model's classes
    res = run("precise", env["ckpt"], *common(env), "--data", env["subset"], "--workers",
              workers, "-o", env["out"], "--json", "--skip-unreadable")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["samples"] == 6
    assert env["out"].is_file()
    (line,) = res.stderr.splitlines()
    assert line.startswith("bnscope: warning: --data: left out 2 images that could not be read: ")
    assert str(broken) in line and str(env["subset"] / "triangle" / "6.png") in line
    assert line.endswith("(remove or replace them)")


def test_split_like_class_folders_warn(env, tmp_path: Path) -> None:
    color_folder(tmp_path / "corrupted", ("train", "val"))
    res = run("adapt", env["ckpt"], *common(env), "--data", tmp_path / "corrupted",
              "-o", env["out"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines() == [
        f"bnscope: warning: --data {tmp_path / 'corrupted'} has class folders named like dataset "
        "splits (train, val): each is read as one class of images; point --data at one split, "
        f"e.g. {tmp_path / 'corrupted' / 'train'}"
    ]


def test_pickled_module_whose_code_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = tmp_path / "code"
    code.mkdir()
    (code / "picklenet_c.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    pass\n\n\n"
        "def make():\n    return Net(nn.Linear(4, 3), nn.BatchNorm1d(3))\n"
    )
    sys.path.insert(0, str(code))
    import picklenet_c  # type: ignore[import-not-found]

    torch.save(picklenet_c.make(), tmp_path / "whole.pt")
    sys.path.remove(str(code))
    monkeypatch.delitem(sys.modules, "picklenet_c")
    torch.save(torch.randn(8, 4), tmp_path / "x.pt")
    res = run("inspect", tmp_path / "whole.pt", "--trust-checkpoint", "--data", tmp_path / "x.pt")
    one_error_line(
        res,
        f"cannot unpickle {tmp_path / 'whole.pt'}: the model was saved with the Python module "
        "'picklenet_c', which cannot be imported here; run from the folder that holds "
        "picklenet_c.py, add that folder to PYTHONPATH, or pass --model "
        "FOLDER/picklenet_c.py:FACTORY (FOLDER then goes on the import path)",
    )
    res = run("inspect", tmp_path / "whole.pt", "--trust-checkpoint", "--data", tmp_path / "x.pt",
              "--model", f"{code / 'picklenet_c.py'}:make", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "module"
    monkeypatch.delitem(sys.modules, "picklenet_c")

"""``bnscope.open``: the four operations on the demo's checkpoint, saved byte-for-byte as the
CLI saves them (checkpoint, report.json, figures, report.html), and the job's own behaviour
(live objects, options resolved once, errors in the library's parameters)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import bnscope
from bnscope.demo.run import build_demo
from bnscope.errors import BnscopeError, UsageError
from bnscope.io.config import ProjectConfig
from bnscope.session import Options, resolve_options

from ..clirun import run


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo folder (model.py, data/train, data/val, ckpt.pt), built once."""
    folder = tmp_path_factory.mktemp("session") / "demo"
    folder.mkdir()
    build_demo(folder, seed=0, train_per_class=40, val_per_class=12, epochs=1)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_as_cli(cli_args: list[str], library, outputs: list[Path], cwd: Path) -> None:
    """Run the CLI, keep every output's bytes, remove them, run the library call with the
    same paths, and compare byte for byte."""
    res = run(*cli_args, cwd=cwd)
    assert res.exit_code == 0, res.stderr
    before: dict[Path, object] = {}
    for out in outputs:
        before[out] = files(out) if out.is_dir() else out.read_bytes()
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    library()
    for out in outputs:
        after = files(out) if out.is_dir() else out.read_bytes()
        if isinstance(after, dict):
            assert sorted(after) == sorted(before[out])  # type: ignore[arg-type]
            for name in after:
                assert after[name] == before[out][name], f"{out.name}/{name} differs"  # type: ignore[index]
        else:
            assert after == before[out], f"{out.name} differs"


def test_open_runs_all_four_operations_and_saves_like_the_cli(demo: Path, tmp_path: Path):
    ckpt, model = demo / "ckpt.pt", f"{demo / 'model.py'}:make_model"
    train, val = str(demo / "data" / "train"), str(demo / "data" / "val")
    common = ["--model", model, "--batch-size", "16", "--batches", "3"]

    def job(**extra):
        return bnscope.open(ckpt, model=model, batch_size=16, **extra)

    # static inspect: from the buffers alone
    out = tmp_path / "static"
    same_as_cli(
        ["inspect", ckpt, "--report-dir", out],
        lambda: bnscope.write_report(bnscope.open(ckpt).inspect(), out),
        [out],
        tmp_path,
    )
    assert (out / "running_stats.png").is_file()

    # dynamic inspect: report.json, figures and report.html
    out = tmp_path / "inspect"
    same_as_cli(
        ["inspect", ckpt, *common, "--data", train, "--report-dir", out],
        lambda: bnscope.write_report(job(data=train).inspect(batches=3), out),
        [out],
        tmp_path,
    )
    assert {"report.json", "report.html", "staleness.png"} <= set(files(out))

    # precise: the structure-preserving checkpoint and the report folder
    new, out = tmp_path / "p.pt", tmp_path / "precise"

    def precise() -> None:
        result = job(data=train, eval_data=val).precise(batches=3, output=new)
        assert result.save() == new
        bnscope.write_report(result, out)

    same_as_cli(
        ["precise", ckpt, *common, "--data", train, "--eval-data", val, "-o", new,
         "--report-dir", out],
        precise,
        [new, out],
        tmp_path,
    )  # fmt: skip
    assert json.loads((out / "report.json").read_text())["output"] == str(new)

    # adapt on the validation images as the "target" domain, with a prior
    new, out = tmp_path / "a.pt", tmp_path / "adapt"

    def adapt() -> None:
        result = job().adapt(val, prior=16, batches=3, eval_data=val, output=new)
        result.save()
        bnscope.write_report(result, out)

    same_as_cli(
        ["adapt", ckpt, *common, "--data", val, "--eval-data", val, "--prior", "16",
         "-o", new, "--report-dir", out],
        adapt,
        [new, out],
        tmp_path,
    )  # fmt: skip

    # ghost: the NBS analysis
    out = tmp_path / "ghost"
    same_as_cli(
        ["ghost", ckpt, *common, "--data", val, "--sizes", "2,4,8", "--report-dir", out],
        lambda: bnscope.write_report(job(data=val).ghost([2, 4, 8], batches=3), out),
        [out],
        tmp_path,
    )
    assert {"ghost_noise.png", "nbs_curve.png"} <= set(files(out))


def test_default_output_next_to_the_input_and_force(demo: Path, tmp_path: Path):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(demo / "ckpt.pt", ckpt)
    job = bnscope.open(
        ckpt, model=f"{demo / 'model.py'}:make_model", data=str(demo / "data" / "train"),
        batch_size=16,
    )  # fmt: skip
    result = job.precise(batches=2)
    assert result.save() == tmp_path / "ckpt.precise.pt"
    assert result.report.extra["output"] == str(tmp_path / "ckpt.precise.pt")
    with pytest.raises(BnscopeError, match=r"force=True"):
        job.precise(batches=2)  # refused before anything runs: the output exists
    again = job.precise(batches=2, force=True)
    assert again.save() == tmp_path / "ckpt.precise.pt"
    assert ckpt.read_bytes() == (demo / "ckpt.pt").read_bytes()  # the input is never touched
    with pytest.raises(UsageError, match="no checkpoint to save"):
        job.ghost([2], batches=1).save()


def test_live_model_and_loader_without_a_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(4)]
    result = bnscope.open(model=model, data=batches, device="cpu").precise()
    assert result.report.checkpoint is None
    assert result.report.extra["data"] == "list object"
    x = torch.cat(batches)
    with torch.no_grad():
        h = model[0](x).double()
    torch.testing.assert_close(model[1].running_mean.double(), h.mean((0, 2, 3)))
    torch.testing.assert_close(
        model[1].running_var.double(), h.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-9
    )
    with pytest.raises(UsageError, match=r"pass path= to save\(\)"):
        result.save()
    saved = result.updates
    assert set(saved) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_errors_name_the_library_parameters(demo: Path):
    ckpt = demo / "ckpt.pt"
    with pytest.raises(UsageError, match=r"precise needs data="):
        bnscope.open(ckpt).precise()
    with pytest.raises(UsageError, match=r"model=pkg.module:factory"):
        bnscope.open(ckpt, data=str(demo / "data" / "val")).precise()
    with pytest.raises(UsageError, match=r"device='gpu-ish' is not auto, cpu, cuda or cuda:N"):
        bnscope.open(ckpt, device="gpu-ish", data="x").precise()
    with pytest.raises(UsageError, match=r"amp='fp32' is not bf16 or fp16"):
        bnscope.open(ckpt, amp="fp32", data="x").ghost()
    with pytest.raises(UsageError, match=r"prior= must be >= 0"):
        bnscope.open(ckpt).adapt("x", prior=-1)
    with pytest.raises(UsageError, match=r"mean= must be comma-separated numbers"):
        bnscope.open(ckpt, mean="a,b")


def test_options_are_resolved_once_flags_over_file_over_defaults(tmp_path: Path):
    config = ProjectConfig(
        tmp_path / "bnscope.toml",
        {"data": "train/", "batch_size": 64, "mean": [0.5, 0.5], "channels_last": True},
    )
    opts = resolve_options(config, {"batch_size": 8, "workers": None, "seed": 3})
    assert opts.batch_size == 8 and opts.workers == 0 and opts.seed == 3
    assert opts.data == "train/" and opts.mean == (0.5, 0.5) and opts.channels_last is True
    assert opts.project_file == tmp_path / "bnscope.toml"
    assert resolve_options(config, {}, literal=("data",)).data is None
    assert resolve_options(ProjectConfig(), {}) == Options()

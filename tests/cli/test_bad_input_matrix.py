"""Every command against every kind of bad input: one line, exit 2, nothing written.

One table-driven test. Each case runs a command through ``CliRunner`` in a private copy of a
small input tree (checkpoints, tensor files, image folders, data factories, project files) and
asserts the contract of docs/cli.md, section 4: exit code 2; stderr is exactly one line
``bnscope: error: ...`` naming the problem and no traceback; stdout empty (except for
``inspect --data`` without ``--model``, which prints the static report first on purpose); and
nothing written or changed anywhere in the tree (recursive listing and sha256 of every file,
before and after), so ``-o``/``--report-dir`` targets never appear and inputs stay byte-identical.

Known bugs are strict xfails whose reason says what is wrong and where.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnscope.cli import app

from ..conftest import MODELS, tiny_spec, trained_tiny

runner = CliRunner()

W = "{W}"  # placeholder: the test's private copy of the input tree
TINY = "{M}"  # placeholder: tests/models.py:make_tiny
RUN_COMMANDS = ("inspect-dyn", "precise", "adapt", "ghost")
ALL_COMMANDS = ("inspect", *RUN_COMMANDS)
CUDA = torch.cuda.is_available()


def model_spec(name: str) -> str:
    return f"{MODELS}:{name}"


# --------------------------------------------------------------------------------------------
# The input tree (built once, copied per test)

FACTORIES = """
import torch


def raises(batch_size=4):
    raise RuntimeError("factory boom")


def not_iterable():
    return 42


def fails_midway(batch_size=4):
    def batches():
        for i in range(6):
            if i == 2:
                raise RuntimeError("disk went away")
            yield torch.randn(batch_size, 3, 8, 8)

    return batches()
"""


def _images(folder: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> None:
    from PIL import Image

    folder.mkdir()
    for i, size in enumerate(sizes):
        color = (i * 40, 10, 200) if mode == "RGB" else i * 40
        Image.new(mode, size, color).save(folder / f"{i}.png")


def _build_tree(root: Path) -> None:
    from .. import models

    tiny = trained_tiny(steps=5)
    torch.save(tiny.state_dict(), root / "ck.pt")
    raw = (root / "ck.pt").read_bytes()
    (root / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "existing.pt").write_bytes(b"keep me")
    torch.save(tiny, root / "whole.pt")
    torch.jit.save(torch.jit.trace(tiny.eval(), torch.randn(2, 3, 8, 8)), root / "ts.pt")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5))
    torch.save(other.state_dict(), root / "other.pt")
    torch.save(torch.nn.Linear(3, 3).state_dict(), root / "nobn.pt")
    torch.save(models.make_no_bn().state_dict(), root / "nobn_mlp.pt")
    torch.save(models.make_mlp().state_dict(), root / "mlp.pt")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    torch.save({"x": x, "y": torch.randint(0, 3, (24,), generator=g)}, root / "d.pt")
    torch.save({"y": torch.randint(0, 3, (24,), generator=g)}, root / "labels_only.pt")
    torch.save(torch.randn(16, 4, generator=g), root / "x4.pt")
    torch.save(torch.randn(5, 6, generator=g), root / "x6.pt")
    np.save(root / "rank1.npy", np.zeros(10, dtype=np.float32))

    (root / "emptydir").mkdir()
    _images(root / "imgs", [(8, 8)] * 4)
    _images(root / "mixed", [(8, 8), (10, 12), (8, 8), (10, 12)])
    _images(root / "gray", [(8, 8)] * 4, mode="L")
    _images(root / "badimg", [(8, 8)] * 3)
    (root / "badimg" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "allbad").mkdir()
    for name in ("a.png", "b.jpg"):  # --data: no image can be read (even with --skip-unreadable)
        (root / "allbad" / name).write_bytes(b"\x89PNG not really")
    (root / "fac.py").write_text(FACTORIES)

    projects = {
        "proj_badtoml": ("bnscope.toml", "model = [\n"),
        "proj_type": ("bnscope.toml", 'batch_size = "big"\n'),
        "proj_unknown": ("bnscope.toml", "colour = 1\n"),
        "proj_trust": ("bnscope.toml", "trust_checkpoint = true\n"),
        "proj_kwargs": ("bnscope.toml", 'model_kwargs = "{bad"\n'),
        "proj_pyproject": ("pyproject.toml", '[tool.bnscope]\nbatch_size = "big"\n'),
    }
    for folder, (name, text) in projects.items():
        (root / folder).mkdir()
        (root / folder / name).write_text(text)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    _build_tree(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (recursively) -> "dir" or the file's sha256."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # Python's own import cache
        for name in dirs:
            seen[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                seen[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return seen


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    fragment: str
    cwd: str = ""  # folder of the tree to run in (project files)
    static_report: bool = False  # stdout holds the static report before the error line
    prepare: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    warnings: int = 0  # warning lines before the error line (a deprecated option)


def argv(command: str, *extra: str, ckpt: str = f"{W}/ck.pt", model: str | None = TINY,
         data: str | None = f"{W}/d.pt") -> tuple[str, ...]:  # fmt: skip
    """The arguments of ``command`` on the good inputs, with ``extra`` appended.

    ``inspect`` is the static report (no model or data unless given in ``extra``);
    ``inspect-dyn`` is ``inspect --model --data``; ``model=None``/``data=None`` leave them out.
    """
    if command == "inspect":
        return ("inspect", ckpt, *extra)
    name = "inspect" if command == "inspect-dyn" else command
    args = [name, ckpt]
    if model is not None:
        args += ["--model", model]
    if data is not None:
        args += ["--data", data]
    if command == "ghost":
        args += ["--sizes", "2,4"]
    return (*args, *extra)


CASES: list = []


def case(cid: str, args: tuple[str, ...], fragment: str, *, xfail: str | None = None, **kw) -> None:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    CASES.append(pytest.param(Case(args, fragment, **kw), id=cid, marks=marks))


def skip_with_cuda(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if CUDA:
        pytest.skip("CUDA is available here, so --device cuda is not an error")


def skip_with_eight_gpus(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if CUDA and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")


def read_only_dir(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = work / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        pytest.skip("permissions are not enforced here (root); see the path-under-a-file cases")


def demo_must_not_start(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for the demo's 2-minute build: an error line that names the bug."""
    import bnscope.demo.run as demo_run
    from bnscope.errors import UsageError

    def build_demo(*args, **kwargs):
        raise UsageError("the demo started building before checking --device")

    monkeypatch.setattr(demo_run, "build_demo", build_demo)


# -- checkpoints -----------------------------------------------------------------------------

CHECKPOINTS = {
    "missing": (f"{W}/missing.pt", "checkpoint not found"),
    "directory": (f"{W}/emptydir", "is a directory, not a checkpoint file"),
    "empty": (f"{W}/empty.pt", "the file is empty"),
    "text": (f"{W}/notes.txt", "invalid or truncated pickle data"),
    "truncated-zip": (f"{W}/trunc.pt", "damaged or truncated zip archive"),
    "whole-module-untrusted": (f"{W}/whole.pt", "--trust-checkpoint"),
}
for command in ALL_COMMANDS:
    for kind, (path, fragment) in CHECKPOINTS.items():
        case(f"ckpt-{kind}-{command}", argv(command, ckpt=path), fragment)
    case(f"ckpt-wrong-key-{command}", argv(command, "--key", "nope"), "no entry 'nope'")
    model_args = ("--model", TINY) if command == "inspect" else ()
    for kind, path in {"no-bn": "nobn.pt", "other-arch": "other.pt"}.items():
        case(
            f"ckpt-{kind}-{command}",
            argv(command, *model_args, ckpt=f"{W}/{path}"),
            "checkpoint does not fit the model",
        )
    case(
        f"ckpt-torchscript-with-model-{command}",
        argv(command, *model_args, ckpt=f"{W}/ts.pt"),
        "TorchScript archive cannot be loaded into a --model",
    )

for command in ("precise", "adapt", "ghost"):  # refused before running: no copy written
    case(
        f"no-bn-model-{command}",
        argv(command, ckpt=f"{W}/nobn_mlp.pt", model=model_spec("make_no_bn"), data=f"{W}/x4.pt"),
        "no BatchNorm layer",  # as the static no-batchnorm finding says
    )

# leakage takes the common inputs (not --batches: it reads --samples samples)
for kind, (path, fragment) in CHECKPOINTS.items():
    case(f"ckpt-{kind}-leakage", argv("leakage", ckpt=path), fragment)
case("ckpt-no-bn-leakage", argv("leakage", "--model", TINY, ckpt=f"{W}/nobn.pt"),
     "checkpoint does not fit the model")  # fmt: skip
case(
    "no-bn-model-leakage",
    argv("leakage", ckpt=f"{W}/nobn_mlp.pt", model=model_spec("make_no_bn"), data=f"{W}/x4.pt"),
    "no BatchNorm layer",
)
case("no-model-leakage", argv("leakage", model=None), "leakage runs the model")
case("no-data-leakage", argv("leakage", data=None), "leakage needs --data")
case("leakage-unknown-key", argv("leakage", "--group-by", "image_id"), "image_id")
case("leakage-too-few-samples", argv("leakage", "--samples", "3"), "samples")

# -- model specs and kwargs ------------------------------------------------------------------

MODEL_SPECS = {
    "missing-colon": ("make_tiny", "is not of the form pkg.module:factory"),
    "missing-file": (f"{W}/nofile.py:make", "nofile.py not found"),
    "missing-function": (model_spec("nope"), "has no attribute 'nope'"),
    "factory-raises": (model_spec("make_raises"), "raised RuntimeError: factory exploded"),
    "not-a-module": (model_spec("make_not_module"), "returned int, not a torch.nn.Module"),
    "bad-module-path": ("no_such_pkg_zz.models:make", "module 'no_such_pkg_zz' not found"),
}
MODEL_KWARGS = {
    "invalid-json": ("{bad", "--model-kwargs is not valid JSON"),
    "not-an-object": ("[1, 2]", "--model-kwargs must be a JSON object, got list"),
    "unknown-kwarg": ('{"colour": 1}', "does not accept these keyword arguments"),
}
for command in ALL_COMMANDS:
    for kind, (spec, fragment) in MODEL_SPECS.items():
        if command == "inspect":
            args = argv(command, "--model", spec)
        else:
            args = argv(command, model=spec)
        case(f"model-{kind}-{command}", args, fragment)
    for kind, (kwargs, fragment) in MODEL_KWARGS.items():
        extra = ("--model", TINY) if command == "inspect" else ()
        case(f"kwargs-{kind}-{command}", argv(command, *extra, "--model-kwargs", kwargs), fragment)

# -- data ------------------------------------------------------------------------------------

DATA = {
    "missing": ((f"{W}/nothing_here",), "data not found"),
    "empty-folder": ((f"{W}/emptydir",), "no images or tensor files found"),
    # without --image-size every image must have the size of the first one
    "mixed-image-sizes": ((f"{W}/mixed",), " of 4 has a different size: "),
    # a damaged image stops the run (--skip-unreadable leaves it out with a warning)
    "unreadable-image": ((f"{W}/badimg",), "image 4 of 4 cannot be read: "),
    "unreadable-image-workers": ((f"{W}/badimg", "--workers", "2"), "--skip-unreadable"),
    # grayscale files are converted to RGB (as torchvision does): not an error. One channel
    # requested for a model whose first conv takes 3 is, and the line names the shape.
    "one-channel-for-rgb-model": (
        (f"{W}/gray", "--channels", "1"),
        "(input 4x1x8x8) in 0 (Conv2d): RuntimeError: Given groups=1, weight of size [4, 3, 3, 3]",
    ),
    "labels-only-pt": ((f"{W}/labels_only.pt",), "looks like labels only"),
    "npy-wrong-rank": ((f"{W}/rank1.npy",), "(input 10) in 0 (Conv2d)"),
    "no-readable-image": ((f"{W}/allbad",), "none of the 2 images in"),
    "factory-raises": ((f"{W}/fac.py:raises",), "raised RuntimeError: factory boom"),
    "factory-not-iterable": ((f"{W}/fac.py:not_iterable",), "returned a int, not an iterable"),
    "factory-fails-midway": (
        (f"{W}/fac.py:fails_midway",),
        "raised RuntimeError: disk went away while producing batch",
    ),
}
for command in RUN_COMMANDS:
    for kind, ((spec, *extra), fragment) in DATA.items():
        case(f"data-{kind}-{command}", argv(command, *extra, data=spec), fragment)

case(
    "data-without-model-inspect",
    argv("inspect", "--data", f"{W}/d.pt"),
    "--data needs --model for a state-dict checkpoint",
    static_report=True,
)
case("no-model-precise", argv("precise", model=None), "precise runs the model")
case("no-model-adapt", argv("adapt", model=None), "adapt runs the model")
case("no-model-ghost", argv("ghost", model=None), "ghost runs the model")
case("no-data-precise", argv("precise", data=None), "precise needs --data")
case("no-data-adapt", argv("adapt", data=None), "adapt needs --data")
case("no-data-ghost", argv("ghost", data=None), "ghost needs --data")
case("no-checkpoint-precise", ("precise", "--model", TINY, "--data", f"{W}/d.pt"),
     "no checkpoint given", cwd="emptydir")  # fmt: skip

# -- numeric and choice options --------------------------------------------------------------

for command in RUN_COMMANDS:
    case(f"batches-0-{command}", argv(command, "--batches", "0"), "'--batches'")
    case(f"batches-negative-{command}", argv(command, "--batches", "-1"), "'--batches'")
    case(f"batch-size-0-{command}", argv(command, "--batch-size", "0"), "'--batch-size'")
    case(f"workers-negative-{command}", argv(command, "--workers", "-1"), "'--workers'")
    case(f"device-banana-{command}", argv(command, "--device", "banana"), "--device 'banana'")
    case(
        f"device-cuda-{command}",
        argv(command, "--device", "cuda"),
        "--device cuda: CUDA is not available here",
        prepare=skip_with_cuda,
    )
    case(f"amp-fp32-{command}", argv(command, "--amp", "fp32"), "--amp 'fp32' is not bf16 or fp16")
    case(
        f"device-cuda-7-{command}",
        argv(command, "--device", "cuda:7"),
        "--device cuda:7: " + ("CUDA is not available here" if not CUDA else "only"),
        prepare=skip_with_eight_gpus,
    )
    img = f"{W}/imgs"
    case(
        f"mean-wrong-count-{command}",
        argv(command, "--mean", "0.5,0.5", data=img),
        "--mean has 2 values but images have 3 channels",
    )
    case(
        f"mean-not-numbers-{command}",
        argv(command, "--mean", "a,b,c", data=img),
        "--mean must be comma-separated numbers",
    )
    case(f"std-zero-{command}", argv(command, "--std", "0", data=img), "std must be positive")
    case(
        f"channels-2-{command}",
        argv(command, "--channels", "2", data=img),
        "unsupported number of image channels",
    )
for command in ALL_COMMANDS:
    case(f"fail-on-bogus-{command}", argv(command, "--fail-on", "bogus"), "--fail-on 'bogus'")
case(
    "device-banana-inspect",
    argv("inspect", "--device", "banana"),
    "--device 'banana'",
)
case("amp-bogus-inspect", argv("inspect", "--amp", "bogus"), "--amp 'bogus' is not bf16 or fp16")

for command in ("precise", "adapt", "inspect-dyn"):  # BatchNorm1d on a batch of one sample
    case(
        f"batch-of-one-{command}",
        argv(command, "--batch-size", "1", ckpt=f"{W}/mlp.pt", model=model_spec("make_mlp"),
             data=f"{W}/x6.pt"),
        "got 1 value per channel in batch 0",
    )  # fmt: skip
case("batch-of-one-ghost", argv("ghost", "--batch-size", "1"), "fewer than every ghost size")
case("prior-negative-adapt", argv("adapt", "--prior", "-1"), "'--prior'")
for sizes, fragment in [
    ("1", "ghost size 1 is too small"),
    ("1,4", "ghost size 1 is too small"),
    ("a,b", "ghost sizes must be comma-separated integers"),
    ("2.5", "ghost sizes must be comma-separated integers"),
    ("", "no ghost sizes given"),
    (",", "no ghost sizes given"),
]:
    case(f"ghost-sizes-{sizes or 'empty'}", argv("ghost", "--sizes", sizes), fragment)

# -- corrupt ---------------------------------------------------------------------------------

for cid, args, fragment, _why in [
    ("severity-9", ("--severity", "9"), "severity 9 is out of range", None),
    ("severity-0", ("--severity", "0"), "severity 0 is out of range", None),
    ("unknown-corruption", ("--corruption", "nope"), "unknown corruption 'nope'", None),
    ("src-missing", ("SRC=missing",), "does not exist", None),
    ("src-empty", ("SRC=emptydir",), "no images found", None),
    ("src-is-a-file", ("SRC=notes.txt",), "is not a folder", None),
    ("dst-is-a-file", ("DST=notes.txt",), "exists and is not a folder", None),
    ("dst-inside-src", ("DST=imgs/sub",), "overlaps the source", None),
    ("dst-not-empty", ("DST=gray",), "exists and is not empty", None),
    ("corrupt-image", ("SRC=badimg",), "cannot read image", None),
    (
        "dst-under-a-file",
        ("DST=notes.txt/out",),
        "notes.txt",
        "a file where DST's parent folder should be",
    ),
    (
        "corrupt-image-into-new-parent",
        ("SRC=badimg", "DST=newparent/out"),
        "cannot read image",
        "DST's missing parent folders are created, then removed again when the run fails",
    ),
]:
    src, dst, extra = f"{W}/imgs", f"{W}/corrupted", []
    for item in args:
        if item.startswith("SRC="):
            src = f"{W}/{item[4:]}"
        elif item.startswith("DST="):
            dst = f"{W}/{item[4:]}"
        else:
            extra.append(item)
    case(f"corrupt-{cid}", ("corrupt", src, dst, *extra), fragment)

# -- demo ------------------------------------------------------------------------------------

case("demo-into-a-file", ("demo", f"{W}/notes.txt"), "exists and is not a folder")
case("demo-under-a-file", ("demo", f"{W}/notes.txt/demo"), "cannot create")
case("demo-not-empty", ("demo", f"{W}/imgs"), "is not empty")
case(
    "demo-device-banana",
    ("demo", f"{W}/newdemo", "--device", "banana"),
    "--device 'banana'",
    prepare=demo_must_not_start,
)
case(
    "demo-amp-fp32",
    ("demo", f"{W}/newdemo", "--amp", "fp32"),
    "--amp 'fp32' is not bf16 or fp16",
    prepare=demo_must_not_start,
)
if not CUDA:
    case(
        "demo-device-cuda",
        ("demo", f"{W}/newdemo", "--device", "cuda"),
        "CUDA is not available here",
        prepare=demo_must_not_start,
    )

# -- output paths ----------------------------------------------------------------------------

for command, tag in [("precise", "precise"), ("adapt", "adapted")]:
    case(f"o-is-the-input-{command}", argv(command, "-o", f"{W}/ck.pt"), "refusing to overwrite")
    case(f"o-is-the-input-relative-{command}", argv(command, "-o", "./ck.pt"),
         "refusing to overwrite")  # fmt: skip
    case(f"o-exists-{command}", argv(command, "-o", f"{W}/existing.pt"), "already exists")
    case(
        f"o-default-exists-{command}",
        argv(command, ckpt=f"{W}/proj/ck.pt"),
        f"ck.{tag}.pt already exists",
        prepare=lambda w, m, tag=tag: (
            (w / "proj").mkdir(),
            shutil.copy(w / "ck.pt", w / "proj" / "ck.pt"),
            (w / "proj" / f"ck.{tag}.pt").write_bytes(b"older result"),
        ),
    )
    case(f"o-is-a-folder-{command}", argv(command, "-o", f"{W}/emptydir"), "is a directory")
    case(
        f"o-missing-folder-{command}",
        argv(command, "-o", f"{W}/no/such/dir/out.pt"),
        "output directory does not exist",
    )
    case(
        f"o-under-a-file-{command}",
        argv(command, "-o", f"{W}/notes.txt/out.pt"),
        "notes.txt",
    )
    case(
        f"o-read-only-folder-{command}",
        argv(command, "-o", f"{W}/ro/out.pt"),
        "Permission denied",
        prepare=read_only_dir,
    )
for command in ALL_COMMANDS:  # checked before anything runs: no checkpoint written either
    case(
        f"out-is-a-file-{command}",
        argv(command, "--report-dir", f"{W}/notes.txt"),
        "exists and is not a folder",
    )
    case(f"out-under-a-file-{command}", argv(command, "--report-dir", f"{W}/notes.txt/rep"),
         "cannot create --report-dir folder")  # fmt: skip
    for flag in ("--report-dir", "--out"):  # --out: the deprecated spelling warns first
        case(f"report-dir-named-like-a-checkpoint{flag[1:5]}-{command}",
             argv(command, flag, f"{W}/fixed.pt"), "ends in .pt like a checkpoint file",
             warnings=1 if flag == "--out" else 0)  # fmt: skip
    case(
        f"report-dir-holds-an-earlier-report-{command}",
        argv(command, "--report-dir", f"{W}/rep"),
        "already holds an earlier ghost report",
        prepare=lambda w, m: ((w / "rep").mkdir(), (w / "rep" / "report.json").write_text(
            '{"schema": "bnscope.ghost/1", "command": "ghost", "report_files": ["report.json"]}'
        )),
    )  # fmt: skip
for command in ("precise", "adapt"):
    case(
        f"o-and-report-dir-the-same-{command}",
        argv(command, "-o", f"{W}/new", "--report-dir", f"{W}/new"),
        "name the same path",
    )

# -- project files ---------------------------------------------------------------------------

PROJECTS = {
    "proj_badtoml": "is not valid TOML",
    "proj_type": "key 'batch_size' must be int, got str",
    "proj_unknown": "unknown key 'colour'",
    "proj_trust": "unknown key 'trust_checkpoint' in bnscope.toml; pass --trust-checkpoint",
    "proj_kwargs": "model_kwargs is not valid JSON",
    "proj_pyproject": "[tool.bnscope] key 'batch_size' must be int",
}
for command in ALL_COMMANDS:
    for folder, fragment in PROJECTS.items():
        case(f"project-{folder[5:]}-{command}", argv(command), fragment, cwd=folder)


# --------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("c", CASES)
def test_bad_input(c: Case, source_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "w"
    shutil.copytree(source_tree, work)
    if c.prepare is not None:
        c.prepare(work, monkeypatch)
    subst = {W: str(work), TINY: tiny_spec()}
    args = []
    for arg in c.args:
        for key, value in subst.items():
            arg = arg.replace(key, value)
        args.append(arg)
    before = snapshot(work)
    monkeypatch.chdir(work / c.cwd)

    res = runner.invoke(app, args)

    assert res.exit_code == 2, (res.exit_code, res.exception, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 + c.warnings, res.stderr
    assert all(line.startswith("bnscope: warning: ") for line in lines[:-1]), res.stderr
    assert lines[-1].startswith("bnscope: error: "), lines[-1]
    assert c.fragment in lines[-1], lines[-1]
    if c.static_report:
        assert "BatchNorm layers" in res.stdout
    else:
        assert res.stdout == ""
    after = snapshot(work)
    assert sorted(set(after) - set(before)) == []  # nothing written (-o, --report-dir, temp files)
    assert sorted(set(before) - set(after)) == []  # nothing removed
    changed = sorted(p for p in before if before[p] != after[p])
    assert changed == []  # inputs byte-identical


def test_table_covers_every_command():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for command in ("inspect", "precise", "adapt", "ghost", "leakage", "corrupt", "demo"):
        assert any(p.values[0].args[0] == command for p in CASES), command

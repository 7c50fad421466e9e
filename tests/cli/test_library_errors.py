"""Library errors speak in the library's parameters (``batches=100``, ``force=True``), never in
command-line flags; the CLI spells them as flags. Checked statically (every error raised below
the CLI) and by driving bad inputs through the library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bnscope
from bnscope.cli.options import FLAGS, as_flags
from bnscope.errors import BnscopeError

PACKAGE = Path(bnscope.__file__).parent


def cli_flags() -> set[str]:
    """Every long option of every bnscope command."""
    import typer.main

    from bnscope.cli import app

    group = typer.main.get_command(app)
    names: set[str] = set()
    for command in group.commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
    return names


BNSCOPE_FLAGS = cli_flags()
FLAG = re.compile(
    r"(?<![\w.-])(" + "|".join(sorted(map(re.escape, BNSCOPE_FLAGS), key=len, reverse=True))
    + r")(?![\w-])"
)
ERRORS = {"BnscopeError", "CheckpointError", "ModelError", "DataError", "UsageError",
          "NotAvailableError", "CommunicationError", "PeerFailed", "error"}  # fmt: skip


def _strings(node: ast.AST) -> list[str]:
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.append(sub.value)
    return out


def library_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]


def test_no_error_raised_below_the_cli_names_a_flag():
    offenders = []
    for path in library_modules():
        tree = ast.parse(path.read_text())
        constants = {  # module-level fix texts such as _FIX_KEY
            t.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ERRORS:
                continue
            texts = _strings(node)
            for arg in ast.walk(node):
                if isinstance(arg, ast.Name) and arg.id in constants:
                    texts += _strings(constants[arg.id])
            for text in texts:
                if FLAG.search(text):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text!r}")
    assert not offenders, "\n".join(offenders)


def bad_calls(tmp_path: Path) -> dict[str, object]:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with torch.no_grad():
        model(torch.randn(2, 3, 2, 2))
    data = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    (tmp_path / "notes.txt").write_text("x")
    evil = tmp_path / "evil.pt"
    torch.save({"m": nn.Linear(2, 2)}, evil)
    return {
        "batches=0": lambda: bnscope.precise_bn(model, data, batches=0),
        "data runs out": lambda: bnscope.precise_bn(model, data, batches=9),
        "no batches": lambda: bnscope.precise_bn(model, []),
        "batch of one": lambda: bnscope.precise_bn(nn.BatchNorm1d(2), [torch.randn(1, 2)]),
        "wrong shape": lambda: bnscope.precise_bn(model, [torch.randn(4, 5, 2, 2)]),
        "dict without input": lambda: bnscope.precise_bn(model, [{"a": data[0]}]),
        "missing input key": lambda: bnscope.precise_bn(model, [{"a": data[0]}], input_key="b"),
        "prior": lambda: bnscope.adapt_bn(model, data, prior=-1),
        "sizes": lambda: bnscope.ghost_analysis(model, data, sizes="1,a"),
        "sizes too big": lambda: bnscope.ghost_analysis(model, data, sizes=[64]),
        "amp": lambda: bnscope.precise_bn(model, data, amp="fp32"),
        "device": lambda: bnscope.precise_bn(model, data, device="banana"),
        "checkpoint missing": lambda: bnscope.load_checkpoint(tmp_path / "nope.pt"),
        "checkpoint key": lambda: bnscope.load_checkpoint(tmp_path / "ck.pt", key="nope"),
        "untrusted pickle": lambda: bnscope.load_checkpoint(evil),
        "model spec": lambda: bnscope.build_model("nope.py:f"),
        "model kwargs": lambda: bnscope.build_model("torch.nn:Linear", "{bad json"),
        "data spec": lambda: bnscope.load_data(str(tmp_path / "missing")),
        "batch size": lambda: bnscope.load_data(str(tmp_path / "ck.pt"), batch_size=0),
        "existing output": lambda: bnscope.save_checkpoint(
            bnscope.load_checkpoint(tmp_path / "ck.pt"), {}, tmp_path / "ck.pt"
        ),
        "corrupt": lambda: bnscope.corrupt(torch.zeros(4, 4, 3, dtype=torch.uint8).numpy(),
                                           "nope", 3),  # fmt: skip
    }


def test_bad_inputs_through_the_library_name_no_flag(tmp_path: Path):
    for what, call in bad_calls(tmp_path).items():
        with pytest.raises((BnscopeError, ValueError)) as info:
            call()
        text = str(info.value)
        assert not FLAG.search(text), (what, text)


def test_the_cli_spells_parameters_as_flags():
    assert as_flags("e.g. batches=100; pass force=True; leave out key=") == (
        "e.g. --batches 100; pass --force; leave out --key"
    )
    assert as_flags("keep it (drop_last=False), key=state_dict:ema") == (
        "keep it (--no-drop-last), --key state_dict:ema"
    )
    assert as_flags("lambda = N/(N+n), ghost_size=16") == "lambda = N/(N+n), ghost_size=16"
    assert all(flag.startswith("-") for flag in FLAGS.values())

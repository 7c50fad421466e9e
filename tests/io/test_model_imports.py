"""Model and data code next to the user's files imports its siblings under the real command.

A ``file.py:factory`` spec's folder stays on ``sys.path`` for the whole run (factories and
models import sibling modules lazily: inside the factory, at forward time), and the ``bnscope``
console script puts the current folder on ``sys.path`` as ``python -m bnscope`` does (pickled
whole modules whose classes live there). These run the installed console script itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnscope.errors import ModelError
from bnscope.io.modelspec import add_to_sys_path, resolve_spec


def console_script() -> str:
    found = Path(sys.executable).parent / "bnscope"
    if found.is_file():
        return str(found)
    which = shutil.which("bnscope")
    if which is None:
        pytest.skip("the bnscope console script is not installed")
    return which


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # only what bnscope itself puts on sys.path
    env.pop("PYTHONSAFEPATH", None)
    env["COLUMNS"] = "160"
    return env


def bnscope(cwd: Path, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bnscope"] if module else [console_script()]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))


def python(cwd: Path, code: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr


MODEL = """
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(4, width)
            self.bn = nn.BatchNorm1d(width)

        def forward(self, x):
            import activations  # a sibling module, imported at forward time

            return activations.act(self.bn(self.fc(x)))


    def make_model():
        import helpers  # a sibling module, imported inside the factory

        return Net(helpers.WIDTH)
"""
HELPERS = "WIDTH = 6\n"
ACTIVATIONS = """
    import torch


    def act(x):
        return torch.relu(x)
"""
DATA_FACTORY = """
    def make(batch_size=16):
        import datahelp  # a sibling module, imported inside the factory

        return datahelp.batches(batch_size)
"""
DATA_HELP = """
    import torch


    def batches(batch_size):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return [x[i : i + batch_size] for i in range(0, 64, batch_size)]
"""
NETDEF = """
    from torch import nn


    class PickledNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """``code/`` holds the model and data factories with their siblings; the project folder
    holds ``netdef.py``, a pickled ``netdef.PickledNet``, a state dict of ``code/model.py``'s
    model and a tensor file."""
    root = tmp_path_factory.mktemp("project")
    code = root / "code"
    write(code, "model.py", MODEL)
    write(code, "helpers.py", HELPERS)
    write(code, "activations.py", ACTIVATIONS)
    write(code, "datafac.py", DATA_FACTORY)
    write(code, "datahelp.py", DATA_HELP)
    write(root, "netdef.py", NETDEF)
    python(
        root,
        """
        import sys, torch
        sys.path.insert(0, "code")
        import model, netdef
        torch.manual_seed(0)
        torch.save(model.make_model().state_dict(), "ckpt.pt")
        torch.save(netdef.PickledNet(), "whole.pt")
        torch.save(torch.randn(40, 4), "x.pt")
        """,
    )
    return root


def layers(result: subprocess.CompletedProcess) -> list[tuple[str, int]]:
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    return [(lay["name"], lay["num_features"]) for lay in doc["layers"]]


def test_factory_imports_siblings_lazily_under_the_console_script(project):
    # run from the project folder: code/ (the spec's folder) is not the current folder
    res = bnscope(
        project, "precise", "ckpt.pt", "--model", "code/model.py:make_model",
        "--data", "x.pt", "--batch-size", "8", "--json", "-o", "out1.pt", "--force",
    )  # fmt: skip
    assert layers(res) == [("bn", 6)]
    doc = json.loads(res.stdout)
    assert doc["samples"] == 40 and doc["output"] == "out1.pt"


def test_data_factory_imports_siblings_lazily(project):
    res = bnscope(
        project, "inspect", "ckpt.pt", "--model", "code/model.py:make_model",
        "--data", "code/datafac.py:make", "--batch-size", "16", "--json",
    )  # fmt: skip
    assert layers(res) == [("bn", 6)]
    assert json.loads(res.stdout)["samples"] == 64


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
def test_pickled_module_from_the_current_folder(project, module):
    res = bnscope(
        project, "precise", "whole.pt", "--trust-checkpoint", "--data", "x.pt", "--json",
        "-o", f"whole-{int(module)}.pt", "--force", module=module,
    )  # fmt: skip
    assert layers(res) == [("bn", 5)]
    assert json.loads(res.stdout)["format"] == "module"


def test_pkg_module_spec_from_the_current_folder(project):
    res = bnscope(project / "code", "inspect", "../ckpt.pt", "--model", "model:make_model",
                  "--data", "../x.pt", "--json")  # fmt: skip
    assert layers(res) == [("bn", 6)]


def test_spec_folder_is_added_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "specs"
    write(folder, "a.py", "def make():\n    return 1\n")
    write(folder, "b.py", "def make():\n    return 2\n")
    for spec in ("a.py:make", "b.py:make", "a.py:make"):
        assert resolve_spec(f"{folder / spec}")() in (1, 2)
    resolved = os.path.realpath(folder)
    assert sys.path[0] == resolved
    assert sum(os.path.realpath(p or ".") == resolved for p in sys.path) == 1
    # a failed import keeps the folder too (no removal, no duplicate)
    write(folder, "broken.py", "raise RuntimeError('nope')\n")
    with pytest.raises(ModelError, match="importing"):
        resolve_spec(f"{folder / 'broken.py'}:make")
    assert sum(os.path.realpath(p or ".") == resolved for p in sys.path) == 1


def test_current_folder_is_not_duplicated(tmp_path, monkeypatch):
    from bnscope.cli import _current_folder_on_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # as python -m puts it
    _current_folder_on_path()
    assert sum(os.path.realpath(p or ".") == os.path.realpath(tmp_path) for p in sys.path) == 1
    monkeypatch.setattr(sys, "path", ["", *sys.path[1:]])  # as python -c puts it
    assert not add_to_sys_path(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p])
    _current_folder_on_path()
    assert sys.path[0] == os.path.realpath(tmp_path)

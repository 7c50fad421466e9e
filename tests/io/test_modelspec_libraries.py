"""``--model torchvision:NAME`` and ``--model timm:NAME`` (with ``--model-kwargs``): built by
``torchvision.models.get_model`` / ``timm.create_model`` when the library imports, one clear
line naming the library and how to install it when it is missing or broken (simulated here,
so those tests run everywhere), and the same spec grammar as every other spec."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path

import pytest
import torch

from bnscope.errors import ModelError
from bnscope.io.modelspec import build_model, library_spec, split_spec

from ..clirun import one_error_line, run
from ..reallibs import real_libraries

LIBS = real_libraries()
needs_libraries = pytest.mark.skipif(LIBS is None, reason="timm/torchvision not importable here")


# -- the grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("torchvision:resnet50", ("torchvision", "resnet50")),
        ("timm:resnet50", ("timm", "resnet50")),
        ("timm:resnet50.a1_in1k", ("timm", "resnet50.a1_in1k")),  # a pretrained tag
        ("torchvision.models:resnet50", None),  # an ordinary pkg.module:factory spec
        ("timm.models:create_model", None),
        ("mytimm:resnet50", None),
        ("timm.py:make", None),  # a file spec
        ("nets/timm.py:make", None),
        ("C:\\timm", None),  # Windows paths are paths
        ("c:timm", None),
        ("timm", None),
        ("timm:", None),
        ("timm:resnet-50", None),
    ],
)
def test_library_specs_follow_the_one_grammar(spec, parts):
    assert library_spec(spec) == parts
    if parts is not None:
        assert split_spec(spec) == parts


# -- missing or broken libraries (simulated: these run everywhere) ------------------------------


def _forget(monkeypatch: pytest.MonkeyPatch, library: str) -> None:
    for name in list(sys.modules):
        if name == library or name.startswith(f"{library}."):
            monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_missing_library_is_one_line_naming_it_and_how_to_install_it(monkeypatch, library):
    _forget(monkeypatch, library)
    monkeypatch.setitem(sys.modules, library, None)  # import raises ModuleNotFoundError
    with pytest.raises(ModelError) as info:
        build_model(f"{library}:resnet18", '{"num_classes": 3}')
    assert str(info.value) == (
        f"model={library}:resnet18 names a {library} model, but {library} is not installed; "
        f"install it (pip install {library}), or name a factory of your own: "
        "model=pkg.module:factory"
    )


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``library`` and fails to execute it, as a build made for another torch does."""

    def __init__(self, library: str) -> None:
        self.library = library

    def find_spec(self, fullname, path, target=None):
        if fullname != self.library:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_library_that_fails_to_import_is_one_line(monkeypatch, library):
    _forget(monkeypatch, library)
    monkeypatch.setattr(sys, "meta_path", [_Broken(library), *sys.meta_path])
    with pytest.raises(ModelError) as info:
        build_model(f"{library}:resnet18")
    line = str(info.value)
    assert line.startswith(
        f"model={library}:resnet18: importing {library} failed (RuntimeError: operator "
        "torchvision::nms does not exist); install a "
    )
    assert f"pip install --upgrade {library}" in line and torch.__version__ in line


def test_through_the_cli_the_missing_library_is_one_error_line(monkeypatch, tiny_ckpt):
    _forget(monkeypatch, "timm")
    monkeypatch.setitem(sys.modules, "timm", None)
    res = run("inspect", tiny_ckpt, "--model", "timm:resnet18", "--model-kwargs",
              '{"num_classes": 3}')  # fmt: skip
    one_error_line(
        res,
        "--model timm:resnet18 names a timm model, but timm is not installed; install it "
        "(pip install timm), or name a factory of your own: --model pkg.module:factory",
    )


# -- the real libraries ------------------------------------------------------------------------


@needs_libraries
def test_models_are_built_by_name_with_their_kwargs():
    net = build_model("torchvision:resnet18", '{"num_classes": 7}')
    assert type(net).__name__ == "ResNet" and net.fc.out_features == 7
    net = build_model("torchvision:ResNet18")  # torchvision's names are not case-sensitive
    assert net.fc.out_features == 1000
    net = build_model("timm:test_resnet", {"num_classes": 5})
    assert type(net).__module__.startswith("timm.") and net.num_classes == 5
    assert type(build_model("timm:resnet18.a1_in1k", {"num_classes": 2})).__name__ == "ResNet"


@needs_libraries
def test_attributes_of_the_packages_still_resolve():
    """``torchvision:models.resnet18`` and ``timm:create_model`` meant those attributes before."""
    assert type(build_model("torchvision:models.resnet18")).__name__ == "ResNet"
    net = build_model("timm:create_model", {"model_name": "test_resnet", "num_classes": 2})
    assert net.num_classes == 2


@needs_libraries
def test_an_unknown_model_name_suggests_close_ones():
    with pytest.raises(ModelError) as info:
        build_model("torchvision:resnet19")
    assert str(info.value).startswith(
        "model=torchvision:resnet19: torchvision has no model 'resnet19'; did you mean resnet18"
    )
    assert "torchvision.models.list_models() lists all" in str(info.value)
    with pytest.raises(ModelError, match=r"timm has no model 'tset_resnet'; did you mean "
                                         r"test_resnet"):  # fmt: skip
        build_model("timm:tset_resnet")
    with pytest.raises(ModelError, match=r"raised TypeError"):
        build_model("torchvision:resnet18", {"num_clases": 3})


@needs_libraries
@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ("torchvision:mobilenet_v3_small", {"num_classes": 3}),
        ("timm:test_resnet", {"num_classes": 3}),
    ],
)
def test_the_cli_runs_precise_on_a_library_model(tmp_path: Path, spec, kwargs):
    net = build_model(spec, kwargs)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ck.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(16, 3, 32, 32, generator=g), tmp_path / "x.pt")
    res = run("precise", tmp_path / "ck.pt", "--model", spec, "--model-kwargs", json.dumps(kwargs),
              "--data", tmp_path / "x.pt", "--batch-size", "8", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["model"] == spec and doc["samples"] == 16
    assert doc["layers"] and {layer["status"] for layer in doc["layers"]} == {"updated"}
    assert (tmp_path / "ck.precise.pt").is_file()

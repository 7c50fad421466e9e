from __future__ import annotations

import sys

import pytest
from torch import nn

from bnscope.errors import ModelError
from bnscope.io.modelspec import build_model, is_python_spec, parse_kwargs, resolve_spec

from ..conftest import MODELS, tiny_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("pkg.mod:make", True),
        ("file.py:make", True),
        ("dir/file.py:make", True),
        ("data/train", False),
        ("C:stuff", False),
        ("x.pt", False),
        ("pkg.mod:", False),
    ],
)
def test_is_python_spec(spec, expected):
    assert is_python_spec(spec) is expected


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("pkg.mod:make", ("pkg.mod", "make")),
        ("dir/file.py:make", ("dir/file.py", "make")),
        ("file.py:Nets.make", ("file.py", "Nets.make")),
        ("C:/runs/file.py:make", ("C:/runs/file.py", "make")),
        ("C:stuff", None),
        ("data/train", None),
        ("pkg.mod:", None),
    ],
)
def test_one_grammar_for_model_data_and_call_specs(spec, parts, tmp_path, monkeypatch):
    """Data factory specs are told from paths with modelspec's grammar (no second parser)."""
    from bnscope.io.factories import _factory_parts
    from bnscope.io.modelspec import split_spec

    monkeypatch.chdir(tmp_path)  # none of these is an existing path here
    assert split_spec(spec) == parts
    assert is_python_spec(spec) is (parts is not None)
    assert _factory_parts(spec) == parts


def test_file_spec_with_kwargs():
    model = build_model(tiny_spec(), '{"num_classes": 7}')
    assert isinstance(model, nn.Module)
    assert model[-1].out_features == 7


def test_module_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n\ndef make(width=3):\n    return nn.BatchNorm1d(width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mypkg.nets:make", {"width": 5})
    assert model.num_features == 5
    sys.modules.pop("mypkg.nets", None)
    sys.modules.pop("mypkg", None)


@pytest.mark.parametrize(
    "spec, kwargs, fragment",
    [
        ("no_such_pkg_xyz.mod:make", None, "module 'no_such_pkg_xyz' not found"),
        ("/no/such/file.py:make", None, "not found"),
        (f"{MODELS}:nope", None, "has no attribute 'nope'"),
        (f"{MODELS}:make_raises", None, "RuntimeError: factory exploded"),
        (f"{MODELS}:make_not_module", None, "returned int, not a torch.nn.Module"),
        (f"{MODELS}:make_tiny", '{"bogus": 1}', "does not accept"),
        (f"{MODELS}:make_tiny", "{not json", "not valid JSON"),
        (f"{MODELS}:make_tiny", "[1, 2]", "must be a JSON object"),
        ("just/a/path", None, "is not of the form"),
    ],
)
def test_errors_are_one_line(spec, kwargs, fragment):
    with pytest.raises(ModelError) as info:
        build_model(spec, kwargs)
    line = info.value.line()
    assert fragment in line
    assert "\n" not in line
    assert info.value.fix


def test_import_error_inside_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nraise ValueError('broken\\nmodule')\n")
    with pytest.raises(ModelError, match="ValueError: broken module"):
        resolve_spec(f"{bad}:make")
    # a sibling import works: the file's folder is on sys.path, once, for the rest of the run
    (tmp_path / "helper_mod_abc.py").write_text("WIDTH = 6\n")
    good = tmp_path / "good.py"
    good.write_text(
        "from torch import nn\nfrom helper_mod_abc import WIDTH\n\n"
        "def make():\n    return nn.BatchNorm1d(WIDTH)\n"
    )
    assert build_model(f"{good}:make").num_features == 6
    assert sys.path.count(str(tmp_path.resolve())) == 1
    sys.modules.pop("helper_mod_abc", None)


def test_parse_kwargs_passthrough():
    assert parse_kwargs(None) == {}
    assert parse_kwargs({"a": 1}) == {"a": 1}
    assert parse_kwargs('{"a": [1, 2]}') == {"a": [1, 2]}

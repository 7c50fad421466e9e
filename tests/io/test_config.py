from __future__ import annotations

import pytest

from bnscope.errors import UsageError
from bnscope.io.config import load_project_config


def test_no_file(tmp_path):
    cfg = load_project_config(tmp_path)
    assert cfg.path is None and cfg.values == {}


def test_bnscope_toml_paths_relative_to_file(tmp_path):
    (tmp_path / "bnscope.toml").write_text(
        'checkpoint = "runs/ckpt.pt"\nmodel = "model.py:make"\ndata = "data/train"\n'
        "batch_size = 16\n[model_kwargs]\nnum_classes = 4\n"
    )
    cfg = load_project_config(tmp_path)
    assert cfg.path == tmp_path / "bnscope.toml"
    assert cfg.get("checkpoint") == str(tmp_path / "runs/ckpt.pt")
    assert cfg.get("model") == f"{tmp_path / 'model.py'}:make"
    assert cfg.get("data") == str(tmp_path / "data/train")
    assert cfg.get("batch_size") == 16
    assert cfg.get("model_kwargs") == {"num_classes": 4}


def test_module_spec_left_alone(tmp_path):
    (tmp_path / "bnscope.toml").write_text('model = "pkg.nets:make"\ndata = "pkg.data:loader"\n')
    cfg = load_project_config(tmp_path)
    assert cfg.get("model") == "pkg.nets:make"
    assert cfg.get("data") == "pkg.data:loader"


def test_pyproject_tool_table(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.bnscope]\nmodel = "m.py:f"\nimage-size = 32\n'
        "model_kwargs = '{\"a\": 1}'\n"
    )
    cfg = load_project_config(tmp_path)
    assert cfg.path == tmp_path / "pyproject.toml"
    assert cfg.get("image_size") == 32
    assert cfg.get("model_kwargs") == {"a": 1}


def test_bnscope_toml_wins(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.bnscope]\nbatch_size = 1\n")
    (tmp_path / "bnscope.toml").write_text("[bnscope]\nbatch_size = 2\n")
    assert load_project_config(tmp_path).get("batch_size") == 2


def test_pyproject_without_table(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_project_config(tmp_path).path is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("trust_checkpoint = true\n", "--trust-checkpoint on the command line"),
        ('colour = "red"\n', "unknown key 'colour'"),
        ('batch_size = "big"\n', "must be int"),
        ("batch_size = true\n", "must be int"),
        ("checkpoint = [\n", "not valid TOML"),
        ("model_kwargs = '{nope'\n", "not valid JSON"),
    ],
)
def test_bad_files(tmp_path, text, fragment):
    (tmp_path / "bnscope.toml").write_text(text)
    with pytest.raises(UsageError) as info:
        load_project_config(tmp_path)
    assert fragment in info.value.line()
    assert "\n" not in info.value.line()

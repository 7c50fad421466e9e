"""What a wheel of this checkout holds, and the files a release needs.

The wheel's packages come from ``[tool.setuptools.packages.find]`` in pyproject.toml. The test
runs setuptools' own discovery for that table (``setuptools.config.expand.find_packages``, what
a build calls) on a checkout as it looks after the README's quick start: the package, and a
``bnscope-demo`` folder beside it (``bnscope demo``'s default). No wheel is built: the test
stays offline and fast.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def discover(root: Path) -> list[str]:
    expand = pytest.importorskip("setuptools.config.expand")
    find = dict(PYPROJECT["tool"]["setuptools"]["packages"]["find"])
    return sorted(expand.find_packages(root_dir=root, **find))


def test_only_bnscope_and_its_subpackages_ship(tmp_path: Path) -> None:
    for folder in ("bnscope", "bnscope/cli", "bnscope/demo"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    # what sits beside the package after the quick start and in a checkout
    (tmp_path / "bnscope-demo" / "data" / "train" / "circle").mkdir(parents=True)
    (tmp_path / "bnscope-demo" / "model.py").write_text("")
    (tmp_path / "bnscope-demo-2").mkdir()
    (tmp_path / "bnscope_scratch").mkdir()
    (tmp_path / "bnscope_scratch" / "__init__.py").write_text("")
    for folder in ("tests", "examples/project", "benchmarks", "docs"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.py").write_text("")
    assert discover(tmp_path) == ["bnscope", "bnscope.cli", "bnscope.demo"]


def test_this_checkout_ships_every_package_under_bnscope() -> None:
    found = discover(ROOT)
    assert all(name == "bnscope" or name.startswith("bnscope.") for name in found), found
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bnscope").rglob("__init__.py")
    }
    assert on_disk <= set(found)
    assert {"bnscope", "bnscope.cli", "bnscope.demo", "bnscope.engine"} <= on_disk


def test_license_changelog_and_project_urls() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == {"text": "MIT"}
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} bnscope contributors$", license_text, re.M)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert changelog.startswith("# Changelog\n") and "\n## [Unreleased]\n" in changelog
    urls = project["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(url.startswith("https://github.com/bnscope/bnscope") for url in urls.values())
    assert urls["Changelog"].endswith("/CHANGELOG.md")

"""The import graph of the package: every module imports only its own layer and the layers below.

Layers, lowest first:

- base: ``errors``, ``records``, ``extras``, ``nn``, ``fmt``, ``findings``, ``version``,
  ``schemas`` (result records, the finding catalog, number formats, the BN modules, the version,
  the JSON Schemas of the documents);
- io: ``bnscope/io`` (checkpoints, data specs, model specs, the project file, atomic files);
- engine: ``bnscope/engine`` (batch protocol, capture, accumulators, collection, evaluation);
- ops: ``bnscope/ops`` (static and dynamic inspect, precise, adapt, ghost, corruptions);
- session: ``bnscope/session.py`` (``bnscope.open``: one checkpoint, model and data),
  ``bnscope/integrations`` (training-loop hooks and callbacks over the ops) and
  ``bnscope/demo`` (builds the demo folder with io and ``ops.corruptions``, then runs the four
  operations through the session: ``demo/walkthrough.py`` imports ``bnscope.session``);
- render: ``bnscope/render`` (tables, JSON, figures, HTML);
- cli: ``bnscope/cli`` (the typer application, one module per command).

``bnscope/__init__.py`` (the public facade, which imports lazily) and ``bnscope/__main__.py``
(``python -m bnscope``) are exempt as importers. No other module imports the package root,
except ``bnscope/cli/app.py`` for ``__version__``.

Imports are read with :mod:`ast` from the source: at any depth (inside functions, under
``TYPE_CHECKING``), and ``importlib.import_module("...")``/``__import__("...")`` calls with a
literal name. Nothing is imported to run these tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bnscope"

LAYERS = ("base", "io", "engine", "ops", "session", "render", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}
#: first component under ``bnscope.`` -> layer
LAYER_OF = {
    "errors": "base",
    "records": "base",
    "extras": "base",
    "nn": "base",
    "nn_prior": "base",
    "nn_frozen": "base",
    "nn_split": "base",
    "fmt": "base",
    "findings": "base",
    "version": "base",
    "schemas": "base",
    "io": "io",
    "engine": "engine",
    "ops": "ops",
    "demo": "session",
    "session": "session",
    "integrations": "session",
    "render": "render",
    "cli": "cli",
}
#: importers that are not checked: the lazy public facade and ``python -m bnscope``
EXEMPT = {"bnscope", "bnscope.__main__"}
#: (importer, name) pairs allowed to import from the package root
ROOT_ALLOWED = {("bnscope.cli.app", "__version__")}
#: user-interface libraries: only render and cli may import them
UI_LIBRARIES = ("rich", "typer", "click", "matplotlib")
#: optional dependencies (extras) and the only modules that may import them
OPTIONAL_LIBRARIES = {"lightning": ("bnscope.integrations.lightning",)}
#: base modules that never import torch at module level
NO_TORCH = (
    "bnscope.errors", "bnscope.records", "bnscope.findings", "bnscope.fmt", "bnscope.version",
    "bnscope.schemas", "bnscope.schemas.build",
)  # fmt: skip


@dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is the absolute module (``bnscope.cli.inspect_cmd``, or
    ``bnscope`` for the package root), ``name`` the attribute taken from it (or None)."""

    importer: str
    path: str
    line: int
    code: str
    target: str
    name: str | None
    module_level: bool
    type_checking: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.code}` -> {self.target}"


# --------------------------------------------------------------------------------------------
# The scanner


def module_name(path: Path) -> tuple[str, bool]:
    """``(dotted module name, is_package)`` of a file under :data:`PKG`."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_modules() -> dict[str, Path]:
    """Every module of the package (packages by their ``__init__.py``), by dotted name."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out[module_name(path)[0]] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def scan_source(
    source: str,
    importer: str,
    *,
    is_package: bool = False,
    path: str = "<string>",
    modules: Iterable[str] = (),
) -> list[Import]:
    """Every import of ``source`` (the module ``importer``), at any depth. ``from X import y``
    counts as an import of ``X.y`` when ``X.y`` is one of ``modules``."""
    known = set(modules)
    tree = ast.parse(source, filename=path)
    found: list[Import] = []

    def add(node: ast.AST, target: str, name: str | None, top: bool, tc: bool) -> None:
        code = " ".join(ast.unparse(node).split())
        line = getattr(node, "lineno", 0)
        found.append(Import(importer, path, line, code, target, name, top, tc))

    def visit(node: ast.AST, top: bool, tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, None, top, tc)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(importer, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    add(node, sub, None, top, tc)
                else:
                    add(node, target, alias.name, top, tc)
        elif isinstance(node, ast.Call) and _literal_import(node) is not None:
            name = _literal_import(node)
            assert name is not None
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve(importer, is_package, level, name.lstrip(".") or None)
            add(node, name, None, top, tc)
        inner_top = top and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        )
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            visit(node.test, inner_top, tc)
            for child in node.body:
                visit(child, inner_top, True)
            for child in node.orelse:
                visit(child, inner_top, tc)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_top, tc)

    visit(tree, True, False)
    return found


def _literal_import(call: ast.Call) -> str | None:
    """The module name of ``importlib.import_module("x")``/``import_module("x")``/
    ``__import__("x")`` with a literal string, else None."""
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )
    if not named or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def layer(module: str) -> str | None:
    """The layer of a ``bnscope`` module (None: the root, or a module with no layer yet)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "bnscope":
        return None
    return LAYER_OF.get(parts[1])


def _is_bnscope(target: str) -> bool:
    return target == "bnscope" or target.startswith("bnscope.")


def _is_library(target: str, names: Iterable[str]) -> bool:
    return any(target == n or target.startswith(n + ".") for n in names)


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """Imports that go up a layer, into the package root, or to a module with no layer."""
    bad = []
    for imp in imports:
        if imp.importer in EXEMPT or not _is_bnscope(imp.target):
            continue
        if imp.target == "bnscope":
            if (imp.importer, imp.name) not in ROOT_ALLOWED:
                bad.append(f"{imp.where()}: imports the package root (bnscope/__init__.py)")
            continue
        own, theirs = layer(imp.importer), layer(imp.target)
        if own is None:
            bad.append(f"{imp.where()}: {imp.importer} has no layer (add it to LAYER_OF)")
        elif theirs is None:
            bad.append(f"{imp.where()}: {imp.target} has no layer (add it to LAYER_OF)")
        elif RANK[theirs] > RANK[own]:
            bad.append(f"{imp.where()}: {own} module imports the {theirs} layer above it")
    return bad


def ui_violations(imports: Iterable[Import]) -> list[str]:
    """Modules below render that import render or a user-interface library."""
    bad = []
    for imp in imports:
        own = layer(imp.importer)
        if imp.importer in EXEMPT or own is None or RANK[own] >= RANK["render"]:
            continue
        if _is_library(imp.target, ("bnscope.render", *UI_LIBRARIES)):
            bad.append(f"{imp.where()}: {own} module imports {imp.target.split('.')[0]}")
    return bad


def _is_command(module: str) -> bool:
    return module.startswith("bnscope.cli.") and module.rsplit(".", 1)[-1].endswith("_cmd")


def command_violations(imports: Iterable[Import]) -> list[str]:
    """``bnscope/cli/*_cmd.py`` modules that import another command module."""
    return [
        f"{imp.where()}: a command module imports another command module"
        for imp in imports
        if _is_command(imp.importer) and _is_command(imp.target) and imp.target != imp.importer
    ]


def optional_violations(imports: Iterable[Import]) -> list[str]:
    """Imports of an optional dependency outside the modules that exist for it."""
    return [
        f"{imp.where()}: {imp.importer} imports the optional dependency {lib}"
        for imp in imports
        for lib, allowed in OPTIONAL_LIBRARIES.items()
        if _is_library(imp.target, (lib,)) and imp.importer not in allowed
    ]


def torch_violations(imports: Iterable[Import]) -> list[str]:
    """Module-level torch imports in the torch-free base modules."""
    return [
        f"{imp.where()}: {imp.importer} imports torch at module level"
        for imp in imports
        if imp.importer in NO_TORCH
        and imp.module_level
        and not imp.type_checking
        and _is_library(imp.target, ("torch",))
    ]


def all_imports() -> list[Import]:
    modules = package_modules()
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        rel = path.relative_to(PKG.parent).as_posix()
        found += scan_source(
            path.read_text(encoding="utf-8"), name, is_package=is_package, path=rel,
            modules=modules,
        )  # fmt: skip
    return found


def _report(bad: list[str]) -> str:
    unique = list(dict.fromkeys(bad))  # one line per import statement and target
    return f"{len(unique)} forbidden import(s):\n" + "\n".join(unique)


# --------------------------------------------------------------------------------------------
# The package


def test_every_module_has_a_layer():
    missing = [
        path.relative_to(PKG.parent).as_posix()
        for name, path in package_modules().items()
        if name not in EXEMPT and layer(name) is None
    ]
    assert not missing, f"modules with no layer (add them to LAYER_OF): {missing}"


def test_imports_only_go_down():
    bad = layer_violations(all_imports())
    assert not bad, _report(bad)


def test_nothing_below_render_imports_render_or_ui_libraries():
    bad = ui_violations(all_imports())
    assert not bad, _report(bad)


def test_command_modules_do_not_import_each_other():
    bad = command_violations(all_imports())
    assert not bad, _report(bad)


def test_optional_dependencies_stay_in_their_modules():
    bad = optional_violations(all_imports())
    assert not bad, _report(bad)
    scan = scan_source("from lightning.pytorch import Trainer\n", "bnscope.ops.fake")
    assert len(optional_violations(scan)) == 1  # the check sees such an import


def test_torch_free_base_modules():
    bad = torch_violations(all_imports())
    assert not bad, _report(bad)


def test_the_scanner_sees_the_package():
    """The scan finds what is known to be there (so an empty scan cannot pass silently)."""
    imports = all_imports()
    targets = {(imp.importer, imp.target) for imp in imports}
    assert ("bnscope.ops.inspect", "bnscope.findings") in targets  # from .. import findings
    assert ("bnscope.cli.corrupt_cmd", "bnscope.cli.options") in targets  # from . import options
    assert any(
        imp.importer == "bnscope.cli.app" and imp.target == "bnscope" for imp in imports
    )  # from .. import __version__, allowed


# --------------------------------------------------------------------------------------------
# The scanner on synthetic modules


def test_scanner_catches_upward_imports():
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from ..errors import DataError\n"  # down: fine
        "from .checkpoint import load_checkpoint\n"  # own layer: fine
        "from ..ops import adapt\n"  # up
        "if TYPE_CHECKING:\n"
        "    from ..session import Job\n"  # up, even if only for types
        "def f():\n"
        "    import importlib\n"
        "    from bnscope.render.tables import precise_report\n"  # up, in a function
        "    return importlib.import_module('matplotlib.pyplot')\n"  # a UI library
        "import rich.console\n"
        "from .. import __version__\n"  # the package root
    )
    imports = scan_source(source, "bnscope.io.fake", path="bnscope/io/fake.py")
    bad = layer_violations(imports)
    assert len(bad) == 4, bad
    assert bad[0].startswith("bnscope/io/fake.py:5: `from ..ops import adapt` -> bnscope.ops")
    assert "io module imports the ops layer" in bad[0]
    assert bad[1].startswith("bnscope/io/fake.py:7: ") and "session layer" in bad[1]
    assert bad[2].startswith("bnscope/io/fake.py:10: ") and "render layer" in bad[2]
    assert bad[3].startswith("bnscope/io/fake.py:13: ") and "package root" in bad[3]
    ui = ui_violations(imports)
    assert [b.split(":")[1] for b in ui] == ["10", "11", "12"], ui
    assert "imports matplotlib" in ui[1] and "imports rich" in ui[2]


def test_scanner_resolves_packages_and_the_allowed_root_import():
    modules = {"bnscope.cli.inspect_cmd", "bnscope.cli.options", "bnscope.findings"}
    imports = scan_source(
        "from . import inspect_cmd, options\nfrom .. import __version__, findings\n",
        "bnscope.cli.demo_cmd",
        path="bnscope/cli/demo_cmd.py",
        modules=modules,
    )
    assert [(i.target, i.name) for i in imports] == [
        ("bnscope.cli.inspect_cmd", None),
        ("bnscope.cli.options", None),
        ("bnscope", "__version__"),
        ("bnscope.findings", None),
    ]
    bad = command_violations(imports)
    assert bad == [
        "bnscope/cli/demo_cmd.py:1: `from . import inspect_cmd, options` -> "
        "bnscope.cli.inspect_cmd: a command module imports another command module"
    ]
    assert [b for b in layer_violations(imports) if "package root" in b]  # not cli/app.py
    app = scan_source("from .. import __version__\n", "bnscope.cli.app", modules=modules)
    assert layer_violations(app) == []
    package = scan_source("from . import run\n", "bnscope.demo", is_package=True)
    assert package[0].target == "bnscope.demo" and package[0].name == "run"


def test_scanner_sees_module_level_torch_only():
    source = (
        "import math\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import torch\n"
        "def f():\n"
        "    import torch\n"
        "try:\n"
        "    from torch import nn\n"
        "except ImportError:\n"
        "    nn = None\n"
    )
    bad = torch_violations(scan_source(source, "bnscope.records", path="bnscope/records.py"))
    assert len(bad) == 1 and bad[0].startswith("bnscope/records.py:8: `from torch import nn`")

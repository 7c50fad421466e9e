"""``pkg.module:factory`` and ``path/to/file.py:factory`` resolution.

The one grammar of these specs (:func:`split_spec`), used for ``--model`` (a factory returning
an ``nn.Module``), for Python ``--data`` specs and for ``--call`` functions, and by the project
file to tell specs from paths.
A model spec whose module is ``torchvision`` or ``timm`` names a model of that library's
registry (``torchvision:resnet50``, ``timm:resnet50``), built by
``torchvision.models.get_model`` or ``timm.create_model`` with the model's keyword arguments
(:func:`library_factory`); neither library is needed otherwise.
Import errors, missing attributes and exceptions raised by the factory all become one-line
:class:`~bnscope.errors.BnscopeError` subclasses naming the spec.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import BnscopeError, ModelError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def split_spec(spec: str) -> tuple[str, str] | None:
    """``(module_or_file, attribute)`` for ``pkg.module:attr`` and ``path/to/file.py:attr``
    (the attribute may be dotted); None for anything else (plain paths, ``C:...``)."""
    if ":" not in spec:
        return None
    target, _, attr = spec.rpartition(":")
    if not attr or not _DOTTED.match(attr):
        return None
    if len(target) == 1 and target.isalpha():  # a Windows drive letter
        return None
    if target.endswith(".py") or _DOTTED.match(target):
        return target, attr
    return None


def is_python_spec(spec: str) -> bool:
    """True for ``pkg.module:attr`` and ``file.py:attr`` (not for plain paths)."""
    return split_spec(spec) is not None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_file(path: Path, error: type[BnscopeError], spec: str) -> Any:
    if not path.is_file():
        raise error(f"{spec}: file {path} not found", "check the path before ':'")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_bnscope_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{spec}: cannot import {path}", "give a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    # The file's folder stays on sys.path for the rest of the run: factories and models import
    # their sibling modules lazily (inside the factory, at forward time, in DataLoader workers).
    add_to_sys_path(path.resolve().parent)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise error(
            f"{spec}: importing {path} failed ({_one_line(exc)})", "fix the error in that file"
        ) from exc
    return module


def _same_dir(entry: str, folder: str) -> bool:
    try:
        return os.path.realpath(entry or os.curdir) == folder
    except (OSError, ValueError):
        return False


def add_to_sys_path(folder: str | Path) -> bool:
    """Put ``folder`` first on ``sys.path`` unless it is already there (in any spelling: '',
    relative, symlinked). Returns True when it was added."""
    resolved = os.path.realpath(folder)
    if any(isinstance(entry, str) and _same_dir(entry, resolved) for entry in sys.path):
        return False
    sys.path.insert(0, resolved)
    importlib.invalidate_caches()
    return True


def resolve_spec(spec: str, error: type[BnscopeError] = ModelError, what: str = "model") -> Any:
    """Import the object a ``pkg.module:attr`` or ``file.py:attr`` spec names."""
    parts = split_spec(spec)
    if parts is None:
        raise error(
            f"{what}={spec!r} is not of the form pkg.module:factory or path/to/file.py:factory",
            "name the module or file, a colon, and the factory function",
        )
    target, attr = parts
    if target.endswith(".py"):
        module = _import_file(Path(target), error, spec)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise error(
                f"{what}={spec}: module {exc.name or target!r} not found",
                "install it or run from the folder that contains it (or use path/to/file.py:NAME)",
            ) from exc
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise error(
                f"{what}={spec}: importing {target} failed ({_one_line(exc)})",
                "fix the error in that module",
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))[:10]
            raise error(
                f"{what}={spec}: {target} has no attribute {attr!r}",
                f"pick one of: {', '.join(names)}" if names else "check the name after ':'",
            )
        obj = getattr(obj, part)
    return obj


#: model registries a ``--model`` spec may name: ``LIBRARY:NAME`` -> how it is installed
LIBRARY_MODELS = {"torchvision": "torchvision", "timm": "timm"}


def library_spec(spec: str) -> tuple[str, str] | None:
    """``(library, name)`` for a model spec of a library's registry (``timm:resnet50``), else
    None. The same grammar as every spec (:func:`split_spec`): ``C:\\x`` is a path and
    ``torchvision.models:resnet50`` an ordinary ``pkg.module:factory`` spec."""
    parts = split_spec(spec)
    if parts is None or parts[0] not in LIBRARY_MODELS:
        return None
    return parts


def _import_library(library: str, spec: str) -> Any:
    """Import ``library`` for ``spec``; not installed, or installed but failing to import (a
    build made for another torch), is one line naming the library and how to install it."""
    package = LIBRARY_MODELS[library]
    try:
        return importlib.import_module(library)
    except ModuleNotFoundError as exc:
        if exc.name == library:
            raise ModelError(
                f"model={spec} names a {library} model, but {library} is not installed",
                f"install it (pip install {package}), or name a factory of your own: "
                "model=pkg.module:factory",
            ) from exc
        failure: BaseException = exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        failure = exc
    import torch

    raise ModelError(
        f"model={spec}: importing {library} failed ({_one_line(failure)})",
        f"install a {library} that works with torch {torch.__version__} "
        f"(pip install --upgrade {package}; torchvision must be the build made for this torch)",
    ) from failure


def library_factory(spec: str) -> Any:
    """The factory of a ``torchvision:NAME`` or ``timm:NAME`` model spec: NAME's builder from
    ``torchvision.models.get_model`` or ``timm.create_model`` (weights are not downloaded
    unless the keyword arguments ask for them: ``weights``, ``pretrained``). A NAME that is not
    in the registry but is an attribute of the package resolves as any ``pkg.module:attr``
    (``timm:create_model``); anything else is one line with the closest model names."""
    parts = library_spec(spec)
    if parts is None:
        raise ValueError(f"{spec!r} is not a torchvision:NAME or timm:NAME spec")
    library, name = parts
    package = _import_library(library, spec)
    if library == "torchvision":
        registry = importlib.import_module("torchvision.models")
        if name.lower() in registry.list_models():
            return functools.partial(registry.get_model, name.lower())
    else:
        registry = package
        if package.is_model(name):
            return functools.partial(package.create_model, name)
    if hasattr(package, name.split(".")[0]):  # an attribute of the package, as before
        return resolve_spec(spec, ModelError, "model")
    names = list(registry.list_models())
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    where = "torchvision.models" if library == "torchvision" else library
    listing = f"{where}.list_models() lists all {len(names)}"
    raise ModelError(
        f"model={spec}: {library} has no model {name!r}",
        f"did you mean {', '.join(close)}? ({listing})" if close else listing,
    )


def parse_kwargs(text: str | dict[str, Any] | None, option: str = "model_kwargs") -> dict:
    """Parse a JSON object of keyword arguments (a dict passes through)."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{option}= is not valid JSON ({exc.msg} at column {exc.colno})",
            "write a JSON object, e.g. '{\"num_classes\": 10}'",
        ) from exc
    if not isinstance(value, dict):
        raise ModelError(
            f"{option}= must be a JSON object, got {type(value).__name__}",
            "write a JSON object, e.g. '{\"num_classes\": 10}'",
        )
    return value


def call_factory(factory: Any, kwargs: dict[str, Any], spec: str, what: str = "model") -> Any:
    """Call a factory with keyword arguments; its exceptions become one-line ModelErrors."""
    if not callable(factory):
        raise ModelError(f"{what}={spec} is not callable", "name a function or class")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ModelError(
            f"{what}={spec} does not accept these keyword arguments ({exc})",
            "check model_kwargs= against the factory's signature",
        ) from exc
    except ValueError:
        pass  # no signature available (builtins): just call it
    try:
        return factory(**kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ModelError(
            f"{what}={spec} raised {_one_line(exc)}",
            "fix the factory or its model_kwargs=",
        ) from exc


def build_model(spec: str, kwargs: str | dict[str, Any] | None = None) -> Any:
    """Resolve ``spec`` (``pkg.module:factory``, ``file.py:factory``, ``torchvision:NAME``,
    ``timm:NAME``), call it with ``kwargs`` and check it returns an ``nn.Module``."""
    from torch import nn

    params = parse_kwargs(kwargs)
    if library_spec(spec) is not None:
        factory = library_factory(spec)
    else:
        factory = resolve_spec(spec, ModelError, "model")
    if isinstance(factory, nn.Module):
        if params:
            raise ModelError(
                f"model={spec} is a module instance, not a factory",
                "drop model_kwargs= or point at a factory",
            )
        return factory
    model = call_factory(factory, params, spec)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model={spec} returned {type(model).__name__}, not a torch.nn.Module",
            "point model= at a function or class that builds the model",
        )
    return model

"""Project file: ``bnscope.toml`` or ``[tool.bnscope]`` in ``pyproject.toml``.

The keys, their types and the rules are in docs/cli.md, section 10.

The file in the working directory sets defaults so that ``bnscope precise --batches 100`` works
with no path. Flags always override it. ``trust_checkpoint`` is deliberately not accepted: a
project file that came with a downloaded repository must not switch on code execution.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from ..errors import UsageError

#: key -> accepted Python types
ALLOWED_KEYS: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,),
    "key": (str,),
    "model": (str,),
    "model_kwargs": (dict, str),
    "data": (str,),
    "eval_data": (str,),
    "call": (str,),
    "input_key": (str,),
    "batch_size": (int,),
    "workers": (int,),
    "drop_last": (bool,),
    "skip_unreadable": (bool,),
    "image_size": (int,),
    "resize": (int,),
    "channels": (int,),
    "mean": (list, str),
    "std": (list, str),
    "amp": (str,),
    "channels_last": (bool,),
}


#: accepted spellings of ``amp`` (as for ``--amp``) and what they mean
AMP_VALUES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


@dataclass(frozen=True)
class ProjectConfig:
    """Settings read from a project file; ``path`` is None when no file was found."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def _validate(values: dict[str, Any], source: Path, table: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = source.parent
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in ALLOWED_KEYS:
            hint = (
                "pass --trust-checkpoint on the command line instead"
                if norm == "trust_checkpoint"
                else f"allowed keys: {', '.join(ALLOWED_KEYS)}"
            )
            raise UsageError(f"{source}: unknown key {key!r} in {table}", hint)
        types = ALLOWED_KEYS[norm]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise UsageError(
                f"{source}: {table} key {key!r} must be {names}, got {type(value).__name__}",
                "fix the project file",
            )
        if norm == "amp" and str(value).strip().lower() not in AMP_VALUES:
            raise UsageError(
                f"{source}: {table} key 'amp' must be \"bf16\" or \"fp16\", got {value!r}",
                "fix the project file",
            )
        if norm == "model_kwargs" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{source}: model_kwargs is not valid JSON ({exc.msg})",
                    "write a TOML table or a JSON object string",
                ) from exc
        if norm in ("checkpoint", "model", "data", "eval_data", "call"):
            value = _relative_to(value, base)
        out[norm] = value
    return out


def _relative_to(value: str, base: Path) -> str:
    """Paths in the file are relative to the file's folder (Python specs are left alone)."""
    from .modelspec import split_spec

    parts = split_spec(value)
    if parts is not None and not parts[0].endswith(".py"):
        return value
    if parts is not None:
        target, attr = parts
        p = Path(target)
        return f"{p if p.is_absolute() else base / p}:{attr}"
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc})", "fix the project file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror})", "check its permissions") from exc


def load_project_config(cwd: str | Path | None = None) -> ProjectConfig:
    """Read ``bnscope.toml`` (all keys at top level or under ``[bnscope]``) or
    ``pyproject.toml``'s ``[tool.bnscope]`` from ``cwd``; ``bnscope.toml`` wins."""
    folder = Path(cwd) if cwd is not None else Path.cwd()
    own = folder / "bnscope.toml"
    if own.is_file():
        data = _read_toml(own)
        if set(data) == {"bnscope"} and isinstance(data["bnscope"], dict):
            data = data["bnscope"]
        return ProjectConfig(own, _validate(data, own, "bnscope.toml"))
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        data = _read_toml(pyproject)
        section = data.get("tool", {}).get("bnscope")
        if isinstance(section, dict):
            return ProjectConfig(pyproject, _validate(section, pyproject, "[tool.bnscope]"))
    return ProjectConfig()

"""The JSON Schemas of the documents bnscope writes (``--json``, ``report.json``).

One file per command, ``bnscope/schemas/<command>.schema.json`` (JSON Schema draft 2020-12),
for the documents whose ``schema`` is ``"bnscope.<command>/2"``: ``inspect`` (static and
dynamic), ``precise``, ``adapt``, ``ghost``, ``leakage``, ``corrupt`` and ``demo``. Each file
stands alone.
:func:`schema` returns one as a dict, ready for any validator::

    import jsonschema, bnscope
    jsonschema.validate(doc, bnscope.schema(doc["schema"]))

The files are written from :mod:`bnscope.schemas.build`.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..errors import UsageError
from ..records import SCHEMA_VERSION

#: the commands that write a JSON document
COMMANDS = ("inspect", "precise", "adapt", "ghost", "leakage", "corrupt", "demo")

__all__ = ["COMMANDS", "schema"]


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of ``command``'s documents, as a new dict. ``command`` is a command name
    (``"precise"``) or a document's ``schema`` (``"bnscope.precise/2"``)."""
    name = command
    if isinstance(command, str) and command.startswith("bnscope.") and "/" in command:
        name, _, version = command[len("bnscope.") :].partition("/")
        if name in COMMANDS and version != str(SCHEMA_VERSION):
            raise UsageError(
                f"no JSON schema for command={command!r}: this bnscope writes "
                f"bnscope.{name}/{SCHEMA_VERSION} documents",
                f"validate with an older bnscope's schema, or pass command={name!r}",
            )
    if name not in COMMANDS:
        raise UsageError(
            f"no JSON schema for command={command!r}",
            f"pass one of: {', '.join(COMMANDS)}, or a document's schema "
            f"('bnscope.precise/{SCHEMA_VERSION}')",
        )
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded

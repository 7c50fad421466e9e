"""Every JSON document against the JSON Schema shipped for it (``bnscope.schema``)."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema

import bnscope


@functools.cache
def validator(schema_id: str) -> jsonschema.Draft202012Validator:
    """The validator of the documents whose ``schema`` is ``schema_id``."""
    schema = bnscope.schema(schema_id)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: dict[str, Any], against: str | None = None) -> list[str]:
    """Every way ``doc`` breaks the schema ``against`` (default: the one it names), as
    ``path: message``; empty when it validates."""
    found = validator(against or doc["schema"]).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found)


def check_document(doc: dict[str, Any]) -> None:
    """Assert that ``doc`` validates against the schema its ``schema`` names."""
    errors = schema_errors(doc)
    assert not errors, "\n".join(errors)

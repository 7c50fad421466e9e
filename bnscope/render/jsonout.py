"""The ``--json`` document and ``report.json`` (the same object)."""

from __future__ import annotations

import json
from typing import Any

from ..records import Report


def report_json(report: Report | dict[str, Any]) -> str:
    """Serialize a report as one JSON document (strict: no NaN literals)."""
    data = report.to_dict() if isinstance(report, Report) else report
    return json.dumps(data, indent=2, allow_nan=False) + "\n"

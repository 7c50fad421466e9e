"""The types that reach the user: status and severity enums, keyword-only records, typed
report extras (and, when mypy is installed, that a type checker sees them)."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import get_type_hints

import pytest
import torch
from torch import nn

from bnscope import extras, records
from bnscope.records import (
    SEVERITIES,
    AdaptLayer,
    DomainLayer,
    Finding,
    GhostLayer,
    GhostLayerSize,
    GhostSize,
    InspectLayer,
    LeakageArrangement,
    LeakageLayer,
    LeakageLayerArrangement,
    PreciseLayer,
    Report,
    Severity,
    StaticLayer,
    Status,
    severity_rank,
)

ROOT = Path(__file__).resolve().parents[2]

#: the strings reports have always carried (JSON documents, tests, scripts compare them)
OLD_STATUSES = {
    "ok", "stale", "noisy", "unknown", "updated", "frozen", "analysed", "not-called", "skipped",
    "kept",  # adapt's layers after first_layers (added with partial adaptation)
}  # fmt: skip
OLD_SEVERITIES = ("info", "warning", "error")

RECORD_TYPES = (
    Finding, StaticLayer, PreciseLayer, AdaptLayer, InspectLayer, GhostLayer, GhostLayerSize,
    GhostSize, LeakageLayer, LeakageLayerArrangement, LeakageArrangement, Report, DomainLayer,
)  # fmt: skip


def test_enum_values_are_the_old_strings():
    assert {s.value for s in Status} == OLD_STATUSES
    assert tuple(s.value for s in Severity) == OLD_SEVERITIES
    for member in (*Status, *Severity):
        assert member == member.value and member.value == member
        assert isinstance(member, str)
        assert hash(member) == hash(member.value)
        assert {member.value: 1}[member] == 1
        assert str(member) == f"{member}" == f"{member:s}" == member.value
        assert json.dumps(member) == json.dumps(member.value)
        assert json.dumps({member: [member]}) == json.dumps({member.value: [member.value]})
    assert Status("not-called") is Status.NOT_CALLED


def test_severities_keep_order_and_rank():
    assert SEVERITIES == OLD_SEVERITIES
    assert ", ".join(SEVERITIES) == "info, warning, error"
    assert [severity_rank(s) for s in OLD_SEVERITIES] == [0, 1, 2]
    assert [severity_rank(s) for s in Severity] == [0, 1, 2]
    with pytest.raises(ValueError):
        severity_rank("fatal")


def _finding(severity: str) -> Finding:
    return Finding(code="reused", severity=severity, layer="bn", message="m", fix="f")


def test_finding_stores_the_member_and_serializes_the_string():
    f = _finding("warning")
    assert f.severity is Severity.WARNING and f.severity == "warning"
    d = f.to_dict()
    assert d["severity"] == "warning" and type(d["severity"]) is str
    assert json.dumps(d) == json.dumps(
        {"code": "reused", "severity": "warning", "layer": "bn", "message": "m", "fix": "f"}
    )
    with pytest.raises(ValueError, match="unknown severity"):
        _finding("fatal")
    rep = Report(
        command="inspect",
        checkpoint=None,
        layers=(),
        findings=(_finding("info"), _finding("error"), _finding("warning")),
    )
    assert rep.worst_severity() is Severity.ERROR


def test_layer_status_is_coerced_and_checked_per_record_kind():
    rec = PreciseLayer(name="bn", num_features=2, status="not-called")
    assert rec.status is Status.NOT_CALLED and rec.reason is None
    d = rec.to_dict()
    assert d["status"] == "not-called" and type(d["status"]) is str
    # every kind accepts what its operation produces, and nothing else
    assert PreciseLayer.STATUSES == {
        Status.UPDATED, Status.FROZEN, Status.NOT_CALLED, Status.SKIPPED,
    }  # fmt: skip
    assert AdaptLayer.STATUSES == PreciseLayer.STATUSES | {Status.KEPT}
    assert InspectLayer.STATUSES == {
        Status.OK, Status.STALE, Status.NOISY, Status.UNKNOWN, Status.FROZEN, Status.NOT_CALLED,
        Status.SKIPPED,
    }  # fmt: skip
    assert GhostLayer.STATUSES == {Status.ANALYSED, Status.NOT_CALLED, Status.SKIPPED}
    assert GhostSize.STATUSES == {Status.OK, Status.SKIPPED}
    with pytest.raises(ValueError, match="unknown GhostLayer status 'updated'"):
        GhostLayer(name="bn", num_features=2, status="updated")
    with pytest.raises(ValueError, match="status 'fresh'"):
        InspectLayer(name="bn", num_features=2, status="fresh")
    # replace() goes through the same check
    assert dataclasses.replace(rec, status="updated").status is Status.UPDATED


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
def test_records_are_keyword_only(cls):
    params = dataclasses.fields(cls)
    assert all(f.kw_only for f in params), [f.name for f in params if not f.kw_only]
    with pytest.raises(TypeError, match="positional"):
        cls(*range(len(params)))


def _keys(typed_dict: type) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def _data(n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 6, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]  # fmt: skip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_every_extra_key_an_operation_writes_is_declared():
    from bnscope.ops.adapt import adapt_bn
    from bnscope.ops.ghost import ghost_analysis
    from bnscope.ops.inspect import inspect
    from bnscope.ops.leakage import leakage_analysis
    from bnscope.ops.precise import precise_bn
    from bnscope.ops.static import static_inspect

    data = _data()
    reports = {
        extras.StaticExtra: static_inspect(_model().state_dict()),
        extras.InspectExtra: inspect(_model(), data),
        extras.PreciseExtra: precise_bn(_model(), data),
        extras.AdaptExtra: adapt_bn(_model(), data, prior=4),
        extras.GhostExtra: ghost_analysis(_model(), data, [2, 8, 32]),
        extras.LeakageExtra: leakage_analysis(_model(), data, batch_size=8),
    }
    for typed, rep in reports.items():
        assert set(rep.extra) <= _keys(typed), (typed.__name__, set(rep.extra) - _keys(typed))
    ins = reports[extras.InspectExtra].extra
    gho = reports[extras.GhostExtra].extra
    for metrics in (ins["metrics"], gho["metrics"]):  # a library report: no data description
        assert set(metrics) == _keys(extras.ReportMetrics) - {"data"}
        for variant in metrics["variants"].values():
            assert set(variant) == _keys(extras.VariantMetrics)
    assert all(set(row) == _keys(extras.GhostSizeDict) for row in gho["sizes"])
    assert [row["status"] for row in gho["sizes"]] == ["ok", "ok", "skipped"]
    # a ghost size carries the metric keys of a variant (against population statistics)
    assert _keys(extras.VariantMetrics) <= _keys(extras.GhostSizeDict)
    # the dict forms are the records' to_dict()
    assert _keys(extras.GhostSizeDict) == set(records.field_names(GhostSize))
    leakage = reports[extras.LeakageExtra].extra
    assert set(leakage) == _keys(extras.LeakageExtra) - _keys(extras.RunExtra)
    assert _keys(extras.LeakageArrangementDict) == set(records.field_names(LeakageArrangement))
    assert all(set(row) == _keys(extras.LeakageArrangementDict) for row in leakage["arrangements"])


def test_job_keys_are_declared():
    """The keys a job on a checkpoint file adds (DESIGN §2), for every model-running
    command, and the network listing of a checkpoint holding several networks."""
    run = _keys(extras.RunExtra)
    assert {"format", "key", "prefix", "model", "project_file", "networks", "ema_key"} <= run
    assert {"data", "dropped_samples", "dropped_reason", "device", "amp", "channels_last"} <= run
    for typed in (extras.InspectExtra, extras.PreciseExtra, extras.AdaptExtra, extras.GhostExtra,
                  extras.LeakageExtra):  # fmt: skip
        assert run <= _keys(typed)
    assert {"metrics", "output"} <= _keys(extras.PreciseExtra) & _keys(extras.AdaptExtra)
    assert _keys(extras.SourceExtra) <= _keys(extras.StaticExtra)
    from bnscope.io.statedict import Network

    assert set(Network(key="k", prefix="p.", bn_layers=1).to_dict()) == _keys(extras.NetworkDict)


def test_report_aliases_name_the_record_and_extra_types():
    hints = get_type_hints(records.Report)
    assert set(hints) >= {"command", "checkpoint", "layers", "findings", "extra", "arrays"}
    assert extras.PreciseReport.__args__ == (PreciseLayer, extras.PreciseExtra)
    assert extras.GhostReport.__args__ == (GhostLayer, extras.GhostExtra)
    assert extras.LeakageReport.__args__ == (LeakageLayer, extras.LeakageExtra)
    assert extras.StaticReport.__args__ == (StaticLayer, extras.StaticExtra)


SNIPPET = '''
from bnscope.extras import PreciseReport
from bnscope.records import PreciseLayer, Severity, Status


def batches(rep: PreciseReport) -> int:
    status: Status = rep.layers[0].status
    worst: Severity | None = rep.worst_severity()
    assert status and worst
    return rep.extra["batches"]


def wrong_key(rep: PreciseReport) -> object:
    return rep.extra["batchez"]  # line 14


PreciseLayer("bn", 4, Status.UPDATED)  # line 17
'''


def test_mypy_sees_the_types(tmp_path):
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e .[dev])")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    # only the two modules the snippet uses, not the package (that is CI's full mypy run)
    stdout, stderr, _ = api.run([
        "--python-version", "3.10", "--follow-imports", "skip", "--no-error-summary",
        "--cache-dir", str(tmp_path / "cache"), "--config-file", "",
        str(ROOT / "bnscope" / "records.py"), str(ROOT / "bnscope" / "extras.py"), str(snippet),
    ])  # fmt: skip
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, stdout + stderr
    assert "snippet.py:14:" in errors[0] and '"batchez"' in errors[0]
    assert "snippet.py:17:" in errors[1] and "positional" in errors[1].lower()


def test_the_public_api_has_real_signatures_for_type_checkers(tmp_path):
    """``bnscope.precise_bn`` and ``bnscope.open`` are imported lazily at run time; a type
    checker sees their real signatures (the imports under ``TYPE_CHECKING``), not ``Any``."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e .[dev])")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "import bnscope\n"
        "reveal_type(bnscope.precise_bn)\n"
        "reveal_type(bnscope.open)\n"
        "reveal_type(bnscope.open('ckpt.pt').precise())\n"
    )
    stdout, stderr, _ = api.run([
        "--python-version", "3.10", "--no-error-summary", "--config-file", "",
        "--cache-dir", str(tmp_path / "cache"), "--follow-imports", "silent",
        "--python-executable", sys.executable, str(snippet),
    ])  # fmt: skip
    revealed = [line for line in stdout.splitlines() if "Revealed type is" in line]
    assert len(revealed) == 3, stdout + stderr
    assert 'Revealed type is "def (model: torch.nn.modules.module.Module, data:' in revealed[0]
    assert "-> bnscope.records.Report[bnscope.records.PreciseLayer" in revealed[0]
    assert "model: str | torch.nn.modules.module.Module | None =" in revealed[1]
    assert 'Revealed type is "bnscope.session.Result"' in revealed[2]

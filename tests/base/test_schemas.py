"""The JSON Schemas shipped in the package: the files, ``bnscope.schema``, and that they list
exactly the keys the records and typed extras can hold (so a valid document never fails for a
key the schema forgot, and a renamed key always does)."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import jsonschema
import pytest

import bnscope
from bnscope import extras, records
from bnscope.errors import UsageError
from bnscope.records import (
    FINDING_CODES,
    SCHEMA_VERSION,
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
    StaticLayer,
)
from bnscope.schemas import COMMANDS, build

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "bnscope" / "schemas"
HEAD = {"schema", "bnscope_version", "command", "checkpoint", "layers", "findings"}


def _keys(typed_dict: type) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def _defs(command: str) -> dict:
    return bnscope.schema(command)["$defs"]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_files_are_what_build_writes(command):
    path = FOLDER / f"{command}.schema.json"
    assert path.read_text(encoding="utf-8") == build.schema_text(command), (
        f"{path.name} is out of date: run python -m bnscope.schemas.build"
    )
    assert sorted(p.name for p in FOLDER.glob("*.json")) == sorted(
        f"{c}.schema.json" for c in COMMANDS
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_each_schema_is_draft_2020_12_and_names_its_document(command):
    schema = bnscope.schema(command)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == records.schema_id(command) == f"bnscope.{command}/{SCHEMA_VERSION}"
    # every $ref resolves inside the file: each file stands alone
    for name in build._refs(schema):
        assert name in schema["$defs"], name


def test_schema_accepts_a_command_or_a_document_id_and_returns_a_copy():
    assert bnscope.schema("bnscope.ghost/2") == bnscope.schema("ghost")
    first = bnscope.schema("precise")
    first["title"] = "changed"
    assert bnscope.schema("precise")["title"] == "bnscope.precise/2"
    with pytest.raises(UsageError, match=r"no JSON schema for command='nope'.*one of: inspect"):
        bnscope.schema("nope")
    with pytest.raises(UsageError, match=r"command='bnscope.precise/1'.*writes bnscope.precise/2"):
        bnscope.schema("bnscope.precise/1")
    with pytest.raises(UsageError, match="no JSON schema"):
        bnscope.schema("bnscope.train/2")


def test_the_schemas_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["bnscope"]
    for path in FOLDER.glob("*.json"):
        rel = path.relative_to(ROOT / "bnscope").as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns), rel
    assert "jsonschema" in " ".join(config["project"]["optional-dependencies"]["dev"])


# --------------------------------------------------------------------------------------------
# The schemas against the code


RECORD_DEFS = {
    "static_layer": StaticLayer,
    "precise_layer": PreciseLayer,
    "adapt_layer": AdaptLayer,
    "domain_layer": DomainLayer,
    "inspect_layer": InspectLayer,
    "ghost_layer": GhostLayer,
    "ghost_layer_size": GhostLayerSize,
    "ghost_size": GhostSize,
    "leakage_layer": LeakageLayer,
    "leakage_layer_arrangement": LeakageLayerArrangement,
    "leakage_arrangement": LeakageArrangement,
    "finding": Finding,
}


@pytest.mark.parametrize("name", RECORD_DEFS)
def test_record_schemas_list_every_field_and_require_them(name):
    record = RECORD_DEFS[name]
    definition = build.DEFS[name]
    # to_dict() writes every field, so every field is required, and nothing else is allowed
    assert list(definition["properties"]) == records.field_names(record)
    assert definition["required"] == records.field_names(record)
    assert definition["additionalProperties"] is False
    statuses = getattr(record, "STATUSES", None)
    if statuses is not None and "status" in definition["properties"]:
        assert set(definition["properties"]["status"]["enum"]) == {s.value for s in statuses}


def test_finding_codes_severities_and_corruptions_match_the_code():
    from bnscope.ops.corruptions import CORRUPTIONS

    finding = build.DEFS["finding"]["properties"]
    assert finding["code"]["enum"] == list(FINDING_CODES)
    assert finding["severity"]["enum"] == list(records.SEVERITIES)
    corrupt = bnscope.schema("corrupt")["properties"]
    assert corrupt["corruption"]["enum"] == list(CORRUPTIONS)


DOCUMENTS = {
    "inspect_static": extras.StaticExtra,
    "inspect_dynamic": extras.InspectExtra,
    "precise": extras.PreciseExtra,
    "adapt": extras.AdaptExtra,
    "adapt_domains": extras.DomainsExtra,
    "ghost": extras.GhostExtra,
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_schemas_list_exactly_the_typed_keys(name):
    where = {"inspect_static": "inspect", "adapt_domains": "adapt"}.get(name, "demo")
    definition = _defs(where)[name]
    # report_files: added by the report folder's writer (render.reports.report_document)
    assert set(definition["properties"]) == HEAD | _keys(DOCUMENTS[name]) | {"report_files"}
    assert "report_files" not in definition["required"]
    assert definition["additionalProperties"] is False
    assert HEAD <= set(definition["required"])
    # the keys every job adds are optional (a library report has none of them) ...
    source = _keys(extras.SourceExtra)
    assert not source & set(definition["required"])
    # ... but come together
    groups = definition["dependentRequired"]
    assert set(groups["format"]) >= {"key", "prefix"}
    if name != "inspect_static":
        assert set(groups["device"]) >= {"model", "project_file", "amp", "channels_last"}
        assert set(groups["data"]) == {"dropped_samples", "dropped_reason"}


def test_a_domain_entry_lists_the_typed_keys():
    entry = _defs("adapt")["domain_entry"]
    assert set(entry["properties"]) == _keys(extras.DomainDict)
    assert entry["additionalProperties"] is False
    job_keys = {"dropped_samples", "dropped_reason", "output"}  # a job adds them with data
    assert set(entry["dependentRequired"]["data"]) == job_keys


def test_the_leakage_document_lists_exactly_the_typed_keys():
    definition = bnscope.schema("leakage")
    assert set(definition["properties"]) == HEAD | _keys(extras.LeakageExtra) | {"report_files"}
    assert definition["additionalProperties"] is False and HEAD <= set(definition["required"])
    assert not _keys(extras.SourceExtra) & set(definition["required"])
    assert set(definition["dependentRequired"]["data"]) == {"dropped_samples", "dropped_reason"}
    row = build.DEFS["leakage_arrangement"]["properties"]
    assert set(row) == _keys(extras.LeakageArrangementDict)


def test_metrics_have_one_layout_in_every_command():
    variant = build.DEFS["variant"]
    assert set(variant["properties"]) == set(variant["required"]) == _keys(extras.VariantMetrics)
    assert _keys(extras.VariantMetrics) == {"accuracy", "loss", "agreement", "kl", "rel_diff"}
    # a ghost size holds the same metric keys (against population statistics)
    assert _keys(extras.VariantMetrics) <= set(build.DEFS["ghost_size"]["properties"])
    defs = _defs("demo")
    names = {"inspect_dynamic": "inspect", "precise": "precise", "adapt": "adapt", "ghost": "ghost"}
    for doc, command in names.items():
        metrics = defs[doc]["properties"]["metrics"]
        assert set(metrics["properties"]) == _keys(extras.ReportMetrics)
        assert metrics["additionalProperties"] is False
        variants, reference = build.VARIANTS[command]
        assert metrics["properties"]["reference"] == {"const": reference}
        inner = metrics["properties"]["variants"]
        optional = build.OPTIONAL_VARIANTS.get(command, [])
        assert list(inner["properties"]) == variants
        assert inner["required"] == [v for v in variants if v not in optional]
        assert all(v == {"$ref": "#/$defs/variant"} for v in inner["properties"].values())
    # the same concept has the same name: the checkpoint's running statistics are "running"
    # wherever they are compared, population statistics "precise", test-batch ones "batch"
    assert build.VARIANTS["precise"][0] == ["running", "precise"]
    assert build.VARIANTS["adapt"][0] == ["running", "adapted", "batch", "prior"]
    assert build.OPTIONAL_VARIANTS == {"adapt": ["prior"]}  # with online_prior only
    assert build.VARIANTS["inspect"][0] == ["running", "precise", "batch"]


def test_network_and_demo_build_schemas_match_their_dicts(tmp_path):
    from bnscope.demo.run import DemoBuild
    from bnscope.io.statedict import Network

    network = build.DEFS["network"]
    assert set(network["properties"]) == _keys(extras.NetworkDict)
    assert set(Network(key="k", prefix="p.", bn_layers=1).to_dict()) == _keys(extras.NetworkDict)
    built = DemoBuild(
        folder=tmp_path, checkpoint=tmp_path / "ckpt.pt", model_file=tmp_path / "model.py",
        train_dir=tmp_path / "train", val_dir=tmp_path / "val", counts={"train": 4},
        history=[{"epoch": 1, "loss": 0.5}], seconds={"train": 1.5},
    )  # fmt: skip
    assert list(built.to_dict()) == list(build.DEFS["demo_build"]["properties"])


def test_every_document_starts_with_schema_version_and_command():
    rep = Report(command="precise", checkpoint=None, layers=(), findings=())
    doc = rep.to_dict()
    assert list(doc)[:3] == ["schema", "bnscope_version", "command"]
    assert doc["bnscope_version"] == bnscope.__version__
    assert doc["schema"] == rep.schema == "bnscope.precise/2"
    with pytest.raises(ValueError, match="collides"):
        Report(
            command="precise", checkpoint=None, layers=(), findings=(),
            extra={"bnscope_version": "9"},
        ).to_dict()  # fmt: skip

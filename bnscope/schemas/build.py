"""The JSON Schemas (draft 2020-12) of bnscope's JSON documents, described once here.

Each ``<command>.schema.json`` beside this module is written from :func:`build` by
``python -m bnscope.schemas.build``; ``tests/base/test_schemas.py`` fails when a file differs
from what :func:`build` gives, when a record field, extra key, status, finding code or
corruption is missing from a schema, and when a real document of any command does not
validate. Every file is self-contained: the parts shared between documents (findings, layer
records, the metrics layout, the keys a job adds) are copied into its ``$defs``.

Strictness: every object whose keys are fixed has ``additionalProperties: false`` and lists
the keys that are always present as ``required``, so a renamed or dropped key fails validation.
The keys only a job on a checkpoint file adds (docs/cli.md, section 5) are optional, but come
as a group (``dependentRequired``): a document from :func:`bnscope.open` or the CLI has all
of them, one from a library operation on a live model none. Floats may be the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (the documents never hold a NaN literal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..records import SCHEMA_VERSION
from . import COMMANDS

Schema = dict[str, Any]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Building blocks


def ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or null."""
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: dict[str, Schema],
    required: list[str] | None = None,
    description: str | None = None,
) -> Schema:
    """A closed object: only ``properties``; all of them required unless ``required`` says."""
    out: Schema = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = properties
    out["required"] = list(properties) if required is None else required
    out["additionalProperties"] = False
    return out


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def enum(values: list[str | None], description: str | None = None) -> Schema:
    out: Schema = {"description": description} if description else {}
    out["enum"] = values
    return out


STRING: Schema = {"type": "string"}
OPT_STRING = nullable(STRING)
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
COUNT: Schema = {"type": "integer", "minimum": 0}
REAL = ref("real")
OPT_REAL = nullable(REAL)
FRACTION = ref("fraction")
OPT_FRACTION = nullable(FRACTION)

#: the statuses of each layer record kind (records.py, ``STATUSES``)
STATUSES: dict[str, list[str | None]] = {
    "precise_layer": ["updated", "frozen", "not-called", "skipped"],
    "adapt_layer": ["updated", "kept", "frozen", "not-called", "skipped"],
    "domain_layer": ["updated", "kept", "frozen", "not-called", "skipped"],
    "inspect_layer": ["ok", "stale", "noisy", "unknown", "frozen", "not-called", "skipped"],
    "ghost_layer": ["analysed", "not-called", "skipped"],
    "ghost_size": ["ok", "skipped"],
    "leakage_layer": ["analysed", "not-called", "skipped"],
}
#: records.FINDING_CODES
FINDING_CODES: list[str | None] = [
    "no-batchnorm", "never-updated", "ema-warmup", "tiny-variance", "dead-channel",
    "non-finite", "not-called", "reused", "stale-ema", "train-test-gap", "small-nbs",
    "non-iid-batches", "domain-shift", "domain-divergence",
    "batch-leakage", "momentum-convention", "var-convention", "eps-mismatch",
]  # fmt: skip
#: ops.corruptions.CORRUPTIONS
CORRUPTIONS: list[str | None] = [
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "contrast", "brightness",
    "gaussian_blur", "defocus_blur", "pixelate", "jpeg_compression",
]  # fmt: skip
#: the variants of each command's ``metrics`` and the reference among them
VARIANTS = {
    "precise": (["running", "precise"], "running"),
    "adapt": (["running", "adapted", "batch", "prior"], "running"),
    "inspect": (["running", "precise", "batch"], "running"),
    "ghost": (["precise"], "precise"),
}
#: variants a command's ``metrics`` may leave out (adapt's ``prior``: with ``online_prior``)
OPTIONAL_VARIANTS = {"adapt": ["prior"]}
#: a test-time prior N (PriorBatchNorm): a number >= 0, or "inf" (the source model)
PRIOR_N: Schema = {
    "description": 'pseudo samples of the source statistics; "inf" is the source model',
    "anyOf": [{"type": "number", "minimum": 0}, {"const": "inf"}],
}


def _status(record: str) -> Schema:
    return enum(STATUSES[record])


def _record_head(record: str) -> dict[str, Schema]:
    return {
        "name": {"type": "string", "description": '"(root)" for a model that is a BN layer'},
        "num_features": COUNT,
        "status": _status(record),
        "reason": OPT_STRING,
    }


DEFS: dict[str, Schema] = {
    "real": {
        "description": 'a float; non-finite values are the strings "nan", "inf" and "-inf"',
        "anyOf": [{"type": "number"}, {"enum": ["nan", "inf", "-inf"]}],
    },
    "fraction": {"type": "number", "minimum": 0, "maximum": 1},
    "finding": obj(
        {
            "code": enum(FINDING_CODES),
            "severity": enum(["info", "warning", "error"]),
            "layer": OPT_STRING,
            "message": STRING,
            "fix": STRING,
        },
        description="one finding (docs/statistics.md, section 8)",
    ),
    "network": obj(
        {"key": OPT_STRING, "prefix": STRING, "bn_layers": COUNT, "ema": BOOL, "used": BOOL},
        description="one network of a checkpoint that holds several",
    ),
    "static_layer": obj(
        {
            "name": _record_head("precise_layer")["name"],
            "num_features": COUNT,
            "num_batches_tracked": nullable(INT),
            "momentum": OPT_REAL,
            "momentum_assumed": BOOL,
            "eps": REAL,
            "eps_assumed": BOOL,
            "ema_init_weight": OPT_REAL,
            "affine": BOOL,
            "mean_min": REAL,
            "mean_max": REAL,
            "var_min": REAL,
            "var_max": REAL,
            "gain_min": OPT_REAL,
            "gain_max": OPT_REAL,
            "dead_channels": COUNT,
            "tiny_var_channels": COUNT,
            "nonfinite_values": COUNT,
            "negative_var_channels": COUNT,
            "frozen": BOOL,
        },
        description="records.StaticLayer",
    ),
    "precise_layer": obj(
        {
            **_record_head("precise_layer"),
            "calls": COUNT,
            "calls_per_forward": COUNT,
            "samples": COUNT,
            "elements": COUNT,
            "d_mu_max": OPT_REAL,
            "d_mu_median": OPT_REAL,
            "d_var_max": OPT_REAL,
            "d_var_median": OPT_REAL,
        },
        description="records.PreciseLayer",
    ),
    "adapt_layer": obj(
        {
            **_record_head("adapt_layer"),
            "calls": COUNT,
            "calls_per_forward": COUNT,
            "samples": COUNT,
            "adapted": enum(
                ["mean+var", "mean", "var", None],
                "the statistics the layer received (null: it kept its own)",
            ),
            "weight_source": nullable(FRACTION),
            "d_mu_max": OPT_REAL,
            "d_mu_median": OPT_REAL,
            "d_var_max": OPT_REAL,
            "d_var_median": OPT_REAL,
            "kl_max": OPT_REAL,
            "kl_median": OPT_REAL,
        },
        description="records.AdaptLayer",
    ),
    "inspect_layer": obj(
        {
            **_record_head("inspect_layer"),
            "momentum": OPT_REAL,
            "calls_per_forward": COUNT,
            "batch_calls": COUNT,
            "d_mu_max": OPT_REAL,
            "d_mu_median": OPT_REAL,
            "d_var_max": OPT_REAL,
            "d_var_median": OPT_REAL,
            "z_mu": OPT_REAL,
            "z_var": OPT_REAL,
            "ema_noise_mu": OPT_REAL,
            "batch_spread_mu": OPT_REAL,
            "batch_spread_var": OPT_REAL,
            "d_mu_rms": OPT_REAL,
            "batch_spread_mu_rms": OPT_REAL,
            "var_slope": OPT_REAL,
            "var_convention": enum(
                ["std", "inverse-var", "inverse-std", "scale", None],
                "what running_var holds when it is not variances (docs/statistics.md, "
                "section 11.2)",
            ),
            "var_scale": OPT_REAL,
        },
        description="records.InspectLayer",
    ),
    "ghost_layer_size": obj(
        {
            "size": COUNT,
            "chunks": COUNT,
            "noise_mu": OPT_REAL,
            "noise_var": OPT_REAL,
            "iid_mu": OPT_REAL,
            "iid_var": OPT_REAL,
            "effective_size": OPT_REAL,
        },
        description="records.GhostLayerSize",
    ),
    "ghost_layer": obj(
        {
            **_record_head("ghost_layer"),
            "calls_per_forward": COUNT,
            "sizes": array(ref("ghost_layer_size")),
        },
        description="records.GhostLayer",
    ),
    "ghost_size": obj(
        {
            "size": COUNT,
            "status": _status("ghost_size"),
            "note": OPT_STRING,
            "chunks": COUNT,
            "remainder_chunks": COUNT,
            "remainder_samples": COUNT,
            "accuracy": OPT_FRACTION,
            "loss": OPT_REAL,
            "agreement": OPT_FRACTION,
            "kl": OPT_REAL,
            "rel_diff": OPT_REAL,
            "noise_mu": OPT_REAL,
            "noise_var": OPT_REAL,
            "effective_ratio": OPT_REAL,
        },
        description="records.GhostSize: the model at one ghost size, against population "
        "statistics (the metric keys of a variant, None for a skipped size)",
    ),
    "leakage_layer_arrangement": obj(
        {"arrangement": STRING, "noise_mu": OPT_REAL, "effective_size": OPT_REAL},
        description="records.LeakageLayerArrangement: one BN layer's batch means under one "
        "arrangement",
    ),
    "leakage_layer": obj(
        {
            **_record_head("leakage_layer"),
            "calls_per_forward": COUNT,
            "arrangements": array(ref("leakage_layer_arrangement")),
        },
        description="records.LeakageLayer",
    ),
    "leakage_arrangement": obj(
        {
            "name": STRING,
            "role": enum(["reference", "noise", "grouped"]),
            "group_by": OPT_STRING,
            "groups": nullable(COUNT),
            "largest_group": nullable(COUNT),
            "single_group_batches": nullable(COUNT),
            "accuracy": OPT_FRACTION,
            "loss": OPT_REAL,
            "agreement": OPT_FRACTION,
            "kl_mean": OPT_REAL,
            "kl_median": OPT_REAL,
            "l2_mean": OPT_REAL,
            "l2_median": OPT_REAL,
            "ratio": OPT_REAL,
            "excess": OPT_REAL,
            "greater_fraction": OPT_FRACTION,
            "leak": nullable(BOOL),
        },
        description="records.LeakageArrangement: the model's train-mode outputs with the "
        "samples arranged one way, against the iid arrangement (docs/statistics.md, section 10)",
    ),
    "variant": obj(
        {
            "accuracy": OPT_FRACTION,
            "loss": OPT_REAL,
            "agreement": OPT_FRACTION,
            "kl": OPT_REAL,
            "rel_diff": REAL,
        },
        description="one variant against the reference variant (docs/statistics.md, "
        "section 9): accuracy and loss need labels, agreement and kl class scores",
    ),
    "online_prior_row": obj(
        {
            "prior": PRIOR_N,
            "accuracy": OPT_FRACTION,
            "loss": OPT_REAL,
            "agreement": OPT_FRACTION,
            "kl": OPT_REAL,
            "rel_diff": REAL,
        },
        description="extras.OnlinePriorDict: the model with PriorBatchNorm layers of N = prior "
        "pseudo samples on the evaluation data, against the variant running",
    ),
    "label_mix": obj(
        {
            "batches": COUNT,
            "samples": COUNT,
            "classes": COUNT,
            "mean_batch_size": REAL,
            "single_class_batches": COUNT,
            "chi2": REAL,
            "df": COUNT,
            "ratio": OPT_REAL,
            "effective_size": OPT_REAL,
            "p_value": OPT_REAL,
        },
        description="extras.LabelMixDict: the class mix of the labelled batches against random "
        "batches (docs/statistics.md, section 2.8); null without labels",
    ),
    "domain_layer": obj(
        {
            **_record_head("domain_layer"),
            "divergence": nullable(
                array(array(OPT_REAL))
                | {
                    "description": "median symmetric KL between the statistics of "
                    "divergence_labels[i] and [j]; symmetric, 0 on the diagonal"
                }
            ),
            "pair": nullable(
                array(STRING)
                | {"minItems": 2, "maxItems": 2, "description": "the most divergent domains"}
            ),
            "pair_kl": OPT_REAL,
        },
        description="records.DomainLayer",
    ),
    "domain_entry": obj(
        {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
            "batches": COUNT,
            "samples": COUNT,
            "label_mix": nullable(ref("label_mix")),
            "layers": array(ref("adapt_layer")),
            "data": STRING,
            "dropped_samples": COUNT,
            "dropped_reason": OPT_STRING,
            "output": OPT_STRING,
        },
        required=["name", "batches", "samples", "label_mix", "layers"],
        description="extras.DomainDict: one target domain of adapt with several domains",
    )
    | {"dependentRequired": {"data": ["dropped_samples", "dropped_reason", "output"]}},
    "eps_check": obj(
        {
            "eps": OPT_REAL,
            "other_eps": OPT_REAL,
            "layers": COUNT,
            "channels": COUNT,
            "max_gain_ratio": OPT_REAL,
            "evaluated": BOOL,
            "variant": nullable(ref("variant")),
        },
        description="extras.EpsCheckDict: the eps of most BN layers against the other "
        "framework's (docs/statistics.md, section 11.3); variant: the model with the other eps "
        "against running, when it was evaluated",
    ),
    "demo_build": obj(
        {
            "folder": STRING,
            "checkpoint": STRING,
            "model_file": STRING,
            "train": STRING,
            "val": STRING,
            "counts": {"type": "object", "additionalProperties": COUNT},
            "history": array({"type": "object", "additionalProperties": REAL}),
            "seconds": {"type": "object", "additionalProperties": REAL},
        },
        description="what bnscope demo built",
    ),
}

# --------------------------------------------------------------------------------------------
# Documents


def _header(command: str) -> dict[str, Schema]:
    return {
        "schema": {"const": f"bnscope.{command}/{SCHEMA_VERSION}"},
        "bnscope_version": {
            "type": "string",
            "pattern": "^[0-9]+\\.[0-9]+",
            "description": "the bnscope version that wrote the document",
        },
        "command": {"const": command},
    }


def _report_head(command: str, layer: str) -> dict[str, Schema]:
    return {
        **_header(command),
        "checkpoint": nullable(STRING),
        "layers": array(ref(layer)),
        "findings": array(ref("finding")),
    }


SOURCE_KEYS: dict[str, Schema] = {
    "format": enum(["torch", "safetensors", "module", "torchscript"]),
    "key": OPT_STRING,
    "prefix": STRING,
    "model": OPT_STRING,
    "project_file": OPT_STRING,
    "networks": array(ref("network")),
    "ema_key": OPT_STRING,
}
RUN_KEYS: dict[str, Schema] = {
    "data": STRING,
    "dropped_samples": COUNT,
    "dropped_reason": OPT_STRING,
    "device": STRING,
    "amp": enum(["bf16", "fp16", None]),
    "channels_last": BOOL,
}
HEAD_REQUIRED = ["schema", "bnscope_version", "command", "checkpoint", "layers", "findings"]
#: the keys a job adds come together
NETWORK_GROUP = {"networks": ["ema_key"], "ema_key": ["networks"]}
RUN_GROUPS = {
    "format": ["key", "prefix"],
    "device": ["model", "project_file", "amp", "channels_last"],
    "data": ["dropped_samples", "dropped_reason"],
    **NETWORK_GROUP,
}


def _metrics(command: str) -> Schema:
    """The ``metrics`` layout, the same in every command; its variants differ."""
    variants, reference = VARIANTS[command]
    optional = OPTIONAL_VARIANTS.get(command, [])
    data_always = command in ("precise", "adapt")  # only a job evaluates
    return obj(
        {
            "data": {"type": "string", "description": "the data the metrics were measured on"},
            "samples": COUNT,
            "has_labels": BOOL,
            "reference": {"const": reference},
            "variants": obj(
                {name: ref("variant") for name in variants},
                required=[name for name in variants if name not in optional],
                description="named after the statistics the BN layers normalize with",
            ),
        },
        required=(["data"] if data_always else []) + ["samples", "has_labels", "reference",
                                                       "variants"],  # fmt: skip
    )


def _document(
    command: str,
    layer: str,
    own: dict[str, Schema],
    own_required: list[str],
    groups: dict[str, list[str]],
    run: bool = True,
) -> Schema:
    properties = {**_report_head(command, layer), **SOURCE_KEYS, **(RUN_KEYS if run else {})}
    properties.update(own)
    # written with a report folder (--report-dir; write_report): the files of that folder
    properties["report_files"] = {
        **array(STRING),
        "uniqueItems": True,
        "description": "the files of the report folder this document was written into",
    }
    out = obj(properties, required=HEAD_REQUIRED + own_required)
    out["dependentRequired"] = groups
    if run and "metrics" in own_required:  # a job names the data of the metrics too
        out["if"] = {"required": ["data"]}
        out["then"] = {"properties": {"metrics": {"required": ["data"]}}}
    return out


def document_defs() -> dict[str, Schema]:
    """The schema of each kind of report document, by name."""
    return {
        "inspect_static": _document(
            "inspect",
            "static_layer",
            {"momentum_assumed": BOOL, "eps_assumed": BOOL},
            ["momentum_assumed", "eps_assumed"],
            {"format": ["key", "prefix", "model", "project_file"], **NETWORK_GROUP},
            run=False,
        ),
        "inspect_dynamic": _document(
            "inspect",
            "inspect_layer",
            {
                "verdict": enum(["stale", "gap", "noisy", "healthy"]),
                "verdict_text": STRING,
                "batches": COUNT,
                "samples": COUNT,
                "forwards": COUNT,
                "metrics": _metrics("inspect"),
                "static_layers": array(ref("static_layer")),
                "label_mix": nullable(ref("label_mix")),
                "eps_check": ref("eps_check"),
            },
            ["verdict", "verdict_text", "batches", "samples", "forwards", "metrics",
             "static_layers", "label_mix", "eps_check"],  # fmt: skip
            RUN_GROUPS,
        ),
        "precise": _document(
            "precise",
            "precise_layer",
            {
                "batches": COUNT,
                "samples": COUNT,
                "world_size": {"type": "integer", "minimum": 2},
                "metrics": _metrics("precise"),
                "output": OPT_STRING,
                "freeze": {
                    **BOOL,
                    "description": "the checkpoint is written for frozen BN layers "
                    "(weight, bias, running_mean, running_var; no num_batches_tracked)",
                },
                "label_mix": nullable(ref("label_mix")),
            },
            ["batches", "samples", "label_mix"],
            {**RUN_GROUPS, "device": [*RUN_GROUPS["device"], "output"],
             "format": [*RUN_GROUPS["format"], "freeze"]},  # fmt: skip
        ),
        "adapt": _document(
            "adapt",
            "adapt_layer",
            {
                "batches": COUNT,
                "samples": COUNT,
                "prior": {"type": "number", "minimum": 0},
                "shift_threshold": REAL,
                "only": enum(["mean", "var", None], "partial adaptation: null = both"),
                "first_layers": nullable({"type": "integer", "minimum": 1}),
                "world_size": {"type": "integer", "minimum": 2},
                "metrics": _metrics("adapt"),
                "online_prior": PRIOR_N,
                "online_priors": array(ref("online_prior_row")),
                "output": OPT_STRING,
                "label_mix": nullable(ref("label_mix")),
            },
            ["batches", "samples", "prior", "shift_threshold", "only", "first_layers",
             "label_mix"],  # fmt: skip
            {
                **RUN_GROUPS,
                "device": [*RUN_GROUPS["device"], "output"],
                "online_prior": ["metrics"],
                "online_priors": ["metrics"],
            },
        ),
        "adapt_domains": _document(
            "adapt",
            "domain_layer",
            {
                "domains": {**array(ref("domain_entry")), "minItems": 1},
                "divergence_labels": {
                    **array(STRING),
                    "description": '"source", then the domain names',
                },
                "divergence": array(array(OPT_REAL)),
                "prior": {"type": "number", "minimum": 0},
                "shift_threshold": REAL,
                "only": enum(["mean", "var", None], "partial adaptation: null = both"),
                "first_layers": nullable({"type": "integer", "minimum": 1}),
                "world_size": {"type": "integer", "minimum": 2},
                "split_output": OPT_STRING,
            },
            ["domains", "divergence_labels", "divergence", "prior", "shift_threshold", "only",
             "first_layers"],  # fmt: skip
            {**RUN_GROUPS, "device": [*RUN_GROUPS["device"], "split_output"]},
        ),
        "ghost": _document(
            "ghost",
            "ghost_layer",
            {
                "verdict": enum(["none", "fine", "noisy"]),
                "verdict_text": STRING,
                "sizes": array(ref("ghost_size")),
                "batch_size": {"type": "integer", "minimum": 1},
                "batches": COUNT,
                "samples": COUNT,
                "forwards": COUNT,
                "metrics": _metrics("ghost"),
            },
            ["verdict", "verdict_text", "sizes", "batch_size", "batches", "samples", "forwards",
             "metrics"],  # fmt: skip
            RUN_GROUPS,
        ),
        "leakage": _document(
            "leakage",
            "leakage_layer",
            {
                "verdict": enum(["leak", "none", "independent"]),
                "verdict_text": STRING,
                "group_by": array(STRING),
                "batch_size": {"type": "integer", "minimum": 2},
                "samples": COUNT,
                "left_out": COUNT,
                "batches": COUNT,
                "seed": INT,
                "metric": enum(["kl", "l2"]),
                "ratio_threshold": REAL,
                "excess_threshold": REAL,
                "has_labels": BOOL,
                "forwards": COUNT,
                "arrangements": array(ref("leakage_arrangement")),
            },
            ["verdict", "verdict_text", "group_by", "batch_size", "samples", "left_out",
             "batches", "seed", "metric", "ratio_threshold", "excess_threshold", "has_labels",
             "forwards", "arrangements"],  # fmt: skip
            RUN_GROUPS,
        ),
    }


def _corrupt() -> Schema:
    return obj(
        {
            **_header("corrupt"),
            "source": STRING,
            "output": STRING,
            "corruption": enum(CORRUPTIONS),
            "severity": {"type": "integer", "minimum": 1, "maximum": 5},
            "seed": INT,
            "images": COUNT,
        }
    )


def _demo() -> Schema:
    return obj(
        {
            **_header("demo"),
            "checkpoint": STRING,
            "layers": array(ref("inspect_layer")),
            "findings": array(ref("finding")),
            "demo": ref("demo_build"),
            "inspect": ref("inspect_dynamic"),
            "precise": ref("precise"),
            "adapt": ref("adapt"),
            "ghost": ref("ghost"),
        }
    )


DESCRIPTIONS = {
    "inspect": "bnscope inspect: the static report (from the buffers) or, with a model and "
    "data, the dynamic one (it has a verdict)",
    "precise": "bnscope precise: Precise BN",
    "adapt": "bnscope adapt: Adaptive BN",
    "ghost": "bnscope ghost: the normalization-batch-size analysis",
    "leakage": "bnscope leakage: information leakage within a batch (batch composition)",
    "corrupt": "bnscope corrupt: a corrupted copy of an image folder",
    "demo": "bnscope demo: the demo's build and the documents of the commands it ran",
}


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if "$ref" in node else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def build(command: str) -> Schema:
    """The JSON Schema of ``command``'s documents (``bnscope.<command>/<SCHEMA_VERSION>``)."""
    docs = document_defs()
    pool = {**DEFS, **docs}
    if command == "inspect":
        body: Schema = {
            "if": {"required": ["verdict"]},
            "then": ref("inspect_dynamic"),
            "else": ref("inspect_static"),
        }
    elif command == "adapt":  # one target domain, or several (``domains``)
        body = {
            "if": {"required": ["domains"]},
            "then": ref("adapt_domains"),
            "else": ref("adapt"),
        }
    elif command in docs:
        body = docs[command]
    elif command == "corrupt":
        body = _corrupt()
    elif command == "demo":
        body = _demo()
    else:
        raise ValueError(f"no schema for command {command!r}")
    defs: dict[str, Schema] = {}
    todo = _refs(body)
    while todo:
        name = todo.pop()
        if name not in defs:
            defs[name] = pool[name]
            todo |= _refs(pool[name]) - set(defs)
    root: Schema = {
        "$schema": DIALECT,
        "title": f"bnscope.{command}/{SCHEMA_VERSION}",
        "description": DESCRIPTIONS[command],
        **body,
    }
    if defs:
        root["$defs"] = {name: defs[name] for name in sorted(defs)}
    return root


def schema_text(command: str) -> str:
    """The text of ``<command>.schema.json``."""
    return json.dumps(build(command), indent=2) + "\n"


def main() -> None:
    """Write every ``<command>.schema.json`` beside this module."""
    for command in COMMANDS:
        (HERE / f"{command}.schema.json").write_text(schema_text(command), encoding="utf-8")


if __name__ == "__main__":
    main()

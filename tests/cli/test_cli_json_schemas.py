"""Every command's ``--json`` document (and ``report.json``) against the JSON Schema shipped for
it, the metrics layout they share, the version they carry, and that the schemas catch a
renamed or dropped key."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import bnscope
from bnscope.ops.adapt import adapt_bn
from bnscope.ops.precise import precise_bn

from ..clirun import run
from ..conftest import tiny_spec, trained_tiny
from ..schemacheck import check_document, schema_errors

VARIANT_KEYS = ["accuracy", "loss", "agreement", "kl", "rel_diff"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint (under ``model``, with the DDP prefix), labelled and unlabelled data,
    shifted target data and a small image folder."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("docs")
    model = trained_tiny(steps=5)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "epoch": 7}, tmp / "ck.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=g) * 2 + 1
    torch.save({"x": x, "y": torch.randint(0, 3, (48,), generator=g)}, tmp / "d.pt")
    torch.save(x, tmp / "unlabelled.pt")
    torch.save(torch.randn(32, 3, 8, 8, generator=g) * 4 - 2, tmp / "target.pt")
    (tmp / "img" / "cls").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (6, 6), (100, 120, 40 * i)).save(tmp / "img" / "cls" / f"{i}.png")
    return tmp


MODEL = ("--model", tiny_spec())
#: name -> (arguments after the command, with CK/DATA/UNL/TARGET/IMG/TMP placeholders)
RUNS: dict[str, tuple[str, ...]] = {
    "inspect-static": ("inspect", "CK"),
    "inspect-static-model": ("inspect", "CK", *MODEL),
    "inspect-dynamic": ("inspect", "CK", *MODEL, "--data", "DATA", "--batch-size", "16"),
    "precise": ("precise", "CK", *MODEL, "--data", "DATA", "-o", "TMP/p1.pt"),
    "precise-eval": ("precise", "CK", *MODEL, "--data", "DATA", "--eval-data", "DATA",
                     "-o", "TMP/p2.pt"),
    "precise-eval-unlabelled": ("precise", "CK", *MODEL, "--data", "DATA", "--eval-data", "UNL",
                                "-o", "TMP/p3.pt"),
    "adapt": ("adapt", "CK", *MODEL, "--data", "TARGET", "-o", "TMP/a1.pt"),
    "adapt-eval": ("adapt", "CK", *MODEL, "--data", "TARGET", "--eval-data", "DATA",
                   "--prior", "16", "-o", "TMP/a2.pt"),
    "ghost": ("ghost", "CK", *MODEL, "--data", "DATA", "--batch-size", "16",
              "--sizes", "2,4,32"),
    "leakage": ("leakage", "CK", *MODEL, "--data", "DATA", "--batch-size", "8"),
    "corrupt": ("corrupt", "IMG", "TMP/corrupted", "--corruption", "contrast"),
}  # fmt: skip
#: the variants of each document's metrics (None: no metrics)
VARIANTS = {
    "inspect-static": None,
    "inspect-static-model": None,
    "inspect-dynamic": ["running", "precise", "batch"],
    "precise": None,
    "precise-eval": ["running", "precise"],
    "precise-eval-unlabelled": ["running", "precise"],
    "adapt": None,
    "adapt-eval": ["running", "adapted", "batch", "prior"],
    "ghost": ["precise"],
    "leakage": None,
    "corrupt": None,
}


@pytest.fixture(scope="module")
def documents(env: Path) -> dict[str, tuple[dict[str, Any], Path]]:
    """Each run's ``--json`` document and its ``--out`` folder (corrupt has none)."""
    subst = {"CK": "ck.pt", "DATA": "d.pt", "UNL": "unlabelled.pt", "TARGET": "target.pt",
             "IMG": "img", "TMP": str(env)}  # fmt: skip
    out: dict[str, tuple[dict[str, Any], Path]] = {}
    for name, args in RUNS.items():
        argv = [subst.get(a, a.replace("TMP", str(env))) for a in args]
        folder = env / f"out-{name}"
        if argv[0] != "corrupt":
            argv += ["--out", str(folder)]
        res = run(*argv, "--json", cwd=env)  # run() validates what it printed
        assert res.exit_code == 0, (name, res.stderr)
        out[name] = (json.loads(res.stdout), folder)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_every_command_document_validates(documents, name):
    doc, folder = documents[name]
    check_document(doc)
    assert doc["schema"] == f"bnscope.{RUNS[name][0]}/2" and doc["command"] == RUNS[name][0]
    assert list(doc)[:3] == ["schema", "bnscope_version", "command"]
    assert doc["bnscope_version"] == bnscope.__version__
    if folder.exists():  # report.json is the same document
        assert json.loads((folder / "report.json").read_text()) == doc


@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_share_one_layout(documents, name):
    doc, _ = documents[name]
    variants = VARIANTS[name]
    if variants is None:
        assert "metrics" not in doc
        return
    m = doc["metrics"]
    assert list(m) == ["data", "samples", "has_labels", "reference", "variants"]
    assert list(m["variants"]) == variants
    for variant in m["variants"].values():
        assert list(variant) == VARIANT_KEYS
    ref = m["variants"][m["reference"]]
    assert (ref["agreement"], ref["kl"], ref["rel_diff"]) == (1.0, 0.0, 0.0)
    assert m["has_labels"] is (name != "precise-eval-unlabelled")
    labelled = [v["accuracy"] is not None for v in m["variants"].values()]
    assert all(labelled) if m["has_labels"] else not any(labelled)


def test_the_data_of_the_metrics_is_named(documents):
    """inspect and ghost measure on --data, precise and adapt on --eval-data."""
    for name in ("inspect-dynamic", "ghost"):
        doc = documents[name][0]
        assert doc["metrics"]["data"] == doc["data"] == "tensor file d.pt (48 samples)"
    assert documents["precise-eval-unlabelled"][0]["metrics"]["data"].startswith(
        "tensor file unlabelled.pt"
    )
    assert documents["adapt-eval"][0]["metrics"]["data"] == "tensor file d.pt (48 samples)"
    assert documents["adapt-eval"][0]["data"].startswith("tensor file target.pt")


def test_the_html_report_names_the_version(documents):
    _, folder = documents["inspect-dynamic"]
    html = (folder / "report.html").read_text()
    assert f"bnscope {bnscope.__version__} (bnscope.inspect/2)" in html
    assert f"<p class='meta' id='version'>Written by bnscope {bnscope.__version__}." in html


def test_library_reports_validate_without_the_job_keys():
    data = [(torch.randn(8, 3, 8, 8) + 1, torch.randint(0, 3, (8,))) for _ in range(3)]
    for op in (
        lambda m: precise_bn(m, data),
        lambda m: adapt_bn(m, [x * 3 for x, _ in data], prior=4),
    ):
        doc = op(trained_tiny()).to_dict()
        check_document(doc)
        assert "format" not in doc and "device" not in doc
    job = bnscope.open(model=trained_tiny(), data=data)
    check_document(job.inspect().report.to_dict())


# --------------------------------------------------------------------------------------------
# The schemas catch a renamed, dropped or retyped key

Mutation = Callable[[dict[str, Any]], None]


def rename(path: tuple[Any, ...], new: str) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, key = path
        node: Any = doc
        for p in parents:
            node = node[p]
        node[new] = node.pop(key)

    return apply


def drop(path: tuple[Any, ...]) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, key = path
        node: Any = doc
        for p in parents:
            node = node[p]
        del node[key]

    return apply


def put(path: tuple[Any, ...], value: Any) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, key = path
        node: Any = doc
        for p in parents:
            node = node[p]
        node[key] = value

    return apply


MUTATIONS: dict[str, tuple[str, Mutation]] = {
    "schema version": ("precise-eval", put(("schema",), "bnscope.precise/1")),
    "no bnscope_version": ("precise-eval", drop(("bnscope_version",))),
    "metrics renamed": ("precise-eval", rename(("metrics",), "evaluation")),
    "variant renamed": ("precise-eval", rename(("metrics", "variants", "running"), "before")),
    "old a/b layout": ("precise-eval", put(("metrics", "variants"), {"a": {}, "b": {}})),
    "metric renamed": (
        "adapt-eval", rename(("metrics", "variants", "batch", "accuracy"), "acc"),
    ),
    "metric dropped": ("inspect-dynamic", drop(("metrics", "variants", "precise", "rel_diff"))),
    "reference changed": ("ghost", put(("metrics", "reference"), "running")),
    "metrics data dropped": ("ghost", drop(("metrics", "data"))),
    "layer field renamed": ("precise", rename(("layers", 0, "d_mu_max"), "dmu_max")),
    "layer status unknown": ("adapt", put(("layers", 0, "status"), "adapted")),
    "finding field renamed": ("adapt", rename(("findings", 0, "fix"), "hint")),
    "size field renamed": ("ghost", rename(("sizes", 0, "effective_ratio"), "eff")),
    "job key dropped": ("inspect-dynamic", drop(("channels_last",))),
    "output dropped": ("precise", drop(("output",))),
    "static key renamed": ("inspect-static", rename(("eps_assumed",), "eps_default")),
    "extra key": ("inspect-static-model", put(("notes",), "x")),
    "corrupt key renamed": ("corrupt", rename(("images",), "count")),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_a_changed_document_fails_its_schema(documents, case):
    name, mutate = MUTATIONS[case]
    doc = copy.deepcopy(documents[name][0])
    against = doc["schema"]
    assert schema_errors(doc, against) == []
    mutate(doc)
    assert schema_errors(doc, against), f"{case}: the schema accepted the changed document"


def test_non_finite_numbers_are_spelled_out(documents):
    doc = copy.deepcopy(documents["precise"][0])
    doc["layers"][0]["d_mu_max"] = "inf"
    doc["layers"][1]["d_var_median"] = "nan"
    assert schema_errors(doc) == []
    doc["layers"][0]["d_mu_max"] = "Infinity"
    assert schema_errors(doc)

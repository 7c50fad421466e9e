"""Real-architecture BN flavours through the CLI: frozen BN (--include-frozen), models with
several inputs (batches in forward's order, dict batches, --call), timm BN+act."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..clirun import one_error_line, run

STANDINS = Path(__file__).parent.parent / "standins.py"


def spec(name: str) -> str:
    return f"{STANDINS}:{name}"


def frozen_checkpoint(tmp: Path) -> Path:
    from ..standins import frozen_backbone

    torch.manual_seed(0)
    model = frozen_backbone()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    path = tmp / "det.pt"
    torch.save({"model": model.state_dict(), "iteration": 9}, path)
    g = torch.Generator().manual_seed(1)
    torch.save({"x": torch.randn(64, 3, 8, 8, generator=g) * 1.3 + 0.2,
                "y": torch.randint(0, 4, (64,), generator=g)}, tmp / "d.pt")  # fmt: skip
    return path


def test_frozen_backbone_measured_kept_and_re_estimated_on_request(tmp_path: Path):
    ckpt = frozen_checkpoint(tmp_path)
    common = ["--model", spec("frozen_backbone"), "--data", tmp_path / "d.pt"]
    res = run("inspect", ckpt, "--model", spec("frozen_backbone"), "--json")
    doc = json.loads(res.stdout)
    assert [lay["frozen"] for lay in doc["layers"]] == [True, True]
    assert not any(f["code"] == "no-batchnorm" for f in doc["findings"])

    res = run("inspect", ckpt, *common, "--json")
    assert res.exit_code == 0, res.stderr
    assert [lay["status"] for lay in json.loads(res.stdout)["layers"]] == ["frozen", "frozen"]

    one_error_line(run("precise", ckpt, *common), "every BN layer of the model is frozen")
    one_error_line(run("ghost", ckpt, *common), "ghost has nothing to analyse")
    assert not (tmp_path / "det.precise.pt").exists()

    res = run("precise", ckpt, *common, "--include-frozen", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [lay["status"] for lay in doc["layers"]] == ["updated", "updated"]
    written = torch.load(tmp_path / "det.precise.pt", weights_only=True)
    assert written["iteration"] == 9
    assert not torch.equal(written["model"]["1.running_mean"], torch.full((8,), 0.3))
    res = run("precise", ckpt, *common, "--include-frozen", "--force")
    assert "2 of them frozen, re-estimated as asked (--include-frozen)" in res.stdout
    res = run("adapt", ckpt, *common, "--include-frozen", "--json")
    assert res.exit_code == 0, res.stderr


def two_input_data(tmp: Path) -> Path:
    (tmp / "pairs.py").write_text(
        "import torch\n\n"
        "def tuples(batch_size=12):\n"
        "    g = torch.Generator().manual_seed(2)\n"
        "    return [(torch.randn(batch_size, 3, 5, 5, generator=g),\n"
        "             torch.randn(batch_size, 5, generator=g),\n"
        "             torch.randint(0, 4, (batch_size,), generator=g)) for _ in range(4)]\n\n"
        "def dicts(batch_size=12):\n"
        "    return [{'pixel_values': a, 'features': b, 'labels': y}"
        " for a, b, y in tuples(batch_size)]\n\n"
        "def odd(batch_size=12):\n"
        "    return [{'img': a, 'tab': b} for a, b, _ in tuples(batch_size)]\n\n"
        "def call(model, batch):\n"
        "    return model(batch['img'], batch['tab'])\n"
    )
    return tmp / "pairs.py"


def test_models_with_several_inputs(tmp_path: Path):
    from ..standins import DictInputs, TwoInputs

    pairs = two_input_data(tmp_path)
    torch.manual_seed(0)
    torch.save(TwoInputs().state_dict(), tmp_path / "two.pt")
    torch.save(DictInputs().state_dict(), tmp_path / "dict.pt")
    for ckpt, model, data, extra in (
        ("two.pt", "TwoInputs", "tuples", []),
        ("dict.pt", "DictInputs", "dicts", []),
        ("two.pt", "TwoInputs", "odd", ["--call", f"{pairs}:call"]),
    ):
        args = [tmp_path / ckpt, "--model", spec(model), "--data", f"{pairs}:{data}",
                "--batch-size", "12", *extra]  # fmt: skip
        for command in ("precise", "inspect", "ghost"):
            more = ["--sizes", "4,12"] if command == "ghost" else ["--force"] * (
                command == "precise"
            )
            res = run(command, *args, *more, "--json")
            assert res.exit_code == 0, (command, data, res.stderr)
            doc = json.loads(res.stdout)
            assert doc["samples"] == 48, (command, data)
            if command == "inspect":
                assert doc["metrics"]["has_labels"] == (data != "odd")
    common = ["--model", spec("TwoInputs"), "-o", tmp_path / "new.pt"]
    one_error_line(run("precise", tmp_path / "two.pt", *common, "--data", f"{pairs}:odd"),
                   "missing 1 required positional argument")  # fmt: skip
    one_error_line(
        run("precise", tmp_path / "two.pt", *common, "--data", f"{pairs}:tuples",
            "--call", f"{pairs}:nope"),  # fmt: skip
        "--call",
    )
    assert not (tmp_path / "new.pt").exists()

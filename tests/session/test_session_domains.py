"""Job.adapt_domains: per-domain and split checkpoints in the input's format (safetensors
here), outputs checked before anything runs, and the split checkpoint refused where it
cannot be written or loaded."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

import bnscope
from bnscope.errors import CheckpointError, UsageError
from bnscope.nn import PriorBatchNorm2d, convert_to_split_bn, use_domain

from ..conftest import tiny_spec, trained_tiny
from ..models import make_tiny


def env(tmp_path):
    model = trained_tiny(steps=5)
    ckpt = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(ckpt))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 8, 8, generator=g)
    torch.save(x * 3 + 2, tmp_path / "fog.pt")
    torch.save(x * 0.5 - 1, tmp_path / "night.pt")
    return ckpt, {"fog": x * 3 + 2, "night": x * 0.5 - 1}


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_safetensors_per_domain_and_split_checkpoints(tmp_path):
    ckpt, data = env(tmp_path)
    job = bnscope.open(ckpt, model=tiny_spec(), batch_size=16)
    specs = {name: str(tmp_path / f"{name}.pt") for name in data}
    result = job.adapt_domains(specs, split=True)
    assert result.report.extra["domains"][0]["output"] is None  # not written yet
    written = result.save()
    assert [p.name for p in written] == [
        "w.adapted.fog.safetensors",
        "w.adapted.night.safetensors",
        "w.adapted.split.safetensors",
    ]
    entries = result.report.extra["domains"]
    assert [e["output"] for e in entries] == [str(p) for p in written[:2]]
    assert result.report.extra["split_output"] == str(written[2])
    split = convert_to_split_bn(make_tiny(), 2).eval()
    split.load_state_dict(safetensors.torch.load_file(str(written[2])))  # strict
    for d, (name, x) in enumerate(data.items()):
        assert written[d].name == f"w.adapted.{name}.safetensors"
        plain = make_tiny().eval()
        plain.load_state_dict(safetensors.torch.load_file(str(written[d])))
        with use_domain(split, d), torch.no_grad():
            torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)
    # the report folder takes the result itself
    files = bnscope.write_report(result, tmp_path / "rep")
    assert sorted(p.name for p in files) == ["domain_divergence.png", "report.json"]
    with pytest.raises(CheckpointError, match="already exists"):
        result.save()
    assert len(result.save(force=True)) == 3


def test_split_refused_before_anything_runs(tmp_path):
    ckpt, data = env(tmp_path)
    specs = [f"{name}={tmp_path / f'{name}.pt'}" for name in data]
    model = make_tiny()
    model[4] = PriorBatchNorm2d(4, 16.0)  # overrides forward: convert_to_split_bn leaves it
    job = bnscope.open(ckpt, model=model)
    before = listing(tmp_path)
    with pytest.raises(UsageError, match=r"split=True: BN layer 4 \(PriorBatchNorm2d\) cannot"):
        job.adapt_domains(specs, split=True)
    assert listing(tmp_path) == before
    # without split the same model is adapted per domain
    result = bnscope.open(ckpt, model=model).adapt_domains(specs)
    assert [p.name for p in result.save()] == [
        "w.adapted.fog.safetensors",
        "w.adapted.night.safetensors",
    ]


def test_split_refused_for_a_whole_module_and_without_a_checkpoint(tmp_path):
    _, data = env(tmp_path)
    whole = tmp_path / "whole.pt"
    torch.save(trained_tiny(steps=2), whole)
    specs = {name: str(tmp_path / f"{name}.pt") for name in data}
    job = bnscope.open(whole, trust=True)
    with pytest.raises(UsageError, match="split=True cannot write a module checkpoint"):
        job.adapt_domains(specs, split=True)
    live = bnscope.open(model=nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)))
    with pytest.raises(UsageError, match="split=True writes a checkpoint, and this job has none"):
        live.adapt_domains(specs, split=True)
    result = live.adapt_domains(specs)
    assert [e["name"] for e in result.report.extra["domains"]] == ["fog", "night"]
    with pytest.raises(UsageError, match="no checkpoint file to write next to"):
        result.save()

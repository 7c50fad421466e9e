"""Batching of built-in data specs never ends on a batch BatchNorm cannot normalize.

Without ``--drop-last`` a last batch of exactly 1 sample is left out (and reported); with it
every incomplete last batch is. Factories batch themselves: a batch of 1 from one is an error
whose fix names real options.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bnscope.errors import DataError
from bnscope.io.data import DROP_INCOMPLETE, DROP_SINGLE, load_data

from ..clirun import one_error_line, run
from ..conftest import tiny_spec
from ..models import make_mlp

MLP = tiny_spec("make_mlp")
MLP_KWARGS = '{"features": 4}'
N = 128


@pytest.fixture
def mlp_env(tmp_path: Path):
    """A BN1d model (Linear(4, 8), BatchNorm1d(8), ...) and 128 samples of shape [4]."""
    torch.manual_seed(0)
    model = make_mlp(features=4)
    ckpt = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), ckpt)
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(1)) * 3 + 2
    data = tmp_path / "x.pt"
    torch.save(x, data)
    return tmp_path, ckpt, data, model, x


def bn_input(model, x: torch.Tensor) -> torch.Tensor:
    """What BatchNorm1d sees: the Linear layer's float32 output, as float64."""
    with torch.no_grad():
        return model[0](x).double()


def written_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    sd = torch.load(path, weights_only=True)
    return sd["1.running_mean"].double(), sd["1.running_var"].double()


def matches(stats: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor) -> bool:
    mean, var = stats
    return torch.allclose(mean, h.mean(0), rtol=1e-5, atol=1e-6) and torch.allclose(
        var, h.var(0, unbiased=False), rtol=1e-5, atol=1e-6
    )


def precise(env, *extra: str):
    tmp, ckpt, data, _, _ = env
    out = tmp / "out.pt"
    res = run(
        "precise", ckpt, "--model", MLP, "--model-kwargs", MLP_KWARGS, "--data", data,
        "-o", out, "--force", "--json", *extra,
    )  # fmt: skip
    return res, out


def used_rows(data: Path, **kwargs) -> torch.Tensor:
    """The samples the CLI's loader yields (same shuffle, seed and dropping as the commands)."""
    src = load_data(data, shuffle=True, seed=0, same_order=True, **kwargs)
    return torch.cat(list(src))


def test_batch_of_one_is_left_out_and_reported(mlp_env):
    _, _, data, model, x = mlp_env
    res, out = precise(mlp_env, "--batch-size", "127")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 1 and doc["dropped_reason"] == DROP_SINGLE
    assert doc["batches"] == 1 and doc["samples"] == 127
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bnscope: warning: --data: left out the last batch of 1 sample")
    assert "128 samples in batches of 127" in lines[0]

    # exactly one leave-one-out subset of the 128 samples gives the written statistics
    stats = written_stats(out)
    h = bn_input(model, x)
    assert not matches(stats, h)  # not all 128
    keep = torch.ones(N, dtype=torch.bool)
    hits = []
    for i in range(N):
        keep[i] = False
        if matches(stats, h[keep]):
            hits.append(i)
        keep[i] = True
    assert len(hits) == 1, hits
    used = used_rows(data, batch_size=127, drop_single=True)
    assert used.shape == (127, 4)
    assert not (used == x[hits[0]]).all(1).any()  # the sample left out is the loader's last


def test_drop_last_leaves_out_every_incomplete_batch(mlp_env):
    _, _, data, model, x = mlp_env
    res, out = precise(mlp_env, "--batch-size", "50", "--drop-last")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 28 and doc["dropped_reason"] == DROP_INCOMPLETE
    assert doc["batches"] == 2 and doc["samples"] == 100
    assert res.stderr == ""  # asked for: a status line for a terminal, not a warning
    used = used_rows(data, batch_size=50, drop_last=True)
    assert used.shape == (100, 4)
    assert all((x == row).all(1).sum() == 1 for row in used)  # 100 distinct samples of x
    assert matches(written_stats(out), bn_input(model, used))
    assert not matches(written_stats(out), bn_input(model, x))


def test_nothing_left_out_when_the_batches_fit(mlp_env):
    _, _, _, model, x = mlp_env
    for size in ("128", "64", "126"):  # 126: a last batch of 2 is kept
        res, out = precise(mlp_env, "--batch-size", size)
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["dropped_samples"] == 0 and doc["dropped_reason"] is None
        assert doc["samples"] == N and res.stderr == ""
        assert matches(written_stats(out), bn_input(model, x))


@pytest.mark.parametrize("command", ["inspect", "adapt", "ghost"])
def test_every_data_command_reports_dropped_samples(mlp_env, command):
    tmp, ckpt, data, _, _ = mlp_env
    writes = ("-o", tmp / "out.pt", "--force") if command == "adapt" else ()
    res = run(
        command, ckpt, "--model", MLP, "--model-kwargs", MLP_KWARGS, "--data", data,
        "--batch-size", "127", "--json", *writes,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 1 and doc["samples"] == 127
    assert "left out the last batch of 1 sample" in res.stderr
    res = run(
        command, ckpt, "--model", MLP, "--model-kwargs", MLP_KWARGS, "--data", data,
        "--batch-size", "50", "--drop-last", "--json", *writes,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["dropped_samples"] == 28


def test_project_file_sets_drop_last_and_the_flag_overrides_it(mlp_env):
    tmp, ckpt, data, _, _ = mlp_env
    (tmp / "bnscope.toml").write_text(
        f'model = "{MLP}"\ndata = "x.pt"\nbatch_size = 50\ndrop_last = true\n'
        "[model_kwargs]\nfeatures = 4\n"
    )
    res = run("inspect", "mlp.pt", "--json", cwd=tmp)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 28 and doc["samples"] == 100
    res = run("inspect", "mlp.pt", "--no-drop-last", "--json", cwd=tmp)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 0 and doc["samples"] == N
    (tmp / "bnscope.toml").write_text("drop_last = 1\n")
    one_error_line(run("inspect", "mlp.pt", cwd=tmp), "key 'drop_last' must be bool")


def test_drop_last_that_leaves_nothing_is_an_input_error(mlp_env):
    res, _ = precise(mlp_env, "--batch-size", "200", "--drop-last")
    one_error_line(res, "dropping the incomplete last batch leaves no data: 128 samples")
    assert "--batch-size" in res.stderr


FACTORY = """
import torch

def one_at_the_end():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g), torch.randn(1, 4, generator=g)]

def full():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) for _ in range(2)]
"""


def test_factory_batch_of_one_names_real_options(mlp_env):
    tmp, ckpt, _, _, _ = mlp_env
    (tmp / "fac.py").write_text(FACTORY)
    for command in ("precise", "adapt", "inspect"):
        res = run(
            command, ckpt, "--model", MLP, "--model-kwargs", MLP_KWARGS,
            "--data", f"{tmp / 'fac.py'}:one_at_the_end",
        )  # fmt: skip
        one_error_line(res, "got 1 value per channel in batch 1 (batch of one sample)")
        line = res.stderr.strip()
        assert "--batch-size 2 or more" in line and "--drop-last" in line
        assert "a DataLoader that drops its incomplete last batch" in line  # for a factory
        assert "drop a last batch of 1" not in line


def test_drop_last_does_not_apply_to_factories(mlp_env):
    tmp, ckpt, _, _, _ = mlp_env
    (tmp / "fac.py").write_text(FACTORY)
    res = run(
        "precise", ckpt, "--model", MLP, "--model-kwargs", MLP_KWARGS,
        "--data", f"{tmp / 'fac.py'}:full", "--drop-last", "--json", "--force",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["dropped_samples"] == 0 and doc["samples"] == 16
    assert "--drop-last does not apply to --data" in res.stderr


# -- the library ----------------------------------------------------------------------------


def sizes(src) -> list[int]:
    return [int(b.shape[0]) for b in src]


def test_load_data_drop_rules(tmp_path: Path):
    torch.save(torch.randn(N, 4), tmp_path / "x.pt")
    data = tmp_path / "x.pt"
    src = load_data(data, batch_size=127, drop_single=False)  # every batch kept, on request
    assert sizes(src) == [127, 1] and src.dropped_samples == 0 and src.num_samples == N
    src = load_data(data, batch_size=127)  # the default, as in the commands
    assert sizes(src) == [127] and src.dropped_samples == 1 and src.num_samples == 127
    assert src.dropped_reason == DROP_SINGLE
    src = load_data(data, batch_size=50, drop_single=True)  # a last batch of 28 is fine
    assert sizes(src) == [50, 50, 28] and src.dropped_samples == 0
    src = load_data(data, batch_size=50, drop_last=True, drop_single=True)
    assert sizes(src) == [50, 50] and src.dropped_samples == 28
    assert src.dropped_reason == DROP_INCOMPLETE
    src = load_data(data, batch_size=1, drop_single=True)  # batches of 1 are the user's choice
    assert len(sizes(src)) == N and src.dropped_samples == 0
    with pytest.raises(DataError, match="leaves no data"):
        load_data(data, batch_size=200, drop_last=True)

    torch.save(torch.randn(1, 4), tmp_path / "one.pt")  # nothing would be left: kept
    src = load_data(tmp_path / "one.pt", drop_single=True)
    assert sizes(src) == [1] and src.dropped_samples == 0


def test_drop_rules_apply_per_rank(tmp_path: Path):
    torch.save(torch.randn(11, 4), tmp_path / "x.pt")
    # 11 samples on 2 ranks: 6 and 5; batches of 5 leave a last batch of 1 on rank 0 only
    parts = [
        load_data(tmp_path / "x.pt", batch_size=5, drop_single=True, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert [sizes(p) for p in parts] == [[5], [5]]
    assert [p.dropped_samples for p in parts] == [1, 0]
    # with drop_last, a rank whose share is smaller than a batch gets no batch (not an error:
    # the other ranks may have some)
    parts = [
        load_data(tmp_path / "x.pt", batch_size=6, drop_last=True, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert [sizes(p) for p in parts] == [[6], []]
    assert [p.dropped_samples for p in parts] == [0, 5]

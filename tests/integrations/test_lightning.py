"""The Lightning callback ``bnscope.integrations.lightning.PreciseBN`` with a real
``lightning.Trainer`` on the CPU: a few steps of a tiny BN model; the BN buffers at each
validation against a float64 reference of the population statistics of the weights at that
moment; the metrics the logger got; module modes; the rest of the run unchanged; bounds,
precision, a layer never called, a train loader that cannot be read mid-epoch; and DDP on 2 CPU
processes. Skipped when lightning is not installed."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..reallibs import NMS_SCHEMA

# torchmetrics (a lightning dependency) imports torchvision, whose CUDA wheel installed here
# imports on a CPU torch once its two operator schemas exist
for _op in ("torchvision::nms", "torchvision::qnms"):
    try:
        torch.library.define(_op, NMS_SCHEMA)
    except RuntimeError:
        pass  # defined already
pytest.importorskip("lightning")

from bnscope.errors import UsageError  # noqa: E402
from bnscope.integrations.lightning import (  # noqa: E402
    NotCalledError,
    PreciseBN,
    staleness_metrics,
)
from bnscope.records import PreciseLayer, Report, Status  # noqa: E402

from .lightning_models import (  # noqa: E402
    BATCH,
    SAMPLES,
    Module,
    Probe,
    bn_names,
    loader,
    reference,
    replay,
    trainer,
)

# lightning's own deprecation notice (torch's pytree API), not ours
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("lightning_ddp_worker.py")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def assert_stats(state: dict[str, torch.Tensor], ref: dict, names: list[str]) -> None:
    """The float32 BN buffers in ``state`` equal the float64 reference statistics."""
    assert sorted(ref) == sorted(names)
    for name in names:
        mean, var = ref[name]
        for key, want in (("running_mean", mean), ("running_var", var)):
            got = state[f"{name}.{key}"].to(torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def stats_close(state: dict[str, torch.Tensor], ref: dict) -> bool:
    return all(
        torch.allclose(state[f"{n}.running_mean"].double(), m, rtol=1e-5, atol=1e-6)
        and torch.allclose(state[f"{n}.running_var"].double(), v, rtol=1e-5, atol=1e-6)
        for n, (m, v) in ref.items()
    )


def at(probe: Probe, hook: str) -> list[dict]:
    return [s for s in probe.seen if s["hook"] == hook]


# --------------------------------------------------------------------------------------------
# Before each validation: the exact statistics of the current weights, and what was logged


def test_statistics_before_each_validation_are_the_population_statistics(tmp_path: Path):
    torch.manual_seed(0)
    before, after = Probe(), Probe()  # what PreciseBN found, what it left
    cb = PreciseBN(batches=None)  # all of the training data
    module = Module()
    train = loader(shuffle=True)
    t = trainer(tmp_path, [before, cb, after])
    t.fit(module, train, loader())
    names = bn_names(module.net)
    found, left = at(before, "validation"), at(after, "validation")
    assert [s["step"] for s in left] == [6, 12]  # 6 batches per epoch, 2 epochs
    for old, new in zip(found, left, strict=True):
        # the weights at that moment, on all of the training data in the batches it read
        ref = reference(new["state"], replay(train, old["rng"]))
        assert_stats(new["state"], ref, names)
        assert not stats_close(old["state"], ref)  # training's EMA was not that
        for key, value in old["state"].items():  # nothing else changed
            if not key.endswith(BUFFERS):
                assert torch.equal(value, new["state"][key]), key
    # the report of the last one: old = the EMA training left, new = the buffers now
    report = cb.last_report
    assert report is not None and cb.last_step == 12
    assert (report.extra["batches"], report.extra["samples"]) == (SAMPLES // BATCH, SAMPLES)
    for name in names:
        arrays = report.arrays[f"net.{name}"]  # layer names are the LightningModule's
        old_mean = found[-1]["state"][f"{name}.running_mean"].double()
        torch.testing.assert_close(arrays["old_mean"], old_mean)
        torch.testing.assert_close(
            arrays["new_mean"].float(), left[-1]["state"][f"{name}.running_mean"]
        )
        d_mu = (arrays["old_mean"] - arrays["new_mean"]).abs() / (arrays["new_var"] + 1e-5).sqrt()
        rec = next(r for r in report.layers if r.name == f"net.{name}")
        assert rec.status == Status.UPDATED
        assert rec.d_mu_max == pytest.approx(d_mu.max().item(), rel=1e-12)

    # logged at both validations, through pl_module.log: logger and callback_metrics
    logger = t.logger
    steps = [step for step, _ in logger.series("bnscope/max_d_mu")]
    assert len(steps) == 2 and steps[0] < steps[1]
    last = dict(logger.rows[-1][1])
    expected = staleness_metrics(report)
    assert {"bnscope/d_mu/net.bn1", "bnscope/d_var/net.bn2"} <= set(expected)
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, rel=1e-6), key
        assert t.callback_metrics[key].item() == pytest.approx(value, rel=1e-6), key
    assert last["bnscope/max_d_mu"] > 0.05  # a few SGD steps leave the EMA behind
    assert last["bnscope/updated_layers"] == 2 and last["bnscope/not_called_layers"] == 0

    # modes: eval in every validation step, as Lightning set them; training as before
    assert module.val_modes and not any(any(m.values()) for m in module.val_modes)
    assert all(m == module.train_modes[0] for m in module.train_modes)
    assert all(module.train_modes[0].values())


def test_the_rest_of_the_run_is_unchanged(tmp_path: Path):
    """Weights after two epochs are bit-identical with and without the callback (it reads
    the shuffled train loader, whose sampler draws from the global generator), and the final
    model has the population statistics of its final weights."""
    runs = {}
    before = Probe()
    train = loader(shuffle=True)
    for name, callbacks in (("plain", []), ("precise", [before, PreciseBN(batches=None)])):
        torch.manual_seed(0)
        module = Module()
        trainer(tmp_path / name, callbacks).fit(module, train, loader())
        runs[name] = module.net.state_dict()
    for key, value in runs["plain"].items():
        if not key.endswith(BUFFERS):
            assert torch.equal(value, runs["precise"][key]), key
    ref = reference(runs["precise"], replay(train, at(before, "validation")[-1]["rng"]))
    assert_stats(runs["precise"], ref, sorted(ref))
    assert not stats_close(runs["plain"], ref)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_epoch_end_without_validation_every_n_epochs_and_modes(tmp_path: Path):
    """No validation: the statistics are recomputed at the end of every second epoch, with
    the modules in the modes training had (a Dropout the user keeps in eval mode stays so)."""
    torch.manual_seed(0)
    before, after = Probe(), Probe()
    cb = PreciseBN(batches=None, every_n_epochs=2)
    module = Module(freeze_dropout=True)
    train = loader(shuffle=True)
    t = trainer(tmp_path, [before, cb, after], max_epochs=3, limit_val_batches=0)
    t.fit(module, train)
    ends = at(after, "epoch_end")
    assert [s["step"] for s in ends] == [6, 12, 18]
    assert cb.last_step == 12  # epoch index 1 only
    assert [step for step, _ in t.logger.series("bnscope/max_d_mu")] == [11]
    batches = replay(train, at(before, "epoch_end")[1]["rng"])
    assert_stats(ends[1]["state"], reference(ends[1]["state"], batches), bn_names(module.net))
    training = module.train_modes[0]
    assert training["net.drop"] is False and training["net.bn1"] is True
    assert all(s["modes"] == training for s in ends)
    assert all(m == training for m in module.train_modes)


# --------------------------------------------------------------------------------------------
# Data and bounds


@pytest.mark.parametrize(
    ("bounds", "batches"),
    [({"samples": 40}, 3), ({"batches": 2}, 2), ({"batches": 2, "samples": 8}, 1)],
)
def test_given_dataloader_and_bounds(tmp_path: Path, bounds: dict, batches: int):
    """``samples`` stops after the batch that reaches it, ``batches`` caps the count; the
    statistics are those of exactly the batches read from the given loader."""
    torch.manual_seed(0)
    after = Probe()
    cb = PreciseBN(loader(), **bounds)
    module = Module()
    t = trainer(tmp_path, [cb, after], max_epochs=1)
    t.fit(module, loader(shuffle=True), loader())
    report = cb.last_report
    assert report is not None
    assert (report.extra["batches"], report.extra["samples"]) == (batches, batches * BATCH)
    (state,) = [s["state"] for s in at(after, "validation")]
    first = [b for i, b in enumerate(loader()) if i < batches]
    assert_stats(state, reference(state, first), bn_names(module.net))
    # by hand, outside the hooks (nothing logged): the same data, the same statistics
    again = cb.recompute(t, module, log=False)
    assert again is cb.last_report and again.extra["batches"] == batches
    assert_stats(module.net.state_dict(), reference(state, first), bn_names(module.net))


def test_bf16_mixed_runs_under_autocast(tmp_path: Path):
    """``precision="bf16-mixed"``: the statistics are those of the tensors reaching the BN
    layers under bfloat16 autocast, as in training, not those of a float32 forward."""
    torch.manual_seed(0)
    before, after = Probe(), Probe()
    cb = PreciseBN(batches=None)
    train = loader(shuffle=True)
    t = trainer(tmp_path, [before, cb, after], max_epochs=1, precision="bf16-mixed")
    t.fit(Module(), train, loader())
    (state,) = [s["state"] for s in at(after, "validation")]
    batches = replay(train, at(before, "validation")[0]["rng"])
    names = bn_names(Module().net)
    assert_stats(state, reference(state, batches, autocast=torch.bfloat16), names)
    assert not stats_close(state, reference(state, batches))


def test_persistent_workers_mid_epoch_is_refused(tmp_path: Path):
    """Validation in the middle of an epoch with a persistent-worker train loader: reading it
    would reset the iterator training is using, so the callback says so and what to do."""
    torch.manual_seed(0)
    train = loader(shuffle=True, num_workers=1, persistent_workers=True)
    cb = PreciseBN()
    t = trainer(tmp_path, [cb], max_epochs=1, val_check_interval=3)
    with pytest.raises(UsageError, match="persistent workers") as err:
        t.fit(Module(), train, loader())
    assert "pass dataloader= to PreciseBN" in str(err.value)
    # with a loader of its own, the same run goes through
    cb = PreciseBN(loader())
    trainer(tmp_path, [cb], max_epochs=1, val_check_interval=3).fit(Module(), train, loader())
    assert cb.last_step == 6


# --------------------------------------------------------------------------------------------
# A BN layer that never runs


def test_not_called_layer_stops_the_run_with_one_clear_error(tmp_path: Path):
    torch.manual_seed(0)
    cb = PreciseBN(fail_on_not_called=True)
    t = trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(NotCalledError) as err:
        t.fit(Module(spare=True), loader(shuffle=True), loader())
    line = str(err.value)
    assert line.startswith("PreciseBN: BN layer net.spare never ran on 6 batches")
    assert "fail_on_not_called=False" in line and "\n" not in line


def test_not_called_layer_is_reported_and_kept(tmp_path: Path):
    torch.manual_seed(0)
    module = Module(spare=True)
    spare = module.net.spare
    with torch.no_grad():
        spare.running_mean.fill_(0.25)
    cb = PreciseBN()
    t = trainer(tmp_path, [cb], max_epochs=2)
    with pytest.warns(UserWarning, match="BN layer net.spare never ran on the data") as seen:
        t.fit(module, loader(shuffle=True), loader())
    assert sum("net.spare" in str(w.message) for w in seen) == 1  # once, not per validation
    assert torch.all(spare.running_mean == 0.25)
    report = cb.last_report
    assert report is not None
    assert [f.layer for f in report.findings if f.code == "not-called"] == ["net.spare"]
    assert [v for _, v in t.logger.series("bnscope/not_called_layers")] == [1.0, 1.0]
    assert [v for _, v in t.logger.series("bnscope/updated_layers")] == [2.0, 2.0]


# --------------------------------------------------------------------------------------------
# Plain parts


def test_staleness_metrics_from_records():
    layers = (
        PreciseLayer(name="a", num_features=2, status="updated", calls=3, samples=48,
                     d_mu_max=0.5, d_mu_median=0.2, d_var_max=0.1, d_var_median=0.01),
        PreciseLayer(name="b", num_features=2, status="updated", calls=3, samples=48,
                     d_mu_max=0.02, d_mu_median=0.01, d_var_max=0.3, d_var_median=0.04),
        PreciseLayer(name="c", num_features=2, status="updated", calls=3, samples=48,
                     d_mu_max=0.03, d_mu_median=0.02, d_var_max=0.2, d_var_median=0.06),
        PreciseLayer(name="d", num_features=2, status="not-called"),
        PreciseLayer(name="e", num_features=2, status="frozen", d_mu_max=9.0, d_mu_median=9.0,
                     d_var_max=9.0, d_var_median=9.0),
    )  # fmt: skip
    report = Report(command="precise", checkpoint=None, layers=layers, findings=(),
                    extra={"batches": 3, "samples": 48, "label_mix": None})  # fmt: skip
    assert staleness_metrics(report, prefix="bn/", per_layer=False) == {
        "bn/max_d_mu": 0.5,
        "bn/max_d_var": 0.3,
        "bn/median_d_mu": 0.02,
        "bn/median_d_var": 0.04,
        "bn/material_gap_layers": 2.0,  # a (d_mu 0.2), c (d_var 0.06); b is below 0.05
        "bn/updated_layers": 3.0,
        "bn/not_called_layers": 1.0,
        "bn/batches": 3.0,
        "bn/samples": 48.0,
    }
    full = staleness_metrics(report)
    assert full["bnscope/d_mu/a"] == 0.5 and full["bnscope/d_var/c"] == 0.2
    assert not any(key.endswith(("/d", "/e")) for key in full)  # only updated layers


@pytest.mark.parametrize(
    ("kwargs", "line"),
    [
        ({"batches": 0}, "batches must be a positive integer or None, got 0; e.g. batches=100"),
        ({"samples": 2.5}, "samples must be a positive integer or None, got 2.5"),
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive integer, got 0"),
    ],
)
def test_arguments_are_checked(kwargs: dict, line: str):
    with pytest.raises(UsageError) as err:
        PreciseBN(**kwargs)
    assert str(err.value).startswith(line)


# --------------------------------------------------------------------------------------------
# DDP on the CPU: 2 processes, gloo


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


@pytest.mark.timing
def test_ddp_every_rank_ends_with_the_statistics_of_all_shards(tmp_path: Path):
    """``strategy="ddp"`` with 2 CPU processes: each rank reads its half of the data (the
    DistributedSampler Lightning adds), and both end with the population statistics of all
    of it, identical on both ranks."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        GLOO_SOCKET_IFNAME=loopback_interface(),
        PYTHONDONTWRITEBYTECODE="1",
    )
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run took longer than 300 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    states = [r["state"] for r in ranks]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key  # weights and statistics
    names = bn_names(Module().net)
    assert [sum(len(x) for x, _ in r["batches"]) for r in ranks] == [SAMPLES // 2] * 2
    # the statistics of all 96 samples, in the batches each rank read
    assert_stats(states[0], reference(states[0], ranks[0]["batches"] + ranks[1]["batches"]), names)
    assert not stats_close(states[0], reference(states[0], ranks[0]["batches"]))
    for r in ranks:
        assert r["extra"]["world_size"] == 2
        assert (r["extra"]["batches"], r["extra"]["samples"]) == (SAMPLES // BATCH, SAMPLES)
        logged = r["metrics"]["bnscope/max_d_mu"]
        assert logged > 0 and math.isclose(logged, ranks[0]["metrics"]["bnscope/max_d_mu"])
    assert "sync_dist" not in output  # no warning about epoch-level logging under DDP

"""On a CUDA GPU: every function and command with the model on either device and
``device="cuda"``, the same figures as on the CPU, written checkpoints keep their devices, and
no device synchronization inside the loops. Skipped without CUDA (every test name contains
"cuda", so ``pytest -k cuda`` selects them on a GPU machine)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import bnscope
from bnscope.engine import capture

from ..clirun import run
from ..conftest import tiny_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F64 = torch.float64


@pytest.fixture(autouse=True)
def _no_timed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "CHECK_SECONDS", float("inf"))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8),
        nn.Linear(8, 4),
    )  # fmt: skip


def data(n: int = 8, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 12, 12, generator=g) * 2 + 1
        out.append((x, torch.randint(0, 4, (batch,), generator=g)))
    return out


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_cuda_precise_matches_the_cpu_for_a_model_on_either_device(where: str):
    batches = data()
    ref = net()
    rep_cpu = bnscope.precise_bn(ref, batches)
    model = net().to(where)
    before = {k: v.device for k, v in model.state_dict().items()}
    rep = bnscope.precise_bn(model, batches, device="cuda")
    assert {k: v.device for k, v in model.state_dict().items()} == before
    for k, v in bn_state(ref).items():
        torch.testing.assert_close(bn_state(model)[k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(rep_cpu.layers, rep.layers, strict=True):
        assert a.name == b.name and a.status == b.status and a.samples == b.samples
        assert a.d_mu_max == pytest.approx(b.d_mu_max, rel=1e-4, abs=1e-6)


def test_cuda_labels_and_counts_match_the_cpu():
    """Labels already on the GPU are read once at the end and give the host labels' label
    mix; num_batches_tracked is advanced on the GPU as on the CPU."""
    batches = data()
    ref, model = net(), net().cuda()
    rep_cpu = bnscope.precise_bn(ref, batches)
    rep = bnscope.precise_bn(model, [(x.cuda(), y.cuda()) for x, y in batches])
    assert rep.extra["label_mix"] == rep_cpu.extra["label_mix"] is not None
    counts = {k: int(v) for k, v in ref.state_dict().items() if "num_batches" in k}
    assert counts and counts == {
        k: int(v) for k, v in model.state_dict().items() if "num_batches" in k
    }


def test_cuda_adapt_inspect_ghost_and_evaluate_match_the_cpu():
    batches = data()
    x_only = [x for x, _ in batches]
    for fn in (
        lambda m, **k: bnscope.adapt_bn(m, x_only, prior=4, **k),
        lambda m, **k: bnscope.inspect(m, batches, **k),
        lambda m, **k: bnscope.ghost_analysis(m, batches, sizes=[2, 8], **k),
    ):
        a, b = net(), net()
        ra, rb = fn(a), fn(b, device="cuda")
        assert [r.name for r in ra.layers] == [r.name for r in rb.layers]
        assert [r.status for r in ra.layers] == [r.status for r in rb.layers]
        for k, v in bn_state(a).items():
            torch.testing.assert_close(bn_state(b)[k], v, rtol=1e-5, atol=1e-6)
        assert json.dumps(rb.to_dict(), default=str)  # records are plain host values
    ev = bnscope.evaluate_models({"a": net(), "b": net()}, batches, device="cuda")
    assert ev.agreement["b"] == 1.0


def test_cuda_statistics_are_exact_under_bf16_autocast_and_channels_last():
    batches = data()
    model = net().cuda()
    inputs: list[torch.Tensor] = []
    probe = copy.deepcopy(model).eval()
    probe[1].train()
    probe[1].momentum = 0.0
    probe[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0].to(F64)))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x, _ in batches:
            probe(x.cuda().to(memory_format=torch.channels_last))
    allx = torch.cat(inputs)
    var, mean = torch.var_mean(allx, dim=(0, 2, 3), correction=0)
    bnscope.precise_bn(model, batches, amp="bf16", channels_last=True)
    assert float((model[1].running_var.double() / var).log().abs().max()) < 1e-6
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-6, atol=1e-6)


def test_cuda_no_synchronization_per_batch():
    """PyTorch's sync debug mode warns at every synchronizing call: their number must not grow
    with the number of batches."""
    counts = {}
    for n in (4, 12):
        model = net().cuda()
        batches = [(x.cuda(), y.cuda()) for x, y in data(n)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                bnscope.precise_bn(model, batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[n] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[4] == counts[12], counts


def test_cuda_cli_end_to_end_keeps_checkpoint_devices(precise_env):
    tmp, ckpt, d, _, _ = precise_env
    common = ["--model", tiny_spec(), "--data", d, "--batch-size", "16", "--device", "cuda",
              "--amp", "bf16", "--channels-last", "--json"]  # fmt: skip
    res = run("precise", ckpt, *common)
    assert res.exit_code == 0, res.stderr
    written = torch.load(tmp / "ck.precise.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in written["model"].values())
    for command, extra in (("inspect", []), ("ghost", ["--sizes", "2,4"]),
                           ("adapt", ["-o", str(tmp / "ad.pt")])):  # fmt: skip
        res = run(command, ckpt, *common, *extra)
        assert res.exit_code == 0, (command, res.stderr)
        assert json.loads(res.stdout)["device"].startswith("cuda")

    gpu = net().cuda()
    torch.save({"state_dict": gpu.state_dict()}, tmp / "gpu.pt")
    (tmp / "m.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n"
        "    return nn.Sequential(\n"
        "        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8),\n"
        "        nn.Linear(8, 4))\n"
    )
    x = torch.cat([b for b, _ in data(4)])
    torch.save(x, tmp / "x.pt")
    res = run("precise", tmp / "gpu.pt", "--model", f"{tmp / 'm.py'}:make", "--data",
              tmp / "x.pt", "--device", "cuda")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    out = torch.load(tmp / "gpu.precise.pt", weights_only=True)
    assert all(t.device.type == "cuda" for t in out["state_dict"].values())


def test_cuda_labels_outside_the_classes_are_one_error_and_the_device_still_works():
    # cross_entropy with such a label stops a CUDA process with a device-side assert: the
    # label is counted on the device instead, and the error raised once the sums are read
    from bnscope.errors import DataError

    bad = data(3)
    bad[1][1][2] = 9
    model = net()
    for fn in (
        lambda: bnscope.evaluate_models({"a": model}, bad, device="cuda"),
        lambda: bnscope.inspect(model, bad, device="cuda"),
        lambda: bnscope.ghost_analysis(model, bad, sizes=[2], device="cuda"),
    ):
        with pytest.raises(DataError, match="has labels outside the model's 4 classes"):
            fn()
    torch.cuda.synchronize()
    ev = bnscope.evaluate_models({"a": model}, data(3), device="cuda")
    assert ev.metrics["a"].accuracy is not None


def test_cuda_labels_on_the_device_are_read_once_per_device_fold_batches(
    monkeypatch: pytest.MonkeyPatch,
):
    """Labels yielded on the GPU are kept there and read in one transfer per DEVICE_FOLD
    batches (bounded device memory in a long run, no read per batch) and once at the end;
    the counts are those of the same labels on the CPU."""
    import numpy as np

    from bnscope.engine import labels, sync

    monkeypatch.setattr(labels, "DEVICE_FOLD", 4)
    batches = [y for _, y in data(10)]
    on_cpu, on_gpu = labels.LabelTally(), labels.LabelTally()
    before = sync.READS
    for y in batches:
        on_cpu.add(y, y.shape[0])
        on_gpu.add(y.cuda(), y.shape[0])
    assert sync.READS - before == 2 and len(on_gpu._device) == 2  # after batches 4 and 8
    want, got = on_cpu.counts(), on_gpu.counts()
    assert sync.READS - before == 3
    assert want is not None and got is not None
    np.testing.assert_array_equal(got.classes, want.classes)
    np.testing.assert_array_equal(got.totals, want.totals)
    np.testing.assert_allclose(got.squares, want.squares, rtol=1e-15)
    assert (got.batches, got.samples, got.single_class) == (
        want.batches,
        want.samples,
        want.single_class,
    )

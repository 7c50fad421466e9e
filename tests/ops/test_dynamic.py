"""Dynamic inspection: planted faults found with the right code and layer, no false alarm on
precise statistics, the EMA-noise z-score, the train/test comparison, state restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnscope.errors import DataError, UsageError
from bnscope.ops.inspect import STALE_Z, inspect
from bnscope.ops.precise import precise_bn

from ..schemacheck import check_document
from ..statecheck import assert_same_state, snapshot


class Net(nn.Module):
    """conv-BN-ReLU x3, pool, BN1d, linear; ``unused`` is defined but never called and
    ``shared`` runs twice per forward."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared = nn.BatchNorm2d(8)
        self.unused = nn.BatchNorm2d(8)
        self.head_bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.shared(self.b2(self.c2(h))))
        h = torch.relu(self.shared(h))
        return self.fc(self.head_bn(h.mean((2, 3))))


def make_data(n_batches: int = 30, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 4, (batch,), generator=g)
        x = torch.randn(batch, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.5
        out.append((x, y))
    return out


def ema_trained(data, seed: int = 0, epochs: int = 3) -> Net:
    """A fixed model whose EMA ran over the data (momentum 0.1): healthy statistics."""
    torch.manual_seed(seed)
    model = Net()
    model.train()
    with torch.no_grad():
        for _ in range(epochs):
            for x, _ in data:
                model(x)
    model.unused.num_batches_tracked.fill_(90)  # initialised but, as planted, never trained
    model.eval()
    return model


def by_code(report):
    out: dict[str, set] = {}
    for f in report.findings:
        out.setdefault(f.code, set()).add(f.layer)
    return out


def test_healthy_ema_of_a_fixed_model_is_not_stale():
    data = make_data()
    model = ema_trained(data)
    rep = inspect(model, data)
    status = {layer.name: layer.status for layer in rep.layers}
    assert "stale-ema" not in by_code(rep), [f.message for f in rep.findings]
    for name in ("b1", "b2", "head_bn"):
        layer = next(r for r in rep.layers if r.name == name)
        assert layer.z_mu is not None and layer.z_mu < STALE_Z, (name, layer)
        assert status[name] in ("ok", "noisy")


def test_precise_statistics_give_no_false_alarm():
    data = make_data()
    model = ema_trained(data)
    precise_bn(model, data)
    rep = inspect(model, data)
    codes = by_code(rep)
    assert "stale-ema" not in codes and "small-nbs" not in codes
    for layer in rep.layers:
        if layer.status not in ("not-called",):
            assert layer.d_mu_max < 1e-5 and layer.status == "ok", layer
    assert rep.extra["verdict"] in ("healthy", "gap")


def briefly_trained(data, steps: int) -> Net:
    """Momentum 0.1 except b2 (momentum None), trained ``steps`` batches: EMAs that still
    weigh their initial value by 0.9^steps."""
    torch.manual_seed(0)
    model = Net()
    model.b2.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in data[:steps]:
            model(x)
    model.unused.num_batches_tracked.fill_(steps)  # as if trained, but never called
    model.eval()
    return model


@pytest.mark.parametrize("operation", ["precise", "adapt"])
def test_recomputed_statistics_are_no_unwarmed_ema(operation):
    """The issue: after precise (or adapt) the dynamic report still said ema-warmup."""
    from bnscope.ops.adapt import adapt_bn

    data = make_data(12)
    model = briefly_trained(data, 5)  # 0.9^5 = 0.59
    warm = by_code(inspect(model, data))["ema-warmup"]
    assert warm == {"b1", "shared", "unused", "head_bn"}  # b2 (cumulative) is no EMA
    if operation == "precise":
        precise_bn(model, data)
    else:
        adapt_bn(model, data)
    rep = inspect(model, data)
    assert by_code(rep).get("ema-warmup", set()) == {"unused"}  # never ran: still unwarmed
    assert int(model.b2.num_batches_tracked) == 12  # the batches its average stands for
    layers = {layer.name: layer for layer in rep.layers}
    assert layers["b2"].status == "ok" and layers["b2"].z_mu is not None


def test_class_sorted_batches_are_reported():
    data = make_data(8)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    order = torch.argsort(y, stable=True)
    sorted_data = list(zip(x[order].split(32), y[order].split(32), strict=True))
    model = ema_trained(data)
    rep = inspect(model, sorted_data)
    assert by_code(rep)["non-iid-batches"] == {None}
    assert rep.extra["label_mix"]["effective_size"] < 2
    rep = inspect(model, data)  # the same samples, random batches
    assert "non-iid-batches" not in by_code(rep)
    assert 0.5 < rep.extra["label_mix"]["ratio"] < 1.5


def test_planted_faults_are_found_with_code_and_layer():
    data = make_data()
    model = ema_trained(data)
    with torch.no_grad():
        model.c2.weight.mul_(1.8)  # the model changed after its EMA: b2 is stale
        model.c2.bias.add_(0.5)
        model.b1.weight[3] = 0.0  # a dead channel
        model.head_bn.running_var[2] = 1e-9  # tiny variance
    fresh = nn.BatchNorm2d(8)  # a never-updated layer in place of b1's running stats
    model.b1.running_mean.copy_(fresh.running_mean)
    model.b1.running_var.copy_(fresh.running_var)
    model.b1.num_batches_tracked.zero_()
    rep = inspect(model, data)
    codes = by_code(rep)
    assert "b2" in codes["stale-ema"]
    assert codes["not-called"] == {"unused"}
    assert codes["reused"] == {"shared"}
    assert "b1" in codes["never-updated"]
    assert "b1" not in codes.get("stale-ema", set())  # never-updated explains it
    assert "b1" in codes["dead-channel"]
    assert "head_bn" in codes["tiny-variance"]
    layers = {layer.name: layer for layer in rep.layers}
    assert layers["b2"].status == "stale" and layers["b2"].z_mu > STALE_Z
    assert layers["shared"].calls_per_forward == 2
    assert layers["unused"].status == "not-called"
    assert [r.name for r in rep.layers] == ["b1", "b2", "shared", "unused", "head_bn"]
    stale = next(f for f in rep.findings if f.code == "stale-ema")
    assert "would change accuracy from" in stale.fix
    assert rep.extra["verdict"] == "stale"


def test_momentum_none_and_untracked_layers():
    data = make_data(8)
    model = ema_trained(data)
    model.b2.momentum = None  # cumulative average over num_batches_tracked batches
    model.head_bn = nn.BatchNorm1d(8, track_running_stats=False)
    rep = inspect(model, data)
    layers = {layer.name: layer for layer in rep.layers}
    assert layers["b2"].momentum is None and layers["b2"].z_mu is not None
    assert layers["head_bn"].status == "skipped"
    assert "track_running_stats" in layers["head_bn"].reason


def test_train_test_comparison_matches_direct_computation():
    data = make_data(6)
    model = ema_trained(data)
    with torch.no_grad():
        model.c2.weight.mul_(1.5)
    rep = inspect(model, data)
    c = rep.extra["metrics"]
    v = c["variants"]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        model.eval()
        running_out = model(x)
        running = running_out.argmax(1)
    assert v["running"]["accuracy"] == pytest.approx(float((running == y).float().mean()))
    assert (v["running"]["agreement"], v["running"]["kl"], v["running"]["rel_diff"]) == (
        1.0, 0.0, 0.0,
    )  # fmt: skip
    twin = Net()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    for m in (twin.b1, twin.b2, twin.shared, twin.head_bn):
        m.train()
    with torch.no_grad():
        batch_out = torch.cat([twin(xb) for xb, _ in data])
    batch = batch_out.argmax(1)
    assert v["batch"]["accuracy"] == pytest.approx(float((batch == y).float().mean()))
    assert v["batch"]["agreement"] == pytest.approx(float((batch == running).float().mean()))
    # ||out_batch - out_running|| / ||out_running|| over every output value
    rel = (batch_out.double() - running_out.double()).norm() / running_out.double().norm()
    assert v["batch"]["rel_diff"] == pytest.approx(float(rel), rel=1e-5)
    kl = torch.nn.functional.kl_div(
        batch_out.double().log_softmax(1), running_out.double().log_softmax(1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    assert v["batch"]["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert c["has_labels"] is True and c["samples"] == len(y) and c["reference"] == "running"
    assert list(v) == ["running", "precise", "batch"] and "data" not in c  # a job adds it


def test_state_restored_on_success_and_failure():
    data = make_data(4)
    model = ema_trained(data)
    model.train()
    model.b2.eval()
    before = snapshot(model)
    inspect(model, data)
    assert_same_state(before, snapshot(model))

    class Breaks:
        def __init__(self) -> None:
            self.reads = 0

        def __iter__(self):
            self.reads += 1
            for i, (x, y) in enumerate(data):
                yield (x[:, :2] if self.reads > 1 and i == 2 else x), y

    with pytest.raises(DataError, match="comparison pass"):
        inspect(model, Breaks())
    assert_same_state(before, snapshot(model))


def test_bad_input():
    model = Net()
    with pytest.raises(UsageError, match="one-shot"):
        inspect(model, (b for b in make_data(2)))
    with pytest.raises(UsageError, match="positive integer"):
        inspect(model, make_data(2), batches=0)


def test_report_document():
    data = make_data(4)
    rep = inspect(ema_trained(data), data, batches=3)
    doc = rep.to_dict()
    assert doc["schema"] == "bnscope.inspect/2"
    assert doc["layers"][0].keys() >= {"name", "num_features", "d_mu_median", "z_mu", "status"}
    assert doc["verdict"] in ("stale", "gap", "noisy", "healthy") and doc["verdict_text"]
    assert doc["batches"] == 3 and doc["metrics"]["samples"] == 96
    check_document(doc)  # a library report: no job keys


def test_public_api_name():
    import bnscope
    import bnscope.ops.inspect  # noqa: F401 - importing the module must not shadow the function

    assert bnscope.inspect is inspect and bnscope.ghost_analysis.__module__ == "bnscope.ops.ghost"


def test_batch_spread_and_ema_noise_match_a_direct_computation():
    """BN on the input itself: the spread of batch means and the EMA noise are what the data
    says (population variance of the per-batch channel means, in units of sigma_pop)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.2)
    model = nn.Sequential(bn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    data = [torch.randn(16, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1
            for _ in range(12)]  # fmt: skip
    rep = inspect(model, data)
    x = torch.cat(data).double()
    var_pop = x.var((0, 2, 3), unbiased=False)
    batch_means = torch.stack([b.double().mean((0, 2, 3)) for b in data])
    var_mu_b = batch_means.var(0, unbiased=False)
    sigma = (var_pop + bn.eps).sqrt()
    layer = rep.layers[0]
    assert layer.batch_calls == 12
    assert layer.batch_spread_mu == pytest.approx(
        float((var_mu_b.sqrt() / sigma).median()), rel=1e-6
    )
    noise = (0.2 / (2 - 0.2) * var_mu_b).sqrt() / sigma
    assert layer.ema_noise_mu == pytest.approx(float(noise.median()), rel=1e-6)

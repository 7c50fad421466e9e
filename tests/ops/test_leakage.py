"""Information leakage within a batch (bnscope/ops/leakage.py): planted leaks flagged, healthy
counterparts not, the per-sample change against a float64 reference, the model left as it
was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnscope.errors import DataError, UsageError
from bnscope.ops.leakage import (
    INDEPENDENT_TOL,
    LEAK_EXCESS,
    LEAK_RATIO,
    leakage_analysis,
    parse_group_by,
    spread_ratio,
)

from ..models import make_mlp, make_no_bn, make_tiny
from ..schemacheck import check_document
from ..standins import frozen_backbone
from ..statecheck import assert_same_state, snapshot


def class_mean_data(n: int = 384, classes: int = 3, seed: int = 0):
    """3x8x8 inputs whose classes differ in their channel means: a BN layer's batch mean over
    a batch of one class is that class's mean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 2.0, 0.0], [0.0, -1.0, 2.0]])[:classes]
    x = torch.randn(n, 3, 8, 8, generator=g) + means[y][:, :, None, None]
    return x, y


def train(model: nn.Module, batches, steps: int, lr: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = batches(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def label_model():
    """make_tiny trained with i.i.d. batches on data whose classes differ in channel means."""
    x, y = class_mean_data()
    g = torch.Generator().manual_seed(1)

    def batches(_):
        idx = torch.randint(0, len(x), (32,), generator=g)
        return x[idx], y[idx]

    return train(make_tiny(3), batches, 30)


def tensor_batches(x, y=None, size: int = 32):
    return [
        (x[i : i + size], y[i : i + size]) if y is not None else x[i : i + size]
        for i in range(0, len(x), size)
    ]


def test_label_grouped_batches_leak_and_a_random_key_does_not(label_model):
    x, y = class_mean_data()
    random_key = torch.randint(0, 48, (len(x),), generator=torch.Generator().manual_seed(7))
    before = snapshot(label_model)
    rep = leakage_analysis(label_model, tensor_batches(x, y), "label", groups={"key": random_key})
    assert_same_state(before, snapshot(label_model))
    check_document(rep.to_dict())
    extra = rep.extra
    assert (extra["batch_size"], extra["samples"], extra["batches"]) == (32, 384, 12)
    assert extra["left_out"] == 0 and extra["metric"] == "kl" and extra["has_labels"]
    assert extra["group_by"] == ["label", "key"] and extra["verdict"] == "leak"
    rows = {r["name"]: r for r in extra["arrangements"]}
    assert list(rows) == ["iid", "iid-2", "label", "key"]
    assert [rows[n]["role"] for n in rows] == ["reference", "noise", "grouped", "grouped"]
    iid, noise, label, key = rows["iid"], rows["iid-2"], rows["label"], rows["key"]
    assert (iid["agreement"], iid["kl_mean"], iid["ratio"], iid["leak"]) == (1.0, 0.0, None, None)
    # the planted leak: one class per batch normalizes the class means away
    assert label["groups"] == 3 and label["single_group_batches"] >= 9
    assert label["leak"] is True and label["ratio"] > 10 * LEAK_RATIO
    assert label["excess"] > 10 * LEAK_EXCESS and label["greater_fraction"] > 0.9
    assert label["accuracy"] < iid["accuracy"] - 0.3
    assert label["kl_mean"] == pytest.approx(label["ratio"] * noise["kl_mean"])
    # the healthy counterpart: a key unrelated to the data is just another random order
    assert key["groups"] == 48 and key["leak"] is False
    assert 0.5 < key["ratio"] < LEAK_RATIO and abs(key["excess"]) < LEAK_EXCESS
    assert [f.code for f in rep.findings] == ["batch-leakage"]
    finding = rep.findings[0]
    assert finding.severity == "warning" and finding.layer in ("1", "4")
    assert "batches grouped by label" in finding.message and "train with batches" in finding.fix
    # the layers: one class per batch makes the batch means vary far more than i.i.d. ones;
    # in the first layer a batch mean is worth about one sample
    layers = {layer.name: layer for layer in rep.layers}
    assert list(layers) == ["1", "4"]
    eff = {r.arrangement: r.effective_size for r in layers["1"].arrangements}
    assert eff["label"] < 3 and eff["iid"] > 10 and eff["key"] > 10
    assert spread_ratio(layers[finding.layer], "label") > 20
    assert spread_ratio(layers[finding.layer], "key") < 3
    assert "vary" in finding.message and f"batch means of {finding.layer}" in finding.message
    assert list(rep.arrays["leakage"]["orders"]) == ["iid", "iid-2", "label", "key"]


def image_data(images: int = 40, per: int = 8, seed: int = 0):
    """RoIs of images: each image has a strong offset shared by its samples (a hidden image
    id), and a sample's label says whether it is above its image's median on channel 0: only
    relative to the other RoIs of its image."""
    g = torch.Generator().manual_seed(seed)
    n = images * per
    z = torch.randn(n, generator=g)
    image = torch.arange(n) // per
    x = 3 * torch.randn(images, 6, generator=g)[image] + 0.3 * torch.randn(n, 6, generator=g)
    x[:, 0] += z
    y = (z > z.view(images, per).median(1).values[image]).long()
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm], image[perm]


def test_a_model_trained_on_image_grouped_batches_reads_the_image_from_its_batch():
    """The R-CNN case: trained with all RoIs of one image per batch, the model uses the batch
    statistics (the image's offset) to classify; i.i.d. batches take that away."""
    x, y, image = image_data()
    members = [torch.nonzero(image == i).flatten() for i in range(40)]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(2))

    def batches(step):
        idx = members[int(order[step % 40])]
        return x[idx], y[idx]

    model = train(make_mlp(6, 2), batches, 120)
    data = [
        {"x": x[i : i + 8], "y": y[i : i + 8], "image_id": image[i : i + 8]}
        for i in range(0, len(x), 8)
    ]
    random_key = torch.randint(0, 40, (len(x),), generator=torch.Generator().manual_seed(3))
    rep = leakage_analysis(model, data, "image_id", groups={"random": random_key})
    rows = {r["name"]: r for r in rep.extra["arrangements"]}
    assert rep.extra["batch_size"] == 8 and rows["image_id"]["single_group_batches"] == 40
    assert rows["image_id"]["leak"] and rows["image_id"]["ratio"] > 2 * LEAK_RATIO
    # grouped batches raise train-mode accuracy: the leak the model learned to use
    assert rows["image_id"]["accuracy"] > rows["iid"]["accuracy"] + 0.2
    assert rows["random"]["leak"] is False and rows["random"]["ratio"] < LEAK_RATIO
    assert [(f.code, f.layer) for f in rep.findings] == [("batch-leakage", "1")]
    assert "overstate the model" in rep.findings[0].message


@pytest.mark.parametrize("make", [frozen_backbone, make_no_bn])
def test_outputs_that_do_not_depend_on_the_batch_are_never_flagged(make):
    torch.manual_seed(0)
    model = make().eval()
    if make is make_no_bn:
        x = torch.randn(96, 4)
        y = (x[:, 0] > 0).long()
    else:
        x, y = class_mean_data(96)
        y = y.clamp(max=3)
    rep = leakage_analysis(model, tensor_batches(x, y, 16), "label")
    assert rep.extra["verdict"] == "independent" and rep.findings == ()
    assert "do not depend on which samples share a batch" in rep.extra["verdict_text"]
    for row in rep.extra["arrangements"][1:]:
        assert row["l2_mean"] < INDEPENDENT_TOL and row["leak"] in (None, False)
    statuses = {layer.status for layer in rep.layers}
    assert statuses <= {"skipped"}


def bn_mlp64() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()


def reference_outputs(model: nn.Module, x: torch.Tensor, order: torch.Tensor, size: int):
    """The model with BN normalizing each batch of ``order`` by its own float64 statistics,
    written out: h = W1 x + b1, (h - mean) / sqrt(biased var + eps) * gamma + beta, ReLU,
    W2 . + b2; rows in sample order."""
    lin1, bn, _, lin2 = model
    out = torch.empty(len(x), 3, dtype=torch.float64)
    with torch.no_grad():
        for index in order.view(-1, size):
            h = x[index] @ lin1.weight.T + lin1.bias
            mean = h.mean(0)
            var = ((h - mean) ** 2).mean(0)
            h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
            out[index] = torch.relu(h) @ lin2.weight.T + lin2.bias
    return out


def test_per_sample_changes_equal_a_float64_reference():
    model = bn_mlp64().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(14, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3, 4, 4])
    data = [(x[:7], y[:7], ids[:7]), (x[7:], y[7:], ids[7:])]
    rep = leakage_analysis(model, data, lambda b: b[2], batch_size=4, samples=None)
    arrays = rep.arrays["leakage"]
    assert rep.extra["samples"] == 12 and rep.extra["left_out"] == 2
    used = x[:12]
    ref = reference_outputs(model, used, arrays["orders"]["iid"], 4)
    rms = ref.square().sum(1).mean().sqrt()
    for name in ("iid-2", "<lambda>"):
        out = reference_outputs(model, used, arrays["orders"][name], 4)
        log_p, log_q = F.log_softmax(ref, 1), F.log_softmax(out, 1)
        kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(1)
        l2 = (out - ref).norm(dim=1) / rms
        assert torch.allclose(arrays["kl"][name], kl, rtol=1e-10, atol=1e-14)
        assert torch.allclose(arrays["l2"][name], l2, rtol=1e-10, atol=1e-14)
        assert torch.equal(arrays["change"][name], arrays["kl"][name])
        row = next(r for r in rep.extra["arrangements"] if r["name"] == name)
        assert row["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-12)
        assert row["kl_median"] == pytest.approx(float(kl.quantile(0.5)), rel=1e-12)
        agree = (ref.argmax(1) == out.argmax(1)).double().mean()
        assert row["agreement"] == pytest.approx(float(agree))
    grouped = next(r for r in rep.extra["arrangements"] if r["name"] == "<lambda>")
    # only 3 batches of 4: below MIN_BATCHES, never judged
    assert grouped["groups"] == 4 and grouped["leak"] is False  # id 4 is in the left-out
    assert "Not judged: 3 batches of 4" in rep.extra["verdict_text"]


def test_outputs_that_are_not_class_scores_use_the_relative_l2_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).eval()
    x = torch.randn(64, 3)
    group = (x[:, 0] > 0).long()
    x[:, 1] += 3 * group  # the groups differ in one feature's mean
    rep = leakage_analysis(model, [x[:32], x[32:]], None, batch_size=8, groups=group)
    assert rep.extra["metric"] == "l2" and not rep.extra["has_labels"]
    row = rep.extra["arrangements"][2]
    assert row["name"] == "groups" and row["agreement"] is None and row["kl_mean"] is None
    assert row["accuracy"] is None and row["leak"] is True and row["ratio"] > LEAK_RATIO
    assert row["excess"] == pytest.approx(row["l2_mean"] - rep.extra["arrangements"][1]["l2_mean"])
    check_document(rep.to_dict())


def test_the_same_seed_gives_the_same_report(label_model):
    x, y = class_mean_data(128)
    a = leakage_analysis(label_model, tensor_batches(x, y), seed=4)
    b = leakage_analysis(label_model, tensor_batches(x, y), seed=4)
    c = leakage_analysis(label_model, tensor_batches(x, y), seed=5)
    assert a.to_dict() == b.to_dict()
    orders = [r.arrays["leakage"]["orders"]["iid"] for r in (a, c)]
    assert not torch.equal(*orders)


def test_parse_group_by():
    fn = lambda batch: batch  # noqa: E731
    assert parse_group_by("label, image_id") == ["label", "image_id"]
    assert parse_group_by(["label", fn]) == ["label", fn]
    assert parse_group_by(None) == []
    for bad, message in [
        ("label,,x", "empty name"),
        ("label,label", "names 'label' twice"),
        ("iid-2", "the name of an i.i.d. arrangement"),
        ([3], "takes names and functions"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_group_by(bad)


def test_bad_requests_are_one_error():
    model = make_mlp(6, 3).eval()
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    with pytest.raises(UsageError, match="no grouping to compare"):
        leakage_analysis(model, data, None)
    with pytest.raises(UsageError, match="samples=2 is not an integer >= 4"):
        leakage_analysis(model, data, samples=2)
    with pytest.raises(UsageError, match="batch_size=1 is not an integer >= 2"):
        leakage_analysis(model, data, batch_size=1)
    with pytest.raises(DataError, match="24 samples make fewer than 2 batches of 16"):
        leakage_analysis(model, data, batch_size=16)
    with pytest.raises(UsageError, match="repeats a group_by= name"):
        leakage_analysis(model, data, "groups", groups=torch.zeros(24))
    pooled = nn.Sequential(make_mlp(6, 3), nn.Flatten(0))  # one output row for the batch
    with pytest.raises(DataError, match="compares outputs sample by sample"):
        leakage_analysis(pooled.eval(), data, batch_size=4)

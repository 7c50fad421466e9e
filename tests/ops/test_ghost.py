"""Ghost-size analysis: chunking, noise vs the i.i.d. expectation, effective size, findings,
model state restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnscope.errors import DataError, UsageError
from bnscope.ops.ghost import (
    NON_IID_RATIO,
    ghost_analysis,
    ghost_forwards,
    normalize_chunks,
    parse_sizes,
)

from ..schemacheck import check_document
from ..statecheck import assert_same_state, snapshot


def conv_model(width: int = 8, classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def iid_batches(n_batches: int = 40, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, 8, 8, generator=g) + 1.5 * torch.randn(
            batch, 3, 1, 1, generator=g
        )
        out.append((x, torch.randint(0, 4, (batch,), generator=g)))
    return out


def grouped_batches(n_batches: int = 40, batch: int = 64, groups: int = 4, seed: int = 0):
    """Each batch is ``groups`` groups of samples sharing a strong random offset (frames of a
    few videos, crops of a few images)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    per = batch // groups
    for _ in range(n_batches):
        offset = 1.5 * torch.randn(groups, 1, 3, 1, 1, generator=g)
        x = torch.randn(groups, per, 3, 8, 8, generator=g)
        x = x + 0.3 * torch.randn(groups, per, 3, 1, 1, generator=g) + offset
        out.append((x.reshape(batch, 3, 8, 8), torch.randint(0, 4, (batch,), generator=g)))
    return out


# -- sizes and chunking ---------------------------------------------------------------------
def test_parse_sizes():
    assert parse_sizes("16, 2,4,4") == [2, 4, 16]
    assert parse_sizes([8, 2]) == [2, 8]
    for bad, fragment in [
        ("1,2", "too small"),
        ("0", "too small"),
        ("a,b", "comma-separated integers"),
        ("2.5", "comma-separated integers"),
        ("", "no ghost sizes"),
        ([2, 2.5], "integers"),
        ([True], "integers"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            parse_sizes(bad)


@pytest.mark.parametrize("shape,sizes", [((10, 3, 4, 4), [4, 4, 2]), ((9, 5), [4, 5])])
def test_normalize_chunks_gives_zero_mean_unit_variance(shape, sizes):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    y, st = normalize_chunks(x, sizes, eps=0.0)
    means, var = st.mean, st.var
    start = 0
    dims = (0, *range(2, len(shape)))
    for k, s in enumerate(sizes):
        chunk, orig = y[start : start + s], x[start : start + s]
        torch.testing.assert_close(chunk.mean(dims), torch.zeros(shape[1], dtype=torch.float64))
        torch.testing.assert_close(
            chunk.var(dims, unbiased=False), torch.ones(shape[1], dtype=torch.float64)
        )
        torch.testing.assert_close(means[k], orig.mean(dims))
        torch.testing.assert_close(var[k], orig.var(dims, unbiased=False))
        start += s
    per = x.reshape(shape[0], shape[1], -1)
    torch.testing.assert_close(st.sample_mean, per.mean(2))
    torch.testing.assert_close(st.sample_var, per.var(2, unbiased=False))
    # with the affine transform: gamma * normalized + beta
    w, b = (
        torch.rand(shape[1], dtype=torch.float64) + 0.5,
        torch.randn(shape[1], dtype=torch.float64),
    )
    y2, _ = normalize_chunks(x, sizes, 0.0, w, b)
    view = (1, -1) + (1,) * (len(shape) - 2)
    torch.testing.assert_close(y2, y * w.view(view) + b.view(view))


def test_ghost_size_of_the_batch_equals_batchnorm_training():
    torch.manual_seed(0)
    model = conv_model()
    x = torch.randn(16, 3, 8, 8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    model.eval()
    with torch.no_grad(), ghost_forwards(layers, 16):
        ghost = model(x)
    before = snapshot(model)
    reference = conv_model()
    reference.load_state_dict(model.state_dict())
    reference.train()
    with torch.no_grad():
        plain = reference(x)
    torch.testing.assert_close(ghost, plain, rtol=1e-4, atol=1e-5)
    assert_same_state(before, snapshot(model))  # forwards restored, buffers untouched
    assert all("forward" not in m.__dict__ for m in layers.values())


# -- the analysis -----------------------------------------------------------------------------
def test_iid_noise_falls_like_inverse_sqrt_g_and_effective_size_is_g():
    torch.manual_seed(0)
    model = conv_model()
    rep = ghost_analysis(model, iid_batches(), sizes=[2, 4, 8, 16])
    first = rep.layers[0]
    assert first.name == "1" and first.status == "analysed"
    noise = {s.size: s.noise_mu for s in first.sizes}
    # 1/sqrt(g): each doubling divides the noise by sqrt(2) (chunks: 1280 .. 160 per size)
    for a, b in [(2, 4), (4, 8), (8, 16)]:
        assert noise[a] / noise[b] == pytest.approx(math.sqrt(2), rel=0.1)
    for s in first.sizes:
        assert s.noise_mu == pytest.approx(s.iid_mu, rel=0.1)
        assert 0.75 * s.size < s.effective_size < 1.33 * s.size
    assert not [f for f in rep.findings if f.code == "non-iid-batches"]


def test_correlated_batches_have_low_effective_size_and_are_reported():
    torch.manual_seed(0)
    model = conv_model()
    rep = ghost_analysis(model, grouped_batches(), sizes=[4, 16])
    first = rep.layers[0]
    eff16 = first.sizes[-1].effective_size
    assert eff16 < NON_IID_RATIO * 16 / 2  # clearly lower: samples in a group share an offset
    codes = [(f.code, f.layer, f.severity) for f in rep.findings]
    assert ("non-iid-batches", "1", "warning") in codes
    row16 = rep.extra["sizes"][-1]
    assert row16["effective_ratio"] < NON_IID_RATIO


def test_small_nbs_is_reported_for_noisy_sizes():
    # logits = BN output: with 2 samples per chunk every value is +-1, so predictions change
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(6))
    y = torch.randint(0, 6, (512 * 8,))
    x = 4 * nn.functional.one_hot(y, 6) + torch.randn(512 * 8, 6)  # confident classes ...
    x = x * torch.linspace(0.5, 3, 6) + torch.linspace(-2, 2, 6)  # ... BN must undo the scales
    data = [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]
    with torch.no_grad():
        model.train()
        for xb, _ in data:
            model(xb)
    rep = ghost_analysis(model, data, sizes=[2, 512])
    rows = {r["size"]: r for r in rep.extra["sizes"]}
    assert rows[2]["agreement"] < 0.95 and rows[512]["agreement"] > 0.95
    assert rep.extra["metrics"]["variants"]["precise"]["accuracy"] > rows[2]["accuracy"] + 0.02
    small = [f for f in rep.findings if f.code == "small-nbs"]
    assert len(small) == 1
    assert small[0].severity == "info"  # 2 is below the data's batch size (512)
    assert "2 or fewer" in small[0].message and "ghost_size=512" in small[0].fix


def test_small_nbs_at_the_batch_size_is_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(6))
    x = torch.randn(4 * 100, 6) + torch.linspace(-1, 1, 6)
    data = [x[i : i + 4] for i in range(0, len(x), 4)]
    rep = ghost_analysis(model, data, sizes=[2, 4])
    small = [f for f in rep.findings if f.code == "small-nbs"]
    assert small and small[0].severity == "warning" and "batch size" in small[0].message
    assert rep.extra["metrics"]["has_labels"] is False
    assert all(r["accuracy"] is None for r in rep.extra["sizes"])


def test_remainders_and_skipped_sizes_are_reported():
    torch.manual_seed(0)
    model = conv_model()
    data = [(torch.randn(10, 3, 8, 8), torch.randint(0, 4, (10,))) for _ in range(3)]
    data.append((torch.randn(7, 3, 8, 8), torch.randint(0, 4, (7,))))  # a short last batch
    rep = ghost_analysis(model, data, sizes=[4, 10, 12])
    rows = {r["size"]: r for r in rep.extra["sizes"]}
    # batches of 10 -> 4, 4, 2; the last batch of 7 -> 4, 3
    assert rows[4]["chunks"] == 3 * 3 + 2
    assert rows[4]["remainder_chunks"] == 3 + 1 and rows[4]["remainder_samples"] == 3 * 2 + 3
    assert "remainder" in rows[4]["note"]
    assert rows[10]["chunks"] == 4 and rows[10]["remainder_chunks"] == 1
    assert rows[12]["status"] == "skipped" and "larger than the batch size (10)" in rows[12]["note"]
    assert rep.extra["samples"] == 37 and rep.extra["batch_size"] == 10


def test_single_sample_remainder_joins_previous_chunk_for_1d_inputs():
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    data = [torch.randn(9, 5) for _ in range(4)]
    rep = ghost_analysis(model, data, sizes=[4])
    row = rep.extra["sizes"][0]
    assert row["chunks"] == 4 * 2 and row["remainder_chunks"] == 4
    assert row["remainder_samples"] == 4  # one merged sample per batch


def test_reused_not_called_and_skipped_layers():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.unused = nn.BatchNorm1d(4)
            self.free = nn.BatchNorm1d(4, track_running_stats=False)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.bn(self.free(self.bn(x))))

    model = Model()
    rep = ghost_analysis(model, [torch.randn(16, 4) for _ in range(3)], sizes=[4])
    by = {layer.name: layer for layer in rep.layers}
    assert [layer.name for layer in rep.layers] == ["bn", "unused", "free"]
    assert by["bn"].status == "analysed" and by["bn"].calls_per_forward == 2
    assert by["bn"].sizes[0].chunks == 2 * 3 * 4  # both calls' chunks
    assert by["unused"].status == "not-called"
    assert by["free"].status == "skipped"


def test_model_state_is_restored_on_success_and_failure():
    torch.manual_seed(0)
    model = conv_model()
    model[1].momentum = None
    model.train()
    model[4].eval()
    before = snapshot(model)
    ghost_analysis(model, iid_batches(4, 16), sizes=[2, 8])
    assert_same_state(before, snapshot(model))

    class Fails:
        """Good batches for the collection pass (the first reading), then a wrong shape in the
        ghost pass (the second)."""

        def __init__(self) -> None:
            self.reads = 0

        def __iter__(self):
            self.reads += 1
            for i in range(3):
                bad = self.reads > 1 and i == 1
                yield torch.randn(8, 5 if bad else 3, 8, 8)

    with pytest.raises(DataError, match="ghost pass"):
        ghost_analysis(model, Fails(), sizes=[2])
    assert_same_state(before, snapshot(model))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bad_inputs():
    model = conv_model()
    small = [torch.randn(3, 3, 8, 8) for _ in range(2)]
    with pytest.raises(DataError, match="fewer than every ghost size"):
        ghost_analysis(model, small, sizes=[4, 8])
    with pytest.raises(UsageError, match="one-shot iterator"):
        ghost_analysis(model, (torch.randn(8, 3, 8, 8) for _ in range(2)), sizes=[2])
    with pytest.raises(DataError, match="no batches"):
        ghost_analysis(model, [], sizes=[2])
    with pytest.raises(UsageError, match="too small"):
        ghost_analysis(model, small, sizes=[1])


def test_report_document_and_progress():
    torch.manual_seed(0)
    calls = []
    rep = ghost_analysis(
        conv_model(), iid_batches(3, 8), sizes=[2, 4], batches=3,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    doc = rep.to_dict()
    assert doc["schema"] == "bnscope.ghost/2"
    check_document(doc)  # a library report: no job keys
    assert [r["size"] for r in doc["sizes"]] == [2, 4]
    assert doc["layers"][0]["sizes"][0].keys() >= {"size", "noise_mu", "iid_mu", "effective_size"}
    assert calls[-1] == (6, 6) and calls[0] == (0, 6)

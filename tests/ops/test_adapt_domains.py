"""Adaptive BN on several target domains (adapt_domains): each domain's statistics are its
population statistics (float64 references) and those of a one-domain adapt_bn run; the model
keeps its source statistics; the divergence matrices against closed forms, with planted
domains far apart and two i.i.d. halves of one domain close (no finding)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from bnscope.errors import DataError, UsageError
from bnscope.nn import convert_to_split_bn, load_domain_statistics, use_domain
from bnscope.ops.adapt import SHIFT_KL, adapt_bn, symmetric_kl
from bnscope.ops.domains import adapt_domains, domain_state_dict, parse_domains

from ..schemacheck import check_document
from ..statecheck import assert_same_state, snapshot
from .test_precise import batches_of


class Net(nn.Module):
    """BN on the input (closed-form population statistics), then conv-BN-ReLU and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(self.bn0(x))))
        return self.head(h.mean((2, 3)))


@functools.cache
def _trained() -> Net:
    torch.manual_seed(0)
    net = Net().train()
    with torch.no_grad():
        for _ in range(40):
            net(torch.randn(16, 3, 6, 6))
    return net.eval()


def source_net() -> Net:
    """A net whose running statistics are those of N(0, 1) inputs (after some training): a
    fresh copy each time."""
    return copy.deepcopy(_trained())


def domain(shift: float, scale: float, n: int = 96, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen) * scale + shift


def population(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.double()
    return xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)


BRIGHT = domain(2.0, 1.0)
LOW_CONTRAST = domain(0.0, 0.3, seed=2)
SPLIT = (16, 32, 8, 40)  # uneven batches: the statistics do not depend on the split


def test_each_domain_gets_its_population_statistics_and_the_model_keeps_its_own():
    net = source_net()
    before = snapshot(net)
    rep = adapt_domains(
        net, {"bright": batches_of(BRIGHT, SPLIT), "lowc": batches_of(LOW_CONTRAST, SPLIT)}
    )
    assert_same_state(before, snapshot(net))  # source statistics, modes, hooks: as before
    for name, x in (("bright", BRIGHT), ("lowc", LOW_CONTRAST)):
        state = domain_state_dict(rep, name)
        mu, var = population(x)
        torch.testing.assert_close(state["bn0.running_mean"].double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["bn0.running_var"].double(), var, rtol=1e-5, atol=0)
        # equal to a one-domain adapt_bn run on a copy of the source model, bit for bit
        alone = source_net()
        adapt_bn(alone, batches_of(x, SPLIT))
        stats = {k: v for k, v in alone.state_dict().items() if k.split(".")[1].startswith(
            ("running_", "num_batches"))}  # fmt: skip
        assert sorted(state) == sorted(stats)
        for key, value in stats.items():
            assert torch.equal(state[key], value), (name, key)
        entry = next(e for e in rep.extra["domains"] if e["name"] == name)
        assert entry["samples"] == 96 and entry["batches"] == 4
        assert [r["status"] for r in entry["layers"]] == ["updated", "updated"]
    # the source statistics are reachable too
    assert torch.equal(domain_state_dict(rep, "source")["bn0.running_mean"], net.bn0.running_mean)
    with pytest.raises(UsageError, match="'fog' is not a domain of this report"):
        domain_state_dict(rep, "fog")
    check_document(rep.to_dict())  # a library report (no job keys) validates too


def test_order_and_prior_do_not_chain_domains():
    """Every domain starts from the source statistics: the order of the domains does not
    matter, and a prior mixes each domain with the source, not with the previous domain."""
    data = {"a": batches_of(BRIGHT, SPLIT), "b": batches_of(LOW_CONTRAST, SPLIT)}
    net = source_net()
    forward = adapt_domains(net, data, prior=96)
    backward = adapt_domains(net, dict(reversed(list(data.items()))), prior=96)
    for name in data:
        a, b = domain_state_dict(forward, name), domain_state_dict(backward, name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    mu_s = net.bn0.running_mean.double()
    mu_t, _ = population(LOW_CONTRAST)
    got = domain_state_dict(forward, "b")["bn0.running_mean"].double()
    torch.testing.assert_close(got, 0.5 * mu_s + 0.5 * mu_t, rtol=1e-5, atol=1e-6)  # lambda 1/2


def test_divergence_matrix_closed_form_planted_and_healthy():
    net = source_net()
    healthy = domain(0.0, 1.0, n=192, seed=7)
    rep = adapt_domains(
        net,
        {
            "bright": batches_of(BRIGHT, SPLIT),
            "lowc": batches_of(LOW_CONTRAST, SPLIT),
            "half1": list(healthy[:96].split(32)),
            "half2": list(healthy[96:].split(32)),
        },
    )
    assert rep.extra["divergence_labels"] == ["source", "bright", "lowc", "half1", "half2"]
    layer = next(r for r in rep.layers if r.name == "bn0")
    m = layer.divergence
    assert m is not None and len(m) == 5
    for i in range(5):
        assert m[i][i] == 0.0
        for j in range(5):
            assert m[i][j] == m[j][i]
    # the closed form: median over channels of the symmetric KL of the population Gaussians
    eps = net.bn0.eps
    (mu_b, var_b), (mu_l, var_l) = population(BRIGHT), population(LOW_CONTRAST)
    expected = symmetric_kl(mu_b, var_b + eps, mu_l, var_l + eps).median().item()
    assert m[1][2] == pytest.approx(expected, rel=1e-6)
    mu_s, var_s = net.bn0.running_mean.double(), net.bn0.running_var.double()
    source_kl = symmetric_kl(mu_s, var_s + eps, mu_b, var_b + eps).median().item()
    assert m[0][1] == pytest.approx(source_kl, rel=1e-6)
    # planted: a shift of 2 sigma and a variance ratio of ~11 are far apart ...
    assert m[1][2] > 10 and m[0][2] > 1
    # ... while two i.i.d. halves of one domain differ by noise only (~ 2 / n per channel)
    assert m[3][4] < 0.01
    assert layer.pair == ("bright", "lowc") and layer.pair_kl == max(
        v for i, row in enumerate(m) for j, v in enumerate(row) if 0 < i < j
    )
    divergence = [f for f in rep.findings if f.code == "domain-divergence"]
    assert {f.layer for f in divergence} <= {"bn0", "bn1"} and divergence
    assert all("bright and lowc" in f.message for f in divergence)
    # the median over layers of the per-layer matrices
    summary = rep.extra["divergence"]
    both = [r.divergence[1][2] for r in rep.layers]
    assert summary[1][2] == pytest.approx(sum(both) / 2)
    # domain findings name their domain
    shifts = [f for f in rep.findings if f.code == "domain-shift"]
    assert any(f.message.startswith("domain lowc: ") for f in shifts)


def test_two_iid_halves_raise_no_divergence_finding():
    healthy = domain(0.5, 1.5, n=256, seed=3)
    rep = adapt_domains(
        source_net(),
        {"first": list(healthy[:128].split(32)), "second": list(healthy[128:].split(32))},
    )
    assert not [f for f in rep.findings if f.code == "domain-divergence"]
    assert all(r.pair_kl is not None and r.pair_kl < SHIFT_KL / 10 for r in rep.layers)
    # one domain: a 2x2 matrix, no pair
    one = adapt_domains(source_net(), {"only": list(healthy.split(64))})
    assert all(r.pair is None and len(r.divergence) == 2 for r in one.layers)
    assert one.extra["divergence_labels"] == ["source", "only"]


def test_domain_state_dicts_build_a_split_model():
    net = source_net()
    rep = adapt_domains(
        net, {"bright": batches_of(BRIGHT, SPLIT), "lowc": batches_of(LOW_CONTRAST, SPLIT)}
    )
    split = convert_to_split_bn(copy.deepcopy(net), 2)
    load_domain_statistics(
        split, [domain_state_dict(rep, "bright"), domain_state_dict(rep, "lowc")]
    )
    for d, name in enumerate(("bright", "lowc")):
        plain = copy.deepcopy(net)
        plain.load_state_dict(domain_state_dict(rep, name), strict=False)
        with use_domain(split, d):
            torch.testing.assert_close(split(LOW_CONTRAST), plain(LOW_CONTRAST), rtol=0, atol=0)


def test_a_failing_domain_names_itself_and_restores_the_model():
    net = source_net()
    before = snapshot(net)

    def bad():
        yield BRIGHT[:16]
        raise DataError("cannot read data=broken.pt", "check data=")

    with pytest.raises(DataError, match=r"^domains=b: cannot read domains=broken.pt"):
        adapt_domains(net, {"a": batches_of(BRIGHT, SPLIT), "b": bad()})
    assert_same_state(before, snapshot(net))
    with pytest.raises(UsageError, match="prior= must be a number >= 0"):
        adapt_domains(net, {"a": [BRIGHT]}, prior=-1)


def test_progress_counts_every_domain():
    seen = []
    adapt_domains(
        source_net(),
        {"a": batches_of(BRIGHT, SPLIT), "b": list(LOW_CONTRAST.split(32))},
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[0] == (0, 7) and seen[-1] == (7, 7)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(
    "given, expected",
    [
        (["fog=corrupted/fog", "snow=s.pt"], {"fog": "corrupted/fog", "snow": "s.pt"}),
        (
            ["corrupted/fog/", "data/target.pt"],
            {"fog": "corrupted/fog/", "target": "data/target.pt"},
        ),
        (["a=x=y.pt"], {"a": "x=y.pt"}),
        ({"Fog-1": [1], "snow_2": [2]}, {"Fog-1": [1], "snow_2": [2]}),
    ],
)
def test_parse_domains(given, expected):
    assert parse_domains(given) == expected


@pytest.mark.parametrize(
    "given, fragment",
    [
        (["a=x.pt", "a=y.pt"], "the domain name 'a' is given twice"),
        (["Fog=x.pt", "fog=y.pt"], "names that differ only in case"),
        (["my fog=x.pt"], "'my fog' is not a usable domain name"),
        (["../x=x.pt"], "is not a usable domain name"),
        (["source=x.pt"], "cannot be named 'source'"),
        (["Split=x.pt"], "cannot be named 'Split'"),
        (["pkg.module:factory"], "no domain name can be made from 'pkg.module:factory'"),
        (["a="], "names no data"),
        ([], "domains= is empty"),
        ("fog=x.pt", "must map names to data"),
    ],
)
def test_bad_domains(given, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        parse_domains(given)

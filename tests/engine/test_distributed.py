"""Exact statistics under torch.distributed: 2 gloo processes on 127.0.0.1 vs one process.

The workers run every case in one launch (spawning costs a torch import per process) and save
what they computed; the tests compare. Every wait is bounded (process-group timeout, join
deadline).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bnscope.engine import distributed
from bnscope.engine.stats import MomentAccumulator
from bnscope.ops.adapt import adapt_bn
from bnscope.ops.ghost import ghost_analysis
from bnscope.ops.inspect import inspect
from bnscope.ops.precise import precise_bn

from ..ranks import spawn_ranks

pytestmark = pytest.mark.timing  # tests/repeat.py reruns these

WORLD = 2
DEADLINE_S = 90


# --------------------------------------------------------------------------------------------
# Models and data (built identically in every process)


class Branchy(nn.Module):
    """Conv-BN-ReLU-Conv-BN, then a BN1d head used twice per forward, a BN used only on big
    batches (so it runs on one rank only), a BN never used, and a SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.SyncBatchNorm(5)
        self.fc = nn.Linear(5, 6)
        self.head = nn.BatchNorm1d(6)
        self.big = nn.BatchNorm1d(6)
        self.unused = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3))
        z = self.head(self.fc(h))
        z = self.head(z * 0.5 + 1.0)  # reused: two calls per forward
        if x.shape[0] >= 16:
            z = self.big(z)
        return z


def make_model() -> nn.Module:
    torch.manual_seed(3)
    model = Branchy()
    model.train()
    with torch.no_grad(), distributed.local_batchnorm(model):
        model(torch.randn(20, 3, 6, 6))  # move the running stats away from their init
    return model


def make_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    sizes = [16, 7, 12, 5, 9]
    return [torch.randn(n, 3, 6, 6, generator=g) * 3 + 2 for n in sizes]


#: uneven shards: rank 0 gets batches 0, 2, 4 (37 samples, big batch included), rank 1 gets 1, 3
SHARDS = {0: [0, 2, 4], 1: [1, 3]}


def sorted_labels() -> list[torch.Tensor]:
    """One class per batch (classes 0, 1, 2, 0, 1): labels of data read in class order."""
    return [torch.full((b.shape[0],), i % 3) for i, b in enumerate(make_batches())]


def mixed_labels() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    return [torch.randint(0, 4, (b.shape[0],), generator=g) for b in make_batches()]


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


# --------------------------------------------------------------------------------------------
# The worker


def _cases(rank: int) -> dict:
    res: dict = {}
    batches = make_batches()
    mine = [batches[i] for i in SHARDS[rank]]

    model = make_model()
    rep = precise_bn(model, mine)
    res["precise"] = {
        "buffers": bn_buffers(model),
        "arrays": rep.arrays,
        "layers": [lay.to_dict() for lay in rep.layers],
        "extra": rep.extra,
        "nbt": {k: int(v) for k, v in model.state_dict().items() if "num_batches" in k},
        "sync_forward_patched": "forward" in model.bn2.__dict__,
    }

    model = make_model()
    rep = precise_bn(model, mine, process_group=distributed.LOCAL)
    res["local"] = {"arrays": rep.arrays, "extra": rep.extra}

    # labelled batches: the class mix pooled over the ranks (sorted and shuffled labels)
    for name, labels in (("sorted", sorted_labels()), ("mixed", mixed_labels())):
        rep = precise_bn(make_model(), [(batches[i], labels[i]) for i in SHARDS[rank]])
        res[f"labels_{name}"] = {
            "mix": rep.extra["label_mix"],
            "findings": [f.to_dict() for f in rep.findings],
        }

    model = make_model()
    rep = adapt_bn(model, [b * 0.5 - 1 for b in mine], prior=8)
    res["adapt"] = {"buffers": bn_buffers(model), "layers": [x.to_dict() for x in rep.layers]}

    # ghost analysis and dynamic inspection: every figure pooled over the ranks
    rep = ghost_analysis(make_model(), mine, sizes=[2, 4, 32])
    res["ghost"] = rep.to_dict()
    rep = inspect(make_model(), mine)
    res["inspect"] = rep.to_dict()

    # public helpers: moments of arbitrary data, an empty accumulator on one rank, sums, max
    g = torch.Generator().manual_seed(5 + rank)
    acc = MomentAccumulator(3)
    acc.update_tensor(torch.randn(40 + 13 * rank, 3, generator=g) * (rank + 1) + rank, [0])
    empty = MomentAccumulator(2)
    if rank == 1:
        empty.update_tensor(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), [0])
    distributed.all_reduce_moments([acc, empty])
    tally = torch.tensor([rank + 1, 10 * rank], dtype=torch.int64)
    distributed.all_reduce_sum(tally)
    peak = distributed.all_reduce_max(torch.tensor([float(rank), -float(rank)]))
    res["helpers"] = {
        "acc": (acc.count, acc.mean.clone(), acc.m2.clone()),
        "empty": (empty.count, empty.mean.clone(), empty.m2.clone()),
        "tally": tally,
        "peak": peak,
    }

    # a failing rank: rank 1's data raises in its second batch; nobody hangs
    def failing():
        yield mine[0]
        if rank == 1:
            raise RuntimeError("disk on fire")
        yield from mine[1:]

    model = make_model()
    before = bn_buffers(model)
    t0 = time.monotonic()
    try:
        precise_bn(model, failing())
        res["failure"] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the parent
        res["failure"] = {"error": type(exc).__name__, "message": str(exc)}
    res["failure"]["seconds"] = time.monotonic() - t0
    res["failure"]["unchanged"] = all(
        torch.equal(v, bn_buffers(model)[k]) for k, v in before.items()
    )

    # the group still works after a failure was exchanged
    check = torch.ones(1, dtype=torch.float64)
    distributed.all_reduce_sum(check)
    res["after_failure"] = float(check)
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_cases, tmp_path_factory.mktemp("dist"), WORLD, timeout_s=30,
                       deadline_s=DEADLINE_S)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tests


def assert_same_records(got: list[dict], want_records) -> None:
    """Layer records equal, floats (figures derived in float64) to 1e-9 relative."""
    want = [lay.to_dict() for lay in want_records]
    assert [g["name"] for g in got] == [w["name"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (g["name"], key)
            else:
                assert g[key] == value, (g["name"], key)


def single_process(fn):
    """``fn(model)`` in this process, single-threaded as the workers (float32 kernels give
    the same bits only for the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        rep = fn(model)
    finally:
        torch.set_num_threads(threads)
    return model, rep


def test_two_ranks_equal_one_process_on_the_union(ranks):
    batches = make_batches()
    ref_model, ref = single_process(lambda m: precise_bn(m, batches))
    r0, r1 = ranks[0]["precise"], ranks[1]["precise"]
    # identical on both ranks, bit for bit
    for k, v in r0["buffers"].items():
        assert torch.equal(v, r1["buffers"][k]), k
    assert r0["layers"] == r1["layers"] and r0["extra"] == r1["extra"]
    # equal to one process on all the data: float64 results to rounding, float32 buffers
    assert set(r0["arrays"]) == set(ref.arrays) == {"bn1", "bn2", "head", "big"}
    for name, arr in ref.arrays.items():
        for key in ("new_mean", "new_var"):
            torch.testing.assert_close(
                r0["arrays"][name][key], arr[key], rtol=1e-12, atol=1e-12, msg=f"{name} {key}"
            )
    for k, v in bn_buffers(ref_model).items():
        torch.testing.assert_close(r0["buffers"][k], v, rtol=1e-6, atol=1e-7)
    # every figure of the report covers both ranks
    assert_same_records(r0["layers"], ref.layers)
    assert r0["extra"] == {"batches": 5, "samples": 49, "label_mix": None, "world_size": 2}
    assert ref.extra == {"batches": 5, "samples": 49, "label_mix": None}
    # the model is otherwise as before; SyncBatchNorm kept its class and forward
    assert r0["nbt"] == {k: int(v) for k, v in ref_model.state_dict().items() if "num_b" in k}
    assert r0["sync_forward_patched"] is False


def test_layer_figures_reduced(ranks):
    layers = {lay["name"]: lay for lay in ranks[0]["precise"]["layers"]}
    assert layers["head"]["calls"] == 10 and layers["head"]["calls_per_forward"] == 2
    # "big" only ran on rank 0 (batch of 16); "unused" nowhere
    assert layers["big"]["status"] == "updated" and layers["big"]["calls"] == 1
    assert layers["big"]["samples"] == 16
    assert layers["unused"]["status"] == "not-called"
    assert layers["bn1"]["samples"] == 49


def test_local_process_group_does_not_communicate(ranks):
    mine = [make_batches()[i] for i in SHARDS[1]]
    _, ref = single_process(lambda m: precise_bn(m, mine))
    loc = ranks[1]["local"]
    assert loc["extra"] == {"batches": 2, "samples": 12, "label_mix": None}
    assert set(loc["arrays"]) == {"bn1", "bn2", "head"}
    for name, arr in ref.arrays.items():
        torch.testing.assert_close(loc["arrays"][name]["new_var"], arr["new_var"], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "labels"), [("sorted", sorted_labels), ("mixed", mixed_labels)])
def test_label_mix_two_ranks_equal_one_process(ranks, name, labels):
    batches = list(zip(make_batches(), labels(), strict=True))
    _, ref = single_process(lambda m: precise_bn(m, batches))
    want = ref.extra["label_mix"]
    got0, got1 = ranks[0][f"labels_{name}"], ranks[1][f"labels_{name}"]
    assert got0 == got1  # the same figures and findings on every rank
    assert want is not None and got0["mix"].keys() == want.keys()
    for key, value in want.items():
        assert got0["mix"][key] == pytest.approx(value, rel=1e-12), key
    codes = [f["code"] for f in got0["findings"]]
    assert codes.count("non-iid-batches") == (1 if name == "sorted" else 0)
    assert [f.code for f in ref.findings].count("non-iid-batches") == codes.count(
        "non-iid-batches"
    )


def test_adapt_two_ranks(ranks):
    batches = [b * 0.5 - 1 for b in make_batches()]
    ref_model, ref = single_process(lambda m: adapt_bn(m, batches, prior=8))
    a0, a1 = ranks[0]["adapt"], ranks[1]["adapt"]
    for k, v in a0["buffers"].items():
        assert torch.equal(v, a1["buffers"][k]), k
        torch.testing.assert_close(v, bn_buffers(ref_model)[k], rtol=1e-6, atol=1e-7)
    assert a0["layers"] == a1["layers"]
    assert_same_records(a0["layers"], ref.layers)


def test_public_helpers(ranks):
    h0, h1 = ranks[0]["helpers"], ranks[1]["helpers"]
    xs = []
    for rank in range(WORLD):
        g = torch.Generator().manual_seed(5 + rank)
        xs.append(torch.randn(40 + 13 * rank, 3, generator=g) * (rank + 1) + rank)
    x = torch.cat(xs).double()
    count, mean, m2 = h0["acc"]
    assert count == 93
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(m2 / count, x.var(0, unbiased=False), rtol=1e-13, atol=1e-13)
    assert all(torch.equal(a, b) for a, b in zip(h0["acc"][1:], h1["acc"][1:], strict=True))
    count, mean, m2 = h0["empty"]
    assert count == 2
    assert mean.tolist() == [2.0, 4.0] and m2.tolist() == [2.0, 8.0]
    assert h0["tally"].tolist() == h1["tally"].tolist() == [3, 10]
    assert h0["tally"].dtype == torch.int64
    assert h0["peak"].tolist() == [1.0, 0.0]


def test_a_failing_rank_stops_every_rank(ranks):
    f0, f1 = ranks[0]["failure"], ranks[1]["failure"]
    assert f1["error"] == "RuntimeError"
    assert "disk on fire" in f1["message"]
    assert f0["error"] == "PeerFailed"
    assert f0["message"].startswith("rank 1 of 2 failed: ")
    assert "disk on fire" in f0["message"]
    assert f0["seconds"] < 20 and f1["seconds"] < 20
    assert f0["unchanged"] and f1["unchanged"]
    assert ranks[0]["after_failure"] == ranks[1]["after_failure"] == 2.0


# --------------------------------------------------------------------------------------------
# Without a process group (in this process)


def test_helpers_without_process_group():
    assert not dist.is_initialized()
    assert distributed.resolve_group() is None
    assert distributed.resolve_group(distributed.LOCAL) is None
    assert distributed.is_main_process() and distributed.get_world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    acc = MomentAccumulator(1)
    acc.update_tensor(torch.tensor([[1.0], [3.0]]), [0])
    distributed.all_reduce_moments([acc])
    assert acc.count == 2 and acc.mean.tolist() == [2.0]
    with pytest.raises(ValueError, match="not initialized"):
        distributed.resolve_group(object())
    with pytest.raises(ValueError, match="local"):
        distributed.resolve_group("world")


def test_local_batchnorm_leaves_modules_alone():
    """Without a process group SyncBatchNorm is already local; under one, the class's forward
    is swapped for the block (tests/engine/test_standins.py runs that with a real group). Modules
    never get an instance forward and keep their class and state-dict form."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3), nn.BatchNorm2d(3))
    with distributed.local_batchnorm(model, model):
        assert "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__
        model.train()
        y = model(torch.randn(4, 3, 2, 2))
        assert y.shape == (4, 3, 2, 2)
    assert "forward" not in model[1].__dict__
    assert type(model[1]) is nn.SyncBatchNorm
    assert set(model.state_dict()) == {
        "0.weight", "0.bias",
        *(f"{i}.{n}" for i in (1, 2)
          for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    }  # fmt: skip


def test_payload_bytes():
    # ResNet-50 has 53 BN layers with 26,560 channels in all
    assert distributed.payload_bytes([64]) == 8 * (2 * 64 + 4)
    assert distributed.payload_bytes([256] * 2) == 2 * 4128


def approx_equal(got, want, path: str = "") -> None:
    """Recursive equality; floats to 1e-9 relative (float64 sums added in another order)."""
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            approx_equal(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            approx_equal(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


def test_ghost_two_ranks_equal_one_process(ranks):
    _, ref = single_process(lambda m: ghost_analysis(m, make_batches(), sizes=[2, 4, 32]))
    want = ref.to_dict()
    g0, g1 = ranks[0]["ghost"], ranks[1]["ghost"]
    assert g0 == g1  # the same report on every rank
    assert g0["samples"] == 49 and g0["batch_size"] == 16
    approx_equal({k: v for k, v in g0.items() if k != "world_size"}, want)


def test_inspect_two_ranks_equal_one_process(ranks):
    _, ref = single_process(lambda m: inspect(m, make_batches()))
    want = ref.to_dict()
    i0, i1 = ranks[0]["inspect"], ranks[1]["inspect"]
    assert i0 == i1
    assert i0["metrics"]["samples"] == 49
    assert {lay["name"]: lay["batch_calls"] for lay in i0["layers"]}["bn1"] == 5
    approx_equal({k: v for k, v in i0.items() if k != "world_size"}, want)

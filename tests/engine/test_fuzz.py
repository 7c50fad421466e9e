"""Property-based fuzzing: statistics against a float64 reference, and damaged checkpoint bytes.

Statistics
----------
Inputs of shape [N, C], [N, C, L] or [N, C, H, W] are drawn in float64, converted to the input
dtype (float16, bfloat16, float32, float64) and split along N into uneven batches (batches of
one sample wherever a sample has more than one element per channel). The reference is the data
*as the layer saw it*: that tensor converted to float64, reduced by ``torch.var_mean`` over
every dimension but 1 (biased variance).

(a) ``MomentAccumulator.update_tensor`` over the batches works in float64 throughout, so it
    must match the reference to float64 rounding: both sides err by a few ulps of |mu| in the
    mean and, through it, by about eps64 * (|mu| + sigma) * sigma in the variance.

(b) ``precise_bn`` on a model that is just a BatchNorm converted to the input dtype writes its
    buffers in that dtype. With ``eps`` the machine epsilon of the buffer dtype, ``eps_c`` the
    precision bnscope's design assumes for the batch means it reads back from BN (float32;
    float64 for float64 layers), ``eps64`` that of float64 and ``tiny`` the buffer dtype's
    subnormal spacing, the tolerances are

        |mean - mu| <= 2 eps (|mu| + sigma) + 16 eps64 (|mu| + sigma) + 2 tiny
        |var - v|   <= 4 eps v + 8 eps_c min(|mu| + sigma, 300 sigma) sigma
                       + 16 eps64 (|mu| + sigma) sigma + 2 tiny

    The first terms are the representable precision of the buffer: rounding to it costs eps/2
    relative; the mean is allowed eps * sigma on top, the noise floor of (x - mu)/sigma in that
    dtype. The eps64 terms are float64 pooling (and the float64 reference) at |mu|/sigma up to
    1e8. The eps_c term is bnscope's documented design: for BN's own layers each batch mean is
    read back from BN (``running_mean`` after a momentum-1 update) unless |mean|/std > 100 on
    that batch, so it may be off by about eps_c |mu|, which reaches the pooled variance through
    the spread of the batch means (Chan's merge): at most about eps_c (|mu| + sigma) sigma, and
    only while |mu| stays below ~100-300 sigma. Over 1500 examples per test the largest error
    seen was 0.41 of these tolerances (float16/bfloat16 layers included).

    Float16/bfloat16 *layers* (running buffers in reduced precision) get no design term of
    their own: a batch mean read back from a float16/bfloat16 ``running_mean`` would have only
    3-4 significant digits (variance errors of 5-16 eps at |mean|/std of 30-100), so bnscope
    pools their inputs in float64; :func:`test_half_precision_layer_with_drifting_batches` is
    the regression test. PyTorch 2.13 runs float16/bfloat16 BatchNorm on CPU (and
    float16/bfloat16 input into a float32 layer), so no dtype is skipped.

(c) The common mixed setup, float16/bfloat16 data into a float32 BN (autocast style, or a model
    that casts its input to float32), must give the statistics of the reduced-precision values
    exactly, to float32 precision.

Checkpoints
-----------
Random bytes and damaged copies (truncated prefixes, overwritten bytes) of valid checkpoints in
each supported format go to ``load_checkpoint``: it either loads them or raises a
:class:`~bnscope.errors.BnscopeError` subclass; no other exception may escape.
"""

from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import bnscope
from bnscope.engine.stats import MomentAccumulator
from bnscope.errors import BnscopeError, CheckpointError, DataError

from ..clirun import one_error_line, run
from ..conftest import trained_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # weights-only unpickler notes

F64 = torch.float64
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# (mean, std) of the drawn data: ordinary, offset, badly conditioned (1e4 offset, tiny std).
LOCATIONS = [0.0, 1.0, -3.0, 8.0, 30.0, -70.0, 1e3, 1e4]
SCALES = [1.0, 10.0, 1e-2, 1e-4]


# --------------------------------------------------------------------------------------------
# Statistics: data


@st.composite
def cases(draw, dtypes=tuple(DTYPES)):
    """(x in its dtype, list of batches along dim 0, description)."""
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    ndim = draw(st.sampled_from([2, 3, 4]))
    channels = draw(st.integers(1, 4))
    spatial: tuple[int, ...] = ()
    if ndim == 3:
        spatial = (draw(st.integers(1, 6)),)
    elif ndim == 4:
        spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    per_sample = math.prod(spatial)
    # batch statistics need >= 2 values per channel: a batch of one sample needs spatial > 1
    smallest = 1 if per_sample > 1 else 2
    sizes = draw(st.lists(st.integers(smallest, smallest + 9), min_size=1, max_size=7))
    if per_sample > 1 and draw(st.booleans()):
        sizes = [1] * draw(st.integers(1, 4)) + sizes  # leading batches of one sample
    loc = draw(st.sampled_from(LOCATIONS))
    scale = draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels, *spatial)
    view = (1, channels) + (1,) * len(spatial)
    # per-channel location and spread, all near the drawn ones
    c_loc = loc * (1 + 0.05 * torch.arange(channels, dtype=F64)).reshape(view)
    c_scale = scale * (0.5 + torch.rand(channels, generator=g, dtype=F64)).reshape(view)
    x = (torch.randn(shape, generator=g, dtype=F64) * c_scale + c_loc).to(dtype)
    batches = list(torch.split(x, sizes))
    return x, batches, f"{dtype} {list(shape)} sizes={sizes} loc={loc} scale={scale}"


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 mean and biased variance per channel of the values in ``x``."""
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x.to(F64), dim=dims, correction=0)
    return mean, var


def bn_for(x: torch.Tensor) -> nn.Module:
    return nn.BatchNorm1d(x.shape[1]) if x.ndim < 4 else nn.BatchNorm2d(x.shape[1])


def assert_stats_close(
    got_mean: torch.Tensor,
    got_var: torch.Tensor,
    x: torch.Tensor,
    *,
    buffer_dtype: torch.dtype,
    what: str,
) -> None:
    """The module docstring's tolerances (b) for buffers of ``buffer_dtype``."""
    mu, v = reference(x)
    sigma = v.sqrt()
    info = torch.finfo(buffer_dtype)
    eps = info.eps
    eps_c = torch.finfo(F64 if buffer_dtype == F64 else torch.float32).eps
    eps64 = torch.finfo(F64).eps
    tiny = info.smallest_normal * info.eps
    scale = mu.abs() + sigma
    pooled = 16 * eps64 * scale  # float64 pooling and the float64 reference
    design = 8 * eps_c * torch.minimum(scale, 300 * sigma) * sigma
    tol_mean = 2 * eps * scale + pooled + 2 * tiny
    tol_var = 4 * eps * v + design + pooled * sigma + 2 * tiny
    err_mean = (got_mean.to(F64) - mu).abs()
    err_var = (got_var.to(F64) - v).abs()
    assert torch.isfinite(got_mean).all() and torch.isfinite(got_var).all(), what
    ratio_mean = float((err_mean / tol_mean).max())
    ratio_var = float((err_var / tol_var).max())
    assert ratio_mean <= 1, f"{what}: mean {got_mean.tolist()} vs {mu.tolist()} ({ratio_mean:.3g})"
    assert ratio_var <= 1, f"{what}: var {got_var.tolist()} vs {v.tolist()} ({ratio_var:.3g})"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (tens of ms per call on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# (a) MomentAccumulator over uneven batches == float64 reference of the whole input


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_accumulator_matches_float64_reference(case) -> None:
    x, batches, what = case
    dims = [d for d in range(x.ndim) if d != 1]
    acc = MomentAccumulator(x.shape[1])
    for b in batches:
        acc.update_tensor(b, dims)
    mu, v = reference(x)
    sigma = v.sqrt()
    eps64 = torch.finfo(F64).eps
    assert acc.count == x.numel() // x.shape[1]
    assert acc.population_mean.dtype == F64 and acc.population_var.dtype == F64
    tol_mean = 16 * eps64 * (mu.abs() + sigma)
    tol_var = 16 * eps64 * ((mu.abs() + sigma) * sigma + v)
    assert ((acc.population_mean - mu).abs() <= tol_mean).all(), what
    assert ((acc.population_var - v).abs() <= tol_var).all(), what
    assert (acc.population_var >= 0).all(), what


@settings(max_examples=60, deadline=None)
@given(case=cases(), order=st.randoms(use_true_random=False))
def test_accumulator_does_not_depend_on_batch_order(case, order) -> None:
    x, batches, what = case
    dims = [d for d in range(x.ndim) if d != 1]
    shuffled = list(batches)
    order.shuffle(shuffled)
    accs = []
    for seq in (batches, shuffled):
        acc = MomentAccumulator(x.shape[1])
        for b in seq:
            acc.update_tensor(b, dims)
        accs.append(acc)
    mu, v = reference(x)
    scale = 16 * torch.finfo(F64).eps * (mu.abs() + v.sqrt())
    assert ((accs[0].mean - accs[1].mean).abs() <= scale).all(), what
    assert (
        (accs[0].var_or_zero() - accs[1].var_or_zero()).abs() <= scale * v.sqrt() + 1e-300
    ).all()


# --------------------------------------------------------------------------------------------
# (b) precise_bn on a BatchNorm in the data's dtype


def _precise_on_bn(x: torch.Tensor, batches: list[torch.Tensor]) -> nn.Module:
    layer = bn_for(x).to(x.dtype)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    report = bnscope.precise_bn(layer, batches)
    assert report.extra["batches"] == len(batches)
    assert layer.training  # mode restored
    assert layer.running_mean.dtype == x.dtype and layer.running_var.dtype == x.dtype
    # counted (docs/statistics.md, section 3.1): momentum 0.1, 0.9^349 <= 2^-53
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 349
    assert torch.equal(layer.weight, before["weight"]) and torch.equal(layer.bias, before["bias"])
    return layer


def _offset_example():
    """1e4 offset, std 1e-4, batches of one sample: a float32 batch mean would lose every digit
    of the spread (float32 has 1e-3 spacing at 1e4, so the values are 1e4 plus a few steps)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 2, 5, generator=g, dtype=F64) * 1e-4 + 1e4).float()
    return x, list(torch.split(x, [1, 1, 3, 1])), "example: float32 1e4 +- 1e-4"


@settings(max_examples=120, deadline=None)
@given(case=cases(dtypes=("float32", "float64")))
@example(case=_offset_example())
def test_precise_bn_full_precision_layer(case) -> None:
    x, batches, what = case
    layer = _precise_on_bn(x, batches)
    assert_stats_close(layer.running_mean, layer.running_var, x, buffer_dtype=x.dtype, what=what)


@settings(max_examples=120, deadline=None)
@given(case=cases(dtypes=("float16", "bfloat16")))
def test_precise_bn_half_precision_layer(case) -> None:
    x, batches, what = case
    layer = _precise_on_bn(x, batches)
    assert_stats_close(layer.running_mean, layer.running_var, x, buffer_dtype=x.dtype, what=what)


def _drifting(dtype: torch.dtype, seed: int, base: float, spread: float) -> list[torch.Tensor]:
    """16 batches of 256 x 2 values, std 1, each batch around its own mean (unshuffled data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(16):
        offset = base + spread * (2 * torch.rand(1, generator=g, dtype=F64) - 1)
        out.append((torch.randn(256, 2, generator=g, dtype=F64) + offset).to(dtype))
    return out


@pytest.mark.parametrize(
    ("dtype", "base", "spread"), [("bfloat16", 80.0, 2.0), ("float16", 90.0, 5.0)]
)
def test_half_precision_layer_with_drifting_batches(dtype: str, base: float, spread: float):
    """|mean|/std just under 100 and batch means that differ: reading each batch mean back from
    a float16/bfloat16 running_mean put the variance 8-16 eps off (up to 4x the tolerance)."""
    for seed in range(4):
        batches = _drifting(DTYPES[dtype], seed, base, spread)
        x = torch.cat(batches)
        layer = _precise_on_bn(x, batches)
        assert_stats_close(
            layer.running_mean, layer.running_var, x, buffer_dtype=x.dtype, what=f"{dtype} {seed}"
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_full_precision_layer_with_drifting_batches(dtype: str) -> None:
    """The same data in float32/float64 layers, which do read batch means back from BN: within
    the documented tolerance (its design term covers float32 batch means)."""
    for seed in range(4):
        batches = _drifting(DTYPES[dtype], seed, 80.0, 2.0)
        x = torch.cat(batches)
        layer = _precise_on_bn(x, batches)
        assert_stats_close(
            layer.running_mean, layer.running_var, x, buffer_dtype=x.dtype, what=dtype
        )


def test_batch_of_one_value_per_channel_is_a_clean_error() -> None:
    """The splits above avoid batches with one value per channel: BN cannot take them."""
    x = torch.randn(5, 3)
    with pytest.raises(DataError, match="1 value per channel"):
        bnscope.precise_bn(nn.BatchNorm1d(3), [x[:4], x[4:]])


# --------------------------------------------------------------------------------------------
# (c) float16/bfloat16 data into a float32 BatchNorm


class CastTo32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@settings(max_examples=80, deadline=None)
@given(case=cases(dtypes=("float16", "bfloat16")), cast_inside=st.booleans())
def test_reduced_precision_data_into_float32_bn(case, cast_inside: bool) -> None:
    """Half-precision values are exact in float32 and float64, so the float32 buffers must hold
    their statistics to float32 precision, whether the model casts its input (autocast style)
    or the float32 layer is fed float16/bfloat16 directly (PyTorch's CPU kernel accepts it)."""
    x, batches, what = case
    bn = bn_for(x)
    model = nn.Sequential(CastTo32(), bn) if cast_inside else bn
    bnscope.precise_bn(model, batches)
    assert bn.running_mean.dtype == torch.float32
    assert_stats_close(
        bn.running_mean, bn.running_var, x, buffer_dtype=torch.float32, what=f"{what} {cast_inside}"
    )


# --------------------------------------------------------------------------------------------
# Checkpoints: damaged and random bytes


def _valid_files(folder: Path) -> dict[str, bytes]:
    model = trained_tiny(steps=2).eval()
    sd = model.state_dict()
    paths = {
        "zip": folder / "zip.pt",
        "legacy": folder / "legacy.pt",
        "safetensors": folder / "w.safetensors",
        "torchscript": folder / "ts.pt",
    }
    torch.save({"state_dict": sd, "epoch": 4}, paths["zip"])
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(sd, paths["safetensors"], metadata={"epoch": "4"})
    torch.jit.save(torch.jit.script(model), str(paths["torchscript"]))
    out = {}
    for form, path in paths.items():
        ckpt = bnscope.load_checkpoint(path)  # control: the intact file loads
        assert "1.running_var" in ckpt.state_dict, form
        out[form] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _valid_files(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


FORMS = ["zip", "legacy", "safetensors", "torchscript"]
SUFFIX = {"safetensors": ".safetensors"}


def load_only_bnscope_errors(path: Path) -> None:
    """``load_checkpoint`` either loads the file or raises a one-line BnscopeError."""
    try:
        bnscope.load_checkpoint(path)
    except BnscopeError as exc:
        assert "\n" not in exc.line()
        assert exc.fix
    # anything else propagates and fails the test


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".pt", ".safetensors", ".bin", ""]))
@example(data=b"PK\x03\x04" + b"\x00" * 60, suffix=".pt")
@example(data=struct.pack("<Q", 2) + b"{}", suffix="")
@example(data=b"\x80\x02}q\x00.", suffix=".pt")
def test_random_bytes(scratch: Path, data: bytes, suffix: str) -> None:
    path = scratch / f"random{suffix}"
    path.write_bytes(data)
    load_only_bnscope_errors(path)


@FUZZ
@given(form=st.sampled_from(FORMS), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_prefix(valid: dict[str, bytes], scratch: Path, form: str, cut: float) -> None:
    data = valid[form]
    path = scratch / f"trunc{SUFFIX.get(form, '.pt')}"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BnscopeError):  # a strict prefix is never a valid checkpoint
        bnscope.load_checkpoint(path)


@FUZZ
@given(
    form=st.sampled_from(FORMS),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=16)),
        min_size=1,
        max_size=4,
    ),
)
def test_overwritten_bytes(
    valid: dict[str, bytes], scratch: Path, form: str, edits: list[tuple[float, bytes]]
) -> None:
    data = bytearray(valid[form])
    for where, new in edits:
        at = int(len(data) * where)
        data[at : at + len(new)] = new
    path = scratch / f"edited{SUFFIX.get(form, '.pt')}"
    path.write_bytes(bytes(data[: len(valid[form])]))
    load_only_bnscope_errors(path)


@pytest.mark.parametrize("form", FORMS)
def test_truncated_at_fixed_fractions(valid: dict[str, bytes], tmp_path: Path, form: str) -> None:
    data = valid[form]
    for cut in [0, 1, 8, 9, len(data) // 100, len(data) // 10, len(data) // 4, len(data) // 2]:
        path = tmp_path / f"cut{cut}{SUFFIX.get(form, '.pt')}"
        path.write_bytes(data[:cut])
        with pytest.raises(BnscopeError):
            bnscope.load_checkpoint(path)
    for frac in (0.75, 0.9, 0.99):
        path = tmp_path / f"frac{frac}{SUFFIX.get(form, '.pt')}"
        path.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(CheckpointError) as info:
            bnscope.load_checkpoint(path)
        assert str(path) in info.value.line()
    path = tmp_path / f"last{SUFFIX.get(form, '.pt')}"
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError):
        bnscope.load_checkpoint(path)


def test_zip_with_unknown_version_field_is_not_an_uncaught_error(
    valid: dict[str, bytes], tmp_path: Path
) -> None:
    """Found by fuzzing: a zip whose 'version needed to extract' is above what Python's
    zipfile reads made the TorchScript check raise NotImplementedError. torch's own reader
    ignores the field, so the checkpoint loads."""
    data = bytearray(valid["zip"])
    data[data.find(b"PK\x01\x02") + 6] = 99  # version 9.9
    path = tmp_path / "v99.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(path)
    ckpt = bnscope.load_checkpoint(path)
    assert ckpt.format == "torch" and "1.running_mean" in ckpt.state_dict


@pytest.mark.parametrize(
    ("form", "cut"), [("zip", 0.5), ("legacy", 0.9), ("safetensors", 0.3), ("torchscript", 0.6)]
)
def test_cli_on_truncated_files(valid: dict[str, bytes], tmp_path: Path, form: str, cut: float):
    path = tmp_path / f"ckpt{SUFFIX.get(form, '.pt')}"
    data = valid[form]
    path.write_bytes(data[: int(len(data) * cut)])
    one_error_line(run("inspect", path), str(path))


def test_cli_on_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    one_error_line(run("inspect", path), "cannot read")

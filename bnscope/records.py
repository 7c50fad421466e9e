"""Result records: frozen dataclasses with ``to_dict()`` and a schema version.

Computation code returns these; the renderers in :mod:`bnscope.render` turn them into tables,
JSON and figures. A record never formats or prints itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1

SEVERITIES = ("info", "warning", "error")

# Every finding code of DESIGN §4, with its meaning (kept here so docs, help and tests agree).
FINDING_CODES: dict[str, str] = {
    "no-batchnorm": "the checkpoint or model has no BN layer",
    "never-updated": "running stats still at their initial values (mean 0, var 1, count 0)",
    "ema-warmup": "(1-m)^num_batches_tracked is not negligible: the EMA still remembers its init",
    "tiny-variance": "running_var near zero: gain gamma/sqrt(var+eps) is huge",
    "dead-channel": "gamma ~ 0: the channel is switched off",
    "non-finite": "NaN/Inf (or negative variance) in BN buffers or parameters",
    "not-called": "the layer never ran on the data",
    "reused": "the layer ran more than once per forward",
    "stale-ema": "running stats are far from the population statistics, beyond EMA noise",
    "train-test-gap": "outputs with batch statistics and with running statistics disagree",
    "small-nbs": "batch statistics at the training batch size are too noisy",
    "non-iid-batches": "batch statistics vary more than i.i.d. sampling explains",
    "domain-shift": "target-domain statistics differ from the source statistics (adapt)",
}


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for error."""
    return SEVERITIES.index(severity)


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Record:
    """A result record: ``to_dict()`` is its JSON form (non-finite floats spelled out)."""

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Finding(Record):
    """One problem found, with a stable ``code`` (see :data:`FINDING_CODES`) and its fix."""

    code: str
    severity: str
    layer: str | None
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.code not in FINDING_CODES:
            raise ValueError(f"unknown finding code {self.code!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")


@dataclass(frozen=True)
class StaticLayer(Record):
    """Per-layer figures read from BN buffers alone (no forward pass).

    ``ema_init_weight`` is (1-m)^num_batches_tracked: the weight the EMA
    mu <- (1-m) mu + m mu_B still gives to its initial value after that many updates.
    ``gain_*`` is |gamma| / sqrt(running_var + eps), the factor eval mode multiplies a
    centred input by (Ioffe & Szegedy 2015, eq. in Alg. 2).
    """

    name: str
    num_features: int
    num_batches_tracked: int | None
    momentum: float | None
    momentum_assumed: bool
    eps: float
    eps_assumed: bool
    ema_init_weight: float | None
    affine: bool
    mean_min: float
    mean_max: float
    var_min: float
    var_max: float
    gain_min: float | None
    gain_max: float | None
    dead_channels: int
    tiny_var_channels: int
    nonfinite_values: int
    negative_var_channels: int
    #: a frozen BN layer (FrozenBatchNorm2d: no batch-statistics mode); known with model code
    frozen: bool = False


@dataclass(frozen=True)
class Report:
    """A command's result: per-layer records, findings and command-specific keys.

    ``to_dict()`` is the JSON document of DESIGN §2 (``schema`` ``"bnscope.<command>/1"``).
    """

    command: str
    checkpoint: str | None
    layers: tuple[Any, ...]
    findings: tuple[Finding, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    #: per-layer tensors (e.g. old/new statistics); not part of the JSON document
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def schema(self) -> str:
        return f"bnscope.{self.command}/{SCHEMA_VERSION}"

    def worst_severity(self) -> str | None:
        """The highest severity among the findings, or None when there are none."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=severity_rank)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.schema,
            "command": self.command,
            "checkpoint": self.checkpoint,
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [f.to_dict() for f in self.findings],
        }
        for key, value in self.extra.items():
            if key in out:
                raise ValueError(f"extra key {key!r} collides with a schema key")
            out[key] = _clean(value)
        return out


@dataclass(frozen=True)
class PreciseLayer(Record):
    """Per-layer result of Precise BN / Adaptive BN: how far the new statistics moved.

    ``d_mu`` = |mu_old - mu_new| / sqrt(var_new + eps) and ``d_var`` =
    |log((var_old + eps) / (var_new + eps))| per channel (DESIGN §4), summarized by max and
    median over channels. ``status`` is ``updated``, ``not-called`` (statistics kept) or
    ``skipped`` (``reason`` says why).
    """

    name: str
    num_features: int
    status: str
    reason: str | None
    calls: int = 0
    calls_per_forward: int = 0
    samples: int = 0
    elements: int = 0
    d_mu_max: float | None = None
    d_mu_median: float | None = None
    d_var_max: float | None = None
    d_var_median: float | None = None


@dataclass(frozen=True)
class AdaptLayer(Record):
    """Per-layer result of Adaptive BN: how the target domain differs from the source.

    Between the source statistics (the checkpoint's running statistics) and the pooled target
    statistics, per channel: ``d_mu`` = |mu_s - mu_t| / sqrt(var_t + eps),
    ``d_var`` = |log((var_s + eps) / (var_t + eps))| and ``kl`` = the symmetric KL divergence
    KL(N_s || N_t) + KL(N_t || N_s) of the two Gaussians; max and median over channels.
    ``weight_source`` is lambda = N / (N + n) of the prior (Schneider et al. 2020).
    """

    name: str
    num_features: int
    status: str
    reason: str | None
    calls: int = 0
    calls_per_forward: int = 0
    samples: int = 0
    weight_source: float | None = None
    d_mu_max: float | None = None
    d_mu_median: float | None = None
    d_var_max: float | None = None
    d_var_median: float | None = None
    kl_max: float | None = None
    kl_median: float | None = None


@dataclass(frozen=True)
class InspectLayer(Record):
    """Per-layer result of dynamic inspection (see :mod:`bnscope.ops.inspect`).

    ``d_mu``/``d_var`` (max and median over channels) compare the running statistics with the
    population statistics of the model as it is (DESIGN §4). ``z_mu``/``z_var`` are the root
    mean square over channels of the gap in units of the EMA's own noise
    (sqrt(m/(2-m) Var(mu_B))): about 1 for an EMA that is merely noisy. ``ema_noise_mu`` is
    that noise in sigma units (median), ``batch_spread_mu`` the spread of batch means
    sqrt(Var(mu_B))/sigma and ``batch_spread_var`` the relative spread of batch variances, at
    the data's batch size. ``status``: ``ok`` (gap below 0.05), ``stale`` (beyond EMA noise),
    ``noisy`` (within it), ``unknown`` (one batch only), ``not-called`` or ``skipped``.
    """

    name: str
    num_features: int
    status: str
    reason: str | None
    momentum: float | None = None
    calls_per_forward: int = 0
    batch_calls: int = 0
    d_mu_max: float | None = None
    d_mu_median: float | None = None
    d_var_max: float | None = None
    d_var_median: float | None = None
    z_mu: float | None = None
    z_var: float | None = None
    ema_noise_mu: float | None = None
    batch_spread_mu: float | None = None
    batch_spread_var: float | None = None


@dataclass(frozen=True)
class GhostLayerSize(Record):
    """One BN layer at one ghost size g: how far chunk statistics fall from the population's.

    Over every chunk k and channel c: ``noise_mu`` is the mean of |mu_k - mu_pop| / sigma_pop and
    ``noise_var`` the mean of |log((var_k + eps) / (var_pop + eps))|, with sigma_pop =
    sqrt(var_pop + eps). ``iid_mu`` and ``iid_var`` are what i.i.d. samples would give
    (normal approximations from the spread of per-sample statistics; see
    :mod:`bnscope.ops.ghost`). ``effective_size`` = g * E_iid[(mu_k - mu)^2] / Var_measured(mu_k):
    close to g for i.i.d. samples, lower when samples in a chunk are correlated.
    """

    size: int
    chunks: int
    noise_mu: float | None
    noise_var: float | None
    iid_mu: float | None
    iid_var: float | None
    effective_size: float | None


@dataclass(frozen=True)
class GhostLayer(Record):
    """Per-layer result of the ghost-size analysis: one :class:`GhostLayerSize` per size run.

    ``status`` is ``analysed``, ``not-called`` or ``skipped`` (``reason`` says why)."""

    name: str
    num_features: int
    status: str
    reason: str | None
    calls_per_forward: int = 0
    sizes: tuple[GhostLayerSize, ...] = ()


@dataclass(frozen=True)
class GhostSize(Record):
    """The model at one ghost size g: outputs with batch statistics of chunks of g against
    outputs with population statistics on the same inputs.

    ``status`` is ``ok`` or ``skipped`` (``note`` says why, e.g. g larger than the batch);
    ``remainder_chunks``/``remainder_samples`` count the chunks smaller than g (batch size not
    a multiple of g), which are normalized on their own. ``agreement`` is the fraction of equal
    top-1 predictions, ``kl`` the mean KL(p_pop || p_g); ``accuracy``/``loss`` need labels.
    ``noise_mu``/``noise_var`` are medians over layers; ``effective_ratio`` is the lowest
    ``effective_size / g`` over layers (the layer whose chunks are most correlated). A
    single-sample remainder merged into the previous chunk counts as a remainder chunk too.
    """

    size: int
    status: str
    note: str | None
    chunks: int
    remainder_chunks: int
    remainder_samples: int
    agreement: float | None
    kl: float | None
    accuracy: float | None
    loss: float | None
    noise_mu: float | None
    noise_var: float | None
    effective_ratio: float | None


def field_names(record_type: type) -> list[str]:
    """The field names of a record dataclass, in order (used by renderers and tests)."""
    return [f.name for f in fields(record_type)]

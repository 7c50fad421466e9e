"""Result records: frozen dataclasses with ``to_dict()`` and a schema version.

Computation code returns these; the renderers in :mod:`bnscope.render` turn them into tables,
JSON and figures. A record never formats or prints itself.

Records are built with keywords only (``PreciseLayer(name="bn1", num_features=64, ...)``).
Layer statuses are :class:`Status` members and finding severities :class:`Severity` members:
string enums, equal to (and serialized as) their values (``Status.NOT_CALLED == "not-called"``).
:class:`Report` is generic over its layer record and its extra keys
(``Report[PreciseLayer, PreciseExtra]``, see :mod:`bnscope.extras`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar

from .version import __version__

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        """``enum.StrEnum`` of Python 3.11: members are strings, ``str()`` and ``format()``
        give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return format(str(self.value), format_spec)


#: the layout version of every JSON document (``schema``: ``"bnscope.<command>/2"``; docs/cli.md,
#: section 5). It changes when a key is renamed or removed or changes meaning; the JSON Schema
#: of each document ships in :mod:`bnscope.schemas`. 2: one metrics layout for every command
#: (``metrics.variants``), ``bnscope_version`` in every document.
SCHEMA_VERSION = 2


def schema_id(command: str) -> str:
    """The ``schema`` of a ``command``'s JSON document: ``"bnscope.<command>/2"``."""
    return f"bnscope.{command}/{SCHEMA_VERSION}"


def document_header(command: str) -> dict[str, Any]:
    """The keys every JSON document starts with: ``schema``, ``bnscope_version`` (the version
    that wrote it) and ``command``."""
    return {"schema": schema_id(command), "bnscope_version": __version__, "command": command}


class Severity(StrEnum):
    """How bad a finding is (ordered: info < warning < error, see :func:`severity_rank`)."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Status(StrEnum):
    """What happened to one BN layer (or one ghost size) in an operation.

    One enum for every record kind, because the kinds share most values (``not-called``,
    ``skipped``, ``frozen``, ``ok``) and inspect passes Precise BN's statuses through; each
    record class lists the members it uses in its ``STATUSES`` and rejects the others.
    """

    #: inspect: the running statistics match the population's (gap below 0.05); ghost size: run
    OK = "ok"
    #: inspect: the gap is beyond the EMA's own noise
    STALE = "stale"
    #: inspect: the gap is about the EMA's own noise
    NOISY = "noisy"
    #: inspect: a material gap, but one batch only: the EMA noise cannot be estimated
    UNKNOWN = "unknown"
    #: precise/adapt: new statistics written
    UPDATED = "updated"
    #: a frozen BN layer (``FrozenBatchNorm2d``): measured, statistics kept
    FROZEN = "frozen"
    #: adapt: measured, statistics kept on purpose (after the first ``first_layers`` layers)
    KEPT = "kept"
    #: ghost: the layer was split into ghost batches and measured
    ANALYSED = "analysed"
    #: the layer never ran on the data (statistics kept)
    NOT_CALLED = "not-called"
    #: the layer (or ghost size) could not be processed; ``reason``/``note`` says why
    SKIPPED = "skipped"


#: the severities, lowest first
SEVERITIES: tuple[Severity, ...] = tuple(Severity)

#: the layer label of a model that is itself a BN layer (its module name is "")
ROOT_LABEL = "(root)"


def layer_label(module_name: str) -> str:
    """The label records and reports use for the module called ``module_name``."""
    return module_name or ROOT_LABEL


def module_name(label: str) -> str:
    """The module name (as in ``named_modules()``) of the layer labelled ``label``."""
    return "" if label == ROOT_LABEL else label

# Every finding code with its meaning (docs/statistics.md, section 8, has the rule that raises
# each; kept here so docs, help and tests agree).
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
    "non-iid-batches": (
        "batches are not i.i.d.: batch statistics (ghost) or the class mix of labelled batches "
        "(precise, adapt, inspect) vary more than random batches would"
    ),
    "domain-shift": "target-domain statistics differ from the source statistics (adapt)",
    "domain-divergence": (
        "two target domains' statistics differ from one another (adapt with several domains)"
    ),
    "batch-leakage": (
        "batches grouped by label or by a group key change train-mode outputs beyond i.i.d. "
        "noise: batch statistics carry information between the samples of a batch (leakage)"
    ),
    "momentum-convention": (
        "momentum looks like TF/Keras's (the weight of the old value): PyTorch's is 1 - it"
    ),
    "var-convention": (
        "running_var holds a std, an inverse variance or an inverse std, or the running "
        "statistics need a scale factor (a checkpoint converted from another framework)"
    ),
    "eps-mismatch": "eps is the other framework's (1e-3 vs 1e-5) and it changes the outputs",
}


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for error (a :class:`Severity` or its value)."""
    return SEVERITIES.index(severity)  # a str equal to a member counts


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become strings ("nan", "inf", "-inf") and
    enum members (:class:`Status`, :class:`Severity`) their plain string values."""
    if isinstance(value, Enum):
        return _clean(value.value)
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


class _LayerRecord(Record):
    """A per-layer (or per-size) record with a ``status``: built from a :class:`Status` or its
    string value, always holding the member; a status outside ``STATUSES`` is an error."""

    STATUSES: ClassVar[frozenset[Status]] = frozenset(Status)
    status: Status  # a field of every subclass

    def __post_init__(self) -> None:
        value = self.status
        try:
            status = Status(value)
        except ValueError:
            status = None
        if status is None or status not in self.STATUSES:
            allowed = ", ".join(sorted(s.value for s in self.STATUSES))
            raise ValueError(f"unknown {type(self).__name__} status {value!r} (one of: {allowed})")
        object.__setattr__(self, "status", status)


@dataclass(frozen=True, kw_only=True)
class Finding(Record):
    """One problem found, with a stable ``code`` (see :data:`FINDING_CODES`) and its fix.

    ``severity`` may be given as a :class:`Severity` or its value; it is stored as the member.
    """

    code: str
    severity: Severity
    layer: str | None
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.code not in FINDING_CODES:
            raise ValueError(f"unknown finding code {self.code!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        object.__setattr__(self, "severity", Severity(self.severity))


@dataclass(frozen=True, kw_only=True)
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


#: the layer record type of a :class:`Report`
L_co = TypeVar("L_co", bound=Record, covariant=True)
#: the extra keys of a :class:`Report` (a TypedDict of :mod:`bnscope.extras`)
X_co = TypeVar("X_co", bound=Mapping[str, Any], covariant=True)


@dataclass(frozen=True, kw_only=True)
class Report(Generic[L_co, X_co]):
    """A command's result: per-layer records, findings and command-specific keys.

    ``to_dict()`` is the JSON document of docs/cli.md, section 5 (``schema``
    ``"bnscope.<command>/2"``, ``bnscope_version``, ``command``, then the rest; its JSON
    Schema is :func:`bnscope.schema` of the command).
    Generic over the layer record and the extra keys: ``Report[PreciseLayer, PreciseExtra]``
    (aliases in :mod:`bnscope.extras`: ``PreciseReport`` ...); a bare ``Report`` is
    ``Report[Any, Any]``.
    """

    command: str
    checkpoint: str | None
    layers: tuple[L_co, ...]
    findings: tuple[Finding, ...]
    extra: X_co = field(default_factory=dict)  # type: ignore[assignment]
    #: per-layer tensors (e.g. old/new statistics); not part of the JSON document
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def schema(self) -> str:
        return schema_id(self.command)

    def worst_severity(self) -> Severity | None:
        """The highest severity among the findings, or None when there are none."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=severity_rank)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **document_header(self.command),
            "checkpoint": self.checkpoint,
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [f.to_dict() for f in self.findings],
        }
        for key, value in self.extra.items():
            if key in out:
                raise ValueError(f"extra key {key!r} collides with a schema key")
            out[key] = _clean(value)
        return out


@dataclass(frozen=True, kw_only=True)
class PreciseLayer(_LayerRecord):
    """Per-layer result of Precise BN (and the first step of dynamic inspection): how far the
    new statistics moved.

    ``d_mu`` = |mu_old - mu_new| / sqrt(var_new + eps) and ``d_var`` =
    |log((var_old + eps) / (var_new + eps))| per channel (docs/statistics.md, section 3),
    summarized by max and median over channels. ``status``:

    - ``updated``: the population statistics were written to running_mean/running_var; also a
      frozen BN layer with ``include_frozen=True`` (``reason``: "re-estimated");
    - ``frozen``: a frozen BN layer (``FrozenBatchNorm2d`` and the like) without
      ``include_frozen``: measured against the data (the figures are filled), statistics kept;
    - ``not-called``: the layer never ran on the data; statistics kept, figures empty;
    - ``skipped``: not collected, figures empty; ``reason`` says why
      (``track_running_stats=False``, or in eval mode under ``only_training=True``).
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(
        {Status.UPDATED, Status.FROZEN, Status.NOT_CALLED, Status.SKIPPED}
    )

    name: str
    num_features: int
    status: Status
    reason: str | None = None
    calls: int = 0
    calls_per_forward: int = 0
    samples: int = 0
    elements: int = 0
    d_mu_max: float | None = None
    d_mu_median: float | None = None
    d_var_max: float | None = None
    d_var_median: float | None = None


@dataclass(frozen=True, kw_only=True)
class AdaptLayer(_LayerRecord):
    """Per-layer result of Adaptive BN: how the target domain differs from the source.

    Between the source statistics (the checkpoint's running statistics) and the pooled target
    statistics, per channel: ``d_mu`` = |mu_s - mu_t| / sqrt(var_t + eps),
    ``d_var`` = |log((var_s + eps) / (var_t + eps))| and ``kl`` = the symmetric KL divergence
    KL(N_s || N_t) + KL(N_t || N_s) of the two Gaussians; max and median over channels.
    ``weight_source`` is lambda = N / (N + n) of the prior (Schneider et al. 2020)
    (docs/statistics.md, section 4). ``adapted`` says which statistics the layer received:
    ``"mean+var"``, ``"mean"`` or ``"var"`` (partial adaptation, ``only=``; section 4.1), None
    when it kept its own. ``status``:

    - ``updated``: the adapted (prior-mixed) statistics were written; also a frozen BN layer
      with ``include_frozen=True`` (``reason``: "re-estimated");
    - ``kept``: after the first ``first_layers`` BN layers (module order): the shift figures
      are measured, the source statistics kept (``weight_source`` None);
    - ``frozen``: a frozen BN layer without ``include_frozen``: the shift figures are measured,
      its statistics kept;
    - ``not-called``: the layer never ran on the target data; statistics kept, figures empty;
    - ``skipped``: not collected, figures empty; ``reason`` says why
      (``track_running_stats=False``, or in eval mode under ``only_training=True``).
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(
        {Status.UPDATED, Status.KEPT, Status.FROZEN, Status.NOT_CALLED, Status.SKIPPED}
    )

    name: str
    num_features: int
    status: Status
    reason: str | None = None
    calls: int = 0
    calls_per_forward: int = 0
    samples: int = 0
    adapted: str | None = None
    weight_source: float | None = None
    d_mu_max: float | None = None
    d_mu_median: float | None = None
    d_var_max: float | None = None
    d_var_median: float | None = None
    kl_max: float | None = None
    kl_median: float | None = None


@dataclass(frozen=True, kw_only=True)
class DomainLayer(_LayerRecord):
    """Per-layer result of Adaptive BN on several target domains (``adapt`` with ``domains``):
    how the domains' statistics differ from the source's and from one another.

    ``divergence`` is the matrix of median symmetric KL divergences (over channels) between
    the per-channel Gaussians of the source statistics and of each domain's pure target
    statistics, rows and columns in the report's ``divergence_labels`` order (``"source"``,
    then the domains as given): symmetric, 0 on the diagonal, None where a domain has no
    statistics for the layer; None altogether for a layer no domain measured. ``pair`` is the
    most divergent pair of target domains (two or more domains) and ``pair_kl`` its entry
    (docs/statistics.md, section 4.3). ``status`` is the layer's status in the domains,
    the first of ``updated``, ``kept``, ``frozen``, ``not-called``, ``skipped`` that any domain
    gives it (each domain's own record is in the report's ``domains``), with that domain's
    ``reason``.
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(
        {Status.UPDATED, Status.KEPT, Status.FROZEN, Status.NOT_CALLED, Status.SKIPPED}
    )

    name: str
    num_features: int
    status: Status
    reason: str | None = None
    divergence: tuple[tuple[float | None, ...], ...] | None = None
    pair: tuple[str, str] | None = None
    pair_kl: float | None = None


@dataclass(frozen=True, kw_only=True)
class InspectLayer(_LayerRecord):
    """Per-layer result of dynamic inspection (see :mod:`bnscope.ops.inspect`).

    ``d_mu``/``d_var`` (max and median over channels) compare the running statistics with the
    population statistics of the model as it is (docs/statistics.md, section 5).
    ``z_mu``/``z_var`` are the root mean square over channels of the gap in units of the EMA's
    own noise (sqrt(m/(2-m) Var(mu_B))): about 1 for an EMA that is merely noisy.
    ``ema_noise_mu`` is that noise in sigma units (median), ``batch_spread_mu`` the spread of
    batch means sqrt(Var(mu_B))/sigma and ``batch_spread_var`` the relative spread of batch
    variances, at the data's batch size. ``d_mu_rms`` and ``batch_spread_mu_rms`` are the root
    mean squares over channels of d_mu and of sqrt(Var(mu_B))/sigma: how far the running means
    are from the population against how far a single batch's are (an EMA with momentum m:
    about sqrt(m/(2-m)) of it). ``var_slope`` is the slope of log running_var against log
    var_pop over the channels (Theil-Sen; None when the channels do not allow a fit) and
    ``var_convention`` what running_var holds when it is not variances (``std``,
    ``inverse-var``, ``inverse-std``, or ``scale``: both statistics times ``var_scale``);
    docs/statistics.md, section 11. ``status`` (section 5.5, decided in this order):

    - ``skipped``: ``track_running_stats=False``, no running statistics (``reason``); no figures;
    - ``not-called``: the layer never ran on the data; no figures;
    - ``frozen``: a frozen BN layer (``FrozenBatchNorm2d``): no EMA, so no z-scores; d_mu and
      d_var compare its stored statistics with this data;
    - ``ok``: the gap is not material (median d_mu and d_var at most 0.05, ``MATERIAL_GAP``);
    - ``unknown``: a material gap but no z-score: fewer than 2 calls of the layer, a momentum
      without a noise model (0, above 1, or ``None`` without ``num_batches_tracked`` > 0), or
      no channel with non-zero noise;
    - ``stale``: a material gap with a z-score above 3 (``STALE_Z``): beyond the EMA's noise;
    - ``noisy``: a material gap within the EMA's noise.
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(Status) - {
        Status.UPDATED, Status.ANALYSED, Status.KEPT
    }

    name: str
    num_features: int
    status: Status
    reason: str | None = None
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
    d_mu_rms: float | None = None
    batch_spread_mu_rms: float | None = None
    var_slope: float | None = None
    var_convention: str | None = None
    var_scale: float | None = None


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, kw_only=True)
class GhostLayer(_LayerRecord):
    """Per-layer result of the ghost-size analysis: one :class:`GhostLayerSize` per size run.

    ``status``:

    - ``analysed``: split into ghost batches at every size run; ``sizes`` is filled;
    - ``not-called``: the layer never ran on the data;
    - ``skipped``: ``reason`` says why: a frozen BN layer (it normalizes with its stored
      statistics at every size), a forward that makes no ``batch_norm`` call with its running
      statistics (it cannot be split), or ``track_running_stats=False``.
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(
        {Status.ANALYSED, Status.NOT_CALLED, Status.SKIPPED}
    )

    name: str
    num_features: int
    status: Status
    reason: str | None = None
    calls_per_forward: int = 0
    sizes: tuple[GhostLayerSize, ...] = ()


@dataclass(frozen=True, kw_only=True)
class GhostSize(_LayerRecord):
    """The model at one ghost size g: outputs with batch statistics of chunks of g against
    outputs with population statistics on the same inputs.

    ``status`` is ``ok`` (run at this size; ``note`` may explain the data's batch size or a
    remainder chunk) or ``skipped`` (g larger than the data's batch size; ``note`` says so, the
    counts are 0 and the figures None). ``remainder_chunks``/``remainder_samples`` count the
    chunks smaller than g (batch size not a multiple of g), which are normalized on their own.
    The model's figures are the metric keys of every report's ``metrics`` variants
    (docs/statistics.md, section 9), against population statistics (the ghost report's
    ``metrics.reference``, ``precise``): ``accuracy``/``loss`` need labels, ``agreement`` is the
    fraction of equal top-1 predictions, ``kl`` the mean KL(p_pop || p_g) and ``rel_diff`` the
    relative L2 change ||out_g - out_pop|| / ||out_pop|| of the raw outputs.
    ``noise_mu``/``noise_var`` are medians over layers; ``effective_ratio`` is the lowest
    ``effective_size / g`` over layers (the layer whose chunks are most correlated). A
    single-sample remainder merged into the previous chunk counts as a remainder chunk too.
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset({Status.OK, Status.SKIPPED})

    size: int
    status: Status
    note: str | None
    chunks: int
    remainder_chunks: int
    remainder_samples: int
    accuracy: float | None
    loss: float | None
    agreement: float | None
    kl: float | None
    rel_diff: float | None
    noise_mu: float | None
    noise_var: float | None
    effective_ratio: float | None


@dataclass(frozen=True, kw_only=True)
class LeakageLayerArrangement(Record):
    """One BN layer under one arrangement of the samples into batches (see
    :class:`LeakageArrangement`): how far its batch means fall from the population's and how
    correlated the samples of a batch are, measured as the ghost analysis measures a chunk
    (docs/statistics.md, sections 7.3 and 7.5, with a chunk = a whole batch).

    ``noise_mu`` is the mean over batches and channels of |mu_B - mu_pop| / sigma_pop;
    ``effective_size`` = B * E_iid[(mu_B - mu)^2] / Var_measured(mu_B): about the batch size B
    for i.i.d. batches, lower when the samples of a batch share their statistics (a batch
    grouped by label in a layer whose features differ between labels)."""

    arrangement: str
    noise_mu: float | None
    effective_size: float | None


@dataclass(frozen=True, kw_only=True)
class LeakageLayer(_LayerRecord):
    """Per-layer result of the leakage analysis: one :class:`LeakageLayerArrangement` per
    arrangement (``iid``, ``iid-2``, then one per grouping). ``status``:

    - ``analysed``: normalized with batch statistics in every arrangement; ``arrangements``
      is filled;
    - ``not-called``: the layer never ran on the data;
    - ``skipped``: ``reason`` says why: a frozen BN layer (it normalizes with its stored
      statistics whatever the batch), a forward that makes no ``batch_norm`` call with its
      running statistics, or ``track_running_stats=False``.
    """

    STATUSES: ClassVar[frozenset[Status]] = frozenset(
        {Status.ANALYSED, Status.NOT_CALLED, Status.SKIPPED}
    )

    name: str
    num_features: int
    status: Status
    reason: str | None = None
    calls_per_forward: int = 0
    arrangements: tuple[LeakageLayerArrangement, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LeakageArrangement(Record):
    """The model's train-mode outputs (BN with batch statistics, every other module in eval
    mode) with the samples arranged into batches one way, against the ``iid`` arrangement of
    the same samples at the same batch size (docs/statistics.md, section 10).

    ``role`` is ``reference`` (``iid``: the samples in a random order, cut into batches),
    ``noise`` (``iid-2``: another random order; its change from ``iid`` is the noise floor)
    or ``grouped`` (sorted by ``group_by``: ``label``, a key of the batches, or a function's
    name). ``groups``/``largest_group`` count the groups among the samples and the samples of
    the largest, ``single_group_batches`` the batches that hold one group only (grouped rows;
    None otherwise). ``accuracy``/``loss`` need labels. Per sample, against ``iid``:
    ``agreement`` is the fraction of equal top-1 predictions, ``kl_mean``/``kl_median`` the
    symmetric KL between the softmax outputs (both need class scores), ``l2_mean``/
    ``l2_median`` ||out - out_iid|| / RMS_i ||out_iid||. For grouped rows ``ratio`` is the
    mean change (KL with class scores, else L2) over the noise row's, ``excess`` the top-1
    predictions changed beyond the noise row's (with class scores; else the L2 change beyond
    it), ``greater_fraction`` the fraction of samples whose change exceeds their own change
    under ``iid-2``, and ``leak`` whether the ``batch-leakage`` rule fired.
    """

    name: str
    role: str
    group_by: str | None
    groups: int | None
    largest_group: int | None
    single_group_batches: int | None
    accuracy: float | None
    loss: float | None
    agreement: float | None
    kl_mean: float | None
    kl_median: float | None
    l2_mean: float | None
    l2_median: float | None
    ratio: float | None
    excess: float | None
    greater_fraction: float | None
    leak: bool | None


def field_names(record_type: type) -> list[str]:
    """The field names of a record dataclass, in order (used by renderers and tests)."""
    return [f.name for f in fields(record_type)]

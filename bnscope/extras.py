"""The command-specific keys of each report (``Report.extra``), as TypedDicts.

Each command's report carries, next to its layers and findings, keys of its own (docs/cli.md,
section 5, "JSON output": ``output`` for a written checkpoint, ``sizes`` for ghost, ``metrics``
for evaluations, in one layout for every command: :class:`ReportMetrics`).
The operations in :mod:`bnscope.ops` put their figures there; a job on a checkpoint file
(:func:`bnscope.open`, the CLI) adds where the inputs came from (:class:`SourceExtra`) and how
the model ran (:class:`RunExtra`). Every TypedDict here is ``total=False``: a key is present
when the report has it (``world_size`` only under ``torch.distributed``, ``metrics`` only with
evaluation data, the :class:`SourceExtra` keys only for a checkpoint file).

The ``Report`` aliases at the end name each command's report type:
``PreciseReport = Report[PreciseLayer, PreciseExtra]``. These types describe the Python
objects; the JSON document is the same data, with non-finite floats spelled as strings.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, TypedDict

from .records import (
    AdaptLayer,
    DomainLayer,
    GhostLayer,
    InspectLayer,
    LeakageLayer,
    PreciseLayer,
    Report,
    StaticLayer,
)

__all__ = [
    "AdaptExtra",
    "AdaptReport",
    "ComparisonDict",
    "DomainDict",
    "DomainsExtra",
    "DomainsReport",
    "EpsCheckDict",
    "EvaluationDict",
    "GhostExtra",
    "GhostReport",
    "GhostSizeDict",
    "GhostVerdict",
    "InspectExtra",
    "InspectReport",
    "InspectVerdict",
    "LabelMixDict",
    "LeakageArrangementDict",
    "LeakageExtra",
    "LeakageReport",
    "LeakageVerdict",
    "MetricsDict",
    "NetworkDict",
    "OnlinePriorDict",
    "NetworkInfo",
    "PreciseExtra",
    "PreciseReport",
    "ReportMetrics",
    "RunExtra",
    "SourceExtra",
    "StaticExtra",
    "StaticReport",
    "VariantMetrics",
]

# --------------------------------------------------------------------------------------------
# Building blocks


class MetricsDict(TypedDict):
    """:meth:`bnscope.engine.evaluate.Metrics.to_dict`: accuracy and mean cross-entropy over
    ``samples`` labelled samples (None without labels or class scores)."""

    samples: int
    accuracy: float | None
    loss: float | None


class ComparisonDict(TypedDict):
    """:meth:`bnscope.engine.evaluate.Comparison.to_dict`: two models on the same inputs
    (``a`` before, ``b`` after)."""

    a: MetricsDict
    b: MetricsDict
    has_labels: bool
    agreement: float | None
    kl: float | None
    rel_diff: float


class VariantMetrics(TypedDict):
    """One variant of a model (named after the statistics its BN layers normalize with) on
    the evaluation inputs: accuracy and mean cross-entropy with labels (else None), and top-1
    ``agreement``, mean ``kl`` and relative output change ``rel_diff`` against the reference
    variant (1, 0 and 0 for the reference itself; ``agreement``/``kl`` None without class
    scores). The same keys in every variant of every report (docs/statistics.md, section 9)."""

    accuracy: float | None
    loss: float | None
    agreement: float | None
    kl: float | None
    rel_diff: float


class OnlinePriorDict(VariantMetrics):
    """One row of an adapt report's ``online_priors`` sweep: the model with
    :class:`bnscope.nn.PriorBatchNorm` layers of ``prior`` pseudo samples (N; ``inf`` is the
    source model) on the evaluation data, with the keys of a variant against ``running``."""

    prior: float


class EvaluationDict(TypedDict):
    """The keys of every :class:`ReportMetrics`: several variants of a model on the same
    ``samples``, each against the ``reference`` variant. ``variants`` keys: ``running`` (the
    checkpoint's running statistics), ``precise`` (population statistics of the data),
    ``adapted`` (Adaptive BN's statistics), ``batch`` (each batch's own statistics),
    ``prior`` (each batch's statistics mixed with the source statistics, adapt only)."""

    samples: int
    has_labels: bool
    reference: str
    variants: dict[str, VariantMetrics]


class ReportMetrics(EvaluationDict, total=False):
    """``metrics`` of a report (:meth:`bnscope.engine.evaluate.Evaluation.to_dict`), the same
    layout in every command (docs/cli.md, section 5), with the description of the ``data`` it
    was measured on (a job on a checkpoint file adds it). The variants per command:
    ``precise`` running and precise (on the evaluation data), ``adapt`` running (the source
    statistics), adapted and batch (on labelled target data), dynamic ``inspect`` running,
    precise and batch (on the data), ``ghost`` precise (the reference of its ``sizes``)."""

    data: str


class GhostSizeDict(TypedDict):
    """One entry of a ghost report's ``sizes``: :meth:`bnscope.records.GhostSize.to_dict`
    (``status`` is ``"ok"`` or ``"skipped"``)."""

    size: int
    status: str
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


class NetworkDict(TypedDict):
    """One network of a checkpoint holding several (an EMA copy next to the raw weights):
    :meth:`bnscope.io.statedict.Network.to_dict`."""

    key: str | None
    prefix: str
    bn_layers: int
    ema: bool
    used: bool


class NetworkInfo(TypedDict, total=False):
    """:meth:`bnscope.io.checkpoint.Checkpoint.network_info`: present only when the checkpoint
    holds several networks. ``ema_key`` is the ``key`` of an EMA copy left unused."""

    networks: list[NetworkDict]
    ema_key: str | None


class LabelMixDict(TypedDict):
    """``label_mix`` of a precise, adapt or dynamic inspect report
    (:func:`bnscope.engine.labels.label_mix`, docs/statistics.md section 2.8): the class mix of
    the labelled batches against random batches. ``chi2`` is Pearson's chi-square of the
    batch x class table with ``df`` degrees of freedom; ``ratio`` its ratio to its mean under
    a random shuffle (about 1 for i.i.d. batches); ``effective_size`` the number of
    independent samples whose class mix varies as much as that of a batch of
    ``mean_batch_size``; ``p_value`` the chi-square tail. The last three are None with one
    batch or one class."""

    batches: int
    samples: int
    classes: int
    mean_batch_size: float
    single_class_batches: int
    chi2: float
    df: int
    ratio: float | None
    effective_size: float | None
    p_value: float | None


class LeakageArrangementDict(TypedDict):
    """One entry of a leakage report's ``arrangements``:
    :meth:`bnscope.records.LeakageArrangement.to_dict` (``role`` is ``"reference"``,
    ``"noise"`` or ``"grouped"``)."""

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
class EpsCheckDict(TypedDict):
    """``eps_check`` of a dynamic inspect report (docs/statistics.md, section 11.3): ``eps``,
    the eps of most BN layers, and ``other_eps``, the other framework's convention tried in
    its place (each layer gets the other convention of its own eps); ``layers`` counts the
    BN layers where eps matters (enough channels whose eval-mode gain the other eps changes by
    1% or more), ``channels`` those channels, ``max_gain_ratio`` the largest change of a gain
    (a factor >= 1; None without a layer that ran). ``evaluated`` says whether the model ran
    with the other eps (only where eps matters); ``variant`` is then the model with running
    statistics and the other eps against ``running`` (the keys of a metrics variant), else
    None."""

    eps: float | None
    other_eps: float | None
    layers: int
    channels: int
    max_gain_ratio: float | None
    evaluated: bool
    variant: VariantMetrics | None


#: the one-word verdict of a dynamic inspect report
InspectVerdict: TypeAlias = Literal["stale", "gap", "noisy", "healthy"]
#: the one-word verdict of a ghost report (``none``: no size could be analysed)
GhostVerdict: TypeAlias = Literal["none", "fine", "noisy"]
#: the one-word verdict of a leakage report (``independent``: no sample's output changes
#: between arrangements, e.g. every BN layer is frozen)
LeakageVerdict: TypeAlias = Literal["leak", "none", "independent"]

# --------------------------------------------------------------------------------------------
# Keys every job on a checkpoint file adds


class SourceExtra(NetworkInfo, total=False):
    """Where a report's inputs came from (a job on a checkpoint file; :func:`bnscope.open`,
    the CLI): the checkpoint ``format`` (``torch``, ``safetensors``, ``module``,
    ``torchscript``), the ``key`` its state dict was under, the key ``prefix`` stripped, the
    ``model`` spec and the ``project_file`` the options came from (None when none), plus
    :class:`NetworkInfo` for a checkpoint holding several networks."""

    format: str
    key: str | None
    prefix: str
    model: str | None
    project_file: str | None


class RunExtra(SourceExtra, total=False):
    """How a model-running job ran: the ``data`` description, samples left out of the last
    batch (``dropped_samples``, ``dropped_reason``), ``device``, ``amp`` (``bf16``, ``fp16``
    or None) and ``channels_last``."""

    data: str
    dropped_samples: int
    dropped_reason: str | None
    device: str
    amp: str | None
    channels_last: bool


# --------------------------------------------------------------------------------------------
# Per command


class StaticExtra(SourceExtra, total=False):
    """Static inspect (buffers only): whether PyTorch's default momentum or eps had to be
    assumed for some layer."""

    momentum_assumed: bool
    eps_assumed: bool


class InspectExtra(RunExtra, total=False):
    """Dynamic inspect: the ``verdict`` and its sentence, ``batches``/``samples`` collected,
    ``forwards`` run in all, the train/test ``metrics`` (running, precise and batch statistics
    on the same batches), the static layer records (``static_layers``:
    :meth:`bnscope.records.StaticLayer.to_dict` of each), the class mix of the collected
    batches (``label_mix``, None without labels) and the eps check (``eps_check``)."""

    verdict: InspectVerdict
    verdict_text: str
    batches: int
    samples: int
    forwards: int
    metrics: ReportMetrics
    static_layers: list[dict[str, Any]]
    label_mix: LabelMixDict | None
    eps_check: EpsCheckDict


class PreciseExtra(RunExtra, total=False):
    """Precise BN: ``batches``/``samples`` collected (pooled over ``world_size`` ranks under
    ``torch.distributed``), the class mix of those batches (``label_mix``, None without
    labels), before/after ``metrics`` with evaluation data (variants ``running`` and
    ``precise``), the ``output`` checkpoint (None until written; a job sets it) and whether
    it is written for frozen BN layers (``freeze``; a job on a checkpoint file sets it)."""

    batches: int
    samples: int
    label_mix: LabelMixDict | None
    world_size: int
    metrics: ReportMetrics
    output: str | None
    freeze: bool


class AdaptExtra(RunExtra, total=False):
    """Adaptive BN: ``batches``/``samples`` of target data, the ``prior`` (pseudo samples) and
    ``shift_threshold`` of ``domain-shift``, partial adaptation (``only``: ``"mean"``,
    ``"var"`` or None for both; ``first_layers``: K or None for all), the class mix of
    labelled target batches (``label_mix``, None without labels), ``world_size``, ``metrics``
    with labelled target data (variants ``running``, the source statistics, ``adapted``,
    ``batch`` and, with ``online_prior`` N, ``prior``), the test-time prior sweep
    ``online_priors`` and the ``output`` checkpoint."""

    batches: int
    samples: int
    label_mix: LabelMixDict | None
    prior: float
    shift_threshold: float
    only: str | None
    first_layers: int | None
    world_size: int
    metrics: ReportMetrics
    online_prior: float
    online_priors: list[OnlinePriorDict]
    output: str | None


class DomainDict(TypedDict, total=False):
    """One entry of an adapt report's ``domains`` (``adapt`` with several target domains): the
    domain's ``name``, the ``batches``/``samples`` of its data, their class mix (``label_mix``)
    and its per-layer records (``layers``: :meth:`bnscope.records.AdaptLayer.to_dict` of each,
    what a one-domain adapt reports). A job adds the ``data`` description, the samples left out
    of its last batch (``dropped_samples``, ``dropped_reason``) and the ``output`` checkpoint
    of the domain (None until written)."""

    name: str
    batches: int
    samples: int
    label_mix: LabelMixDict | None
    layers: list[dict[str, Any]]
    data: str
    dropped_samples: int
    dropped_reason: str | None
    output: str | None


class DomainsExtra(RunExtra, total=False):
    """Adaptive BN on several target domains (docs/statistics.md, section 4.3): one entry per
    domain (``domains``, in the order given), the labels of the divergence matrices
    (``divergence_labels``: ``"source"``, then the domain names) and ``divergence``, the
    median over layers of the layers' matrices of median symmetric KL; the options every
    domain was adapted with (``prior``, ``shift_threshold``, ``only``, ``first_layers``),
    ``world_size`` under ``torch.distributed``, and the split checkpoint (``split_output``,
    None when not asked for or not yet written; a job sets it)."""

    domains: list[DomainDict]
    divergence_labels: list[str]
    divergence: list[list[float | None]]
    prior: float
    shift_threshold: float
    only: str | None
    first_layers: int | None
    world_size: int
    split_output: str | None


class GhostExtra(RunExtra, total=False):
    """Ghost-size analysis: the ``verdict`` and its sentence, one entry per requested size
    (``sizes``, each with the model's metrics at that size against population statistics),
    the data's ``batch_size``, ``batches``/``samples``/``forwards``, and ``metrics`` with
    population statistics (variant ``precise``, the reference) and whether the data had labels
    (``has_labels``)."""

    verdict: GhostVerdict
    verdict_text: str
    sizes: list[GhostSizeDict]
    batch_size: int
    batches: int
    samples: int
    forwards: int
    metrics: ReportMetrics


class LeakageExtra(RunExtra, total=False):
    """Leakage analysis (docs/statistics.md, section 10): the ``verdict`` and its sentence,
    the groupings asked for (``group_by``), the normalization ``batch_size`` of every
    arrangement, the ``samples`` re-batched (the pool cut to whole batches; ``left_out``
    samples of the pool did not fill a batch), the ``batches`` of each arrangement, the
    ``seed`` of the arrangements, the per-sample change the rule uses (``metric``: ``kl`` with
    class scores, else ``l2``), the rule's ``ratio_threshold`` and ``excess_threshold``,
    whether the samples had labels (``has_labels``), ``forwards`` run in all, and one entry
    per arrangement (``arrangements``: ``iid``, ``iid-2``, then one per grouping)."""

    verdict: LeakageVerdict
    verdict_text: str
    group_by: list[str]
    batch_size: int
    samples: int
    left_out: int
    batches: int
    seed: int
    metric: str
    ratio_threshold: float
    excess_threshold: float
    has_labels: bool
    forwards: int
    arrangements: list[LeakageArrangementDict]


# --------------------------------------------------------------------------------------------
# Report types

StaticReport: TypeAlias = Report[StaticLayer, StaticExtra]
InspectReport: TypeAlias = Report[InspectLayer, InspectExtra]
PreciseReport: TypeAlias = Report[PreciseLayer, PreciseExtra]
AdaptReport: TypeAlias = Report[AdaptLayer, AdaptExtra]
GhostReport: TypeAlias = Report[GhostLayer, GhostExtra]
DomainsReport: TypeAlias = Report[DomainLayer, DomainsExtra]
LeakageReport: TypeAlias = Report[LeakageLayer, LeakageExtra]

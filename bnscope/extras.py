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
    GhostLayer,
    InspectLayer,
    PreciseLayer,
    Report,
    StaticLayer,
)

__all__ = [
    "AdaptExtra",
    "AdaptReport",
    "ComparisonDict",
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


class EpsCheckDict(TypedDict):
    """``eps_check`` of a dynamic inspect report (docs/statistics.md, section 10.3): ``eps``,
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
    ``precise``), and the ``output`` checkpoint (None until written; a job sets it)."""

    batches: int
    samples: int
    label_mix: LabelMixDict | None
    world_size: int
    metrics: ReportMetrics
    output: str | None


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


# --------------------------------------------------------------------------------------------
# Report types

StaticReport: TypeAlias = Report[StaticLayer, StaticExtra]
InspectReport: TypeAlias = Report[InspectLayer, InspectExtra]
PreciseReport: TypeAlias = Report[PreciseLayer, PreciseExtra]
AdaptReport: TypeAlias = Report[AdaptLayer, AdaptExtra]
GhostReport: TypeAlias = Report[GhostLayer, GhostExtra]

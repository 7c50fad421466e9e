"""The class mix of labelled batches: were the batches drawn i.i.d. from the data?

BN statistics gathered with batch statistics (Precise BN, AdaBN, the dynamic report) are those of
the model fed the batches it was given. When a batch holds one class (an image folder read in
order), every layer after the first normalizes with that class's statistics, and the pooled
statistics are not the i.i.d. population's. Labels tell whether the batches look like random
draws: docs/statistics.md, section 2.8.

:class:`LabelTally` counts each batch's labels on the host and folds the counts into running sums
(every :data:`FOLD` batches), so its memory does not grow with the number of batches; labels
that a DataLoader yields on the CPU cost no device read at all, labels already on a device are
kept there and read in one transfer per :data:`DEVICE_FOLD` batches and at the end.
:func:`label_mix` turns the pooled counts into Pearson's chi-square of the batch x class table
and its ratio to the chi-square's mean under a random shuffle (Haldane 1940), whose inverse
scales the batch size to an effective number of independent samples (Kish's design effect,
1965).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..extras import LabelMixDict
from . import sync

__all__ = ["LabelCounts", "LabelTally", "label_mix", "MAX_POOLED_LABEL"]

#: under torch.distributed the per-class sums are pooled as dense vectors of the largest label
#: plus one; labels at or above this are not pooled (no label mix is reported)
MAX_POOLED_LABEL = 1 << 20
#: per-batch label counts kept on the host before they are folded into the running sums
#: (amortizes the fold; bounds the tally's memory whatever the number of batches)
FOLD = 256
#: labels yielded on a device are kept there for up to this many batches, then read in one
#: transfer (one host read per DEVICE_FOLD forwards, not per batch; bounded device memory)
DEVICE_FOLD = 1024


@dataclass
class LabelCounts:
    """Sufficient statistics of the batch x class table (docs/statistics.md, section 2.8).

    ``classes`` are the labels seen (sorted), ``totals`` C_k their counts over all batches and
    ``squares`` S_k = sum over batches of c_bk^2 / n_b (c_bk: the batch's count of class k,
    n_b: its labelled samples); ``batches`` B, ``samples`` N = sum n_b, ``single_class``
    the batches whose labels are all one class. Every figure is a sum over batches, so the
    counts of several parts (ranks) add up."""

    classes: np.ndarray
    totals: np.ndarray
    squares: np.ndarray
    batches: int = 0
    samples: int = 0
    single_class: int = 0


@dataclass
class LabelTally:
    """The labels of a pass's batches, batch by batch.

    :meth:`add` takes each batch's labels (or None). A batch counts when its labels are a 1-D
    integer tensor (not bool) with one label per sample; a batch without such labels makes the
    whole pass unlabelled (``usable`` False), as does a negative label. Labels on the CPU are
    counted at once (no device read); labels on another device are kept (detached) and read in
    one transfer every :data:`DEVICE_FOLD` batches and by :meth:`counts`. Every :data:`FOLD`
    batches the per-batch counts are folded into running sums (every figure of
    :class:`LabelCounts` is a sum over batches), so a long run keeps a bounded number of
    arrays."""

    usable: bool = True
    _sums: LabelCounts | None = None
    _host: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _device: list[torch.Tensor] = field(default_factory=list)

    def add(self, labels: object, samples: int) -> None:
        if not self.usable:
            return
        if (
            not isinstance(labels, torch.Tensor)
            or labels.ndim != 1
            or labels.dtype == torch.bool
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.shape[0] != samples
        ):
            self._drop()
            return
        if samples == 0:
            return
        if labels.device.type == "cpu":
            self._count(labels.detach().numpy())
        else:
            self._device.append(labels.detach())
            if len(self._device) >= DEVICE_FOLD:
                self._read_device()

    def _drop(self) -> None:
        self.usable = False
        self._sums = None
        self._host.clear()
        self._device.clear()

    def _count(self, values: np.ndarray) -> None:
        if values.size and int(values.min()) < 0:
            self._drop()
            return
        classes, counts = np.unique(values.astype(np.int64, copy=False), return_counts=True)
        self._host.append((classes, counts))
        if len(self._host) >= FOLD:
            self._fold()

    def _fold(self) -> None:
        """The kept per-batch counts, added to the running sums."""
        if not self._host:
            return
        part = _table(self._host)
        self._host = []
        self._sums = part if self._sums is None else _merge(self._sums, part)

    def _read_device(self) -> None:
        """Count the labels kept on a device (one transfer for all of them)."""
        pending, self._device = self._device, []
        if not pending:
            return
        for values in sync.fetch(pending):
            if not self.usable:
                break
            self._count(values.numpy())

    def counts(self) -> LabelCounts | None:
        """The pass's :class:`LabelCounts` (None when it was not labelled). Labels left on a
        device are read here, in one transfer for all of them."""
        self._read_device()
        if not self.usable:
            return None
        self._fold()
        return self._sums if self._sums is not None else _table([])


def _table(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> LabelCounts:
    """C_k and S_k from each batch's (classes, counts)."""
    empty = np.zeros(0, dtype=np.float64)
    if not parts:
        return LabelCounts(np.zeros(0, dtype=np.int64), empty, empty)
    classes = np.concatenate([c for c, _ in parts])
    counts = np.concatenate([n for _, n in parts]).astype(np.float64)
    sizes = np.concatenate([np.full(len(n), n.sum(), dtype=np.float64) for _, n in parts])
    seen, where = np.unique(classes, return_inverse=True)
    totals = np.bincount(where, weights=counts, minlength=len(seen))
    squares = np.bincount(where, weights=counts * counts / sizes, minlength=len(seen))
    return LabelCounts(
        classes=seen,
        totals=totals,
        squares=squares,
        batches=len(parts),
        samples=int(sum(int(n.sum()) for _, n in parts)),
        single_class=sum(1 for c, _ in parts if len(c) == 1),
    )


def _merge(a: LabelCounts, b: LabelCounts) -> LabelCounts:
    """The counts of two sets of batches together (every figure is a sum over batches)."""
    seen, where = np.unique(np.concatenate([a.classes, b.classes]), return_inverse=True)
    totals = np.bincount(where, weights=np.concatenate([a.totals, b.totals]), minlength=len(seen))
    squares = np.bincount(
        where, weights=np.concatenate([a.squares, b.squares]), minlength=len(seen)
    )
    return LabelCounts(
        classes=seen.astype(np.int64, copy=False),
        totals=totals,
        squares=squares,
        batches=a.batches + b.batches,
        samples=a.samples + b.samples,
        single_class=a.single_class + b.single_class,
    )


def dense(counts: LabelCounts, length: int) -> np.ndarray:
    """``[C_0 .. C_{length-1}, S_0 .. S_{length-1}]`` (float64) for pooling over ranks."""
    out = np.zeros(2 * length, dtype=np.float64)
    out[counts.classes] = counts.totals
    out[length + counts.classes] = counts.squares
    return out


def from_dense(
    values: np.ndarray, batches: int, samples: int, single_class: int
) -> LabelCounts:
    """The :class:`LabelCounts` of pooled :func:`dense` vectors."""
    length = len(values) // 2
    totals, squares = values[:length], values[length:]
    seen = np.flatnonzero(totals > 0)
    return LabelCounts(
        classes=seen.astype(np.int64),
        totals=totals[seen],
        squares=squares[seen],
        batches=batches,
        samples=samples,
        single_class=single_class,
    )


def label_mix(counts: LabelCounts | None) -> LabelMixDict | None:
    """How far the batches' class mix is from random batches (docs/statistics.md, 2.8).

    Pearson's chi-square of the batch x class table, from the sums over batches::

        chi2  = sum_b sum_k (c_bk - n_b p_k)^2 / (n_b p_k) = sum_k S_k / p_k - N,  p_k = C_k / N
        df    = (B - 1) (K - 1)
        ratio = chi2 (N - 1) / (N df)

    Under a uniformly random shuffle of the data into batches of the given sizes, E[chi2] =
    df N / (N - 1) (Haldane 1940, "The mean and variance of chi^2, when used as a test of
    homogeneity, when expectations are small", Biometrika 31), so ratio is 1 on average. It is
    the design effect of Kish (1965, "Survey Sampling", section 8.2) of the class fractions:
    batches of n samples mix classes like n / ratio independent samples
    (``effective_size``); batches that each hold one class of K equal ones give ratio ~ n.
    ``p_value`` is the chi-square distribution's upper tail at chi2 with df degrees of freedom
    (the regularized upper incomplete gamma function Q(df/2, chi2/2)). None without labelled
    batches; ratio, effective size and p-value are None when df = 0 (one batch or one class).
    """
    if counts is None or counts.batches == 0 or counts.samples == 0:
        return None
    n_total = counts.samples
    batches = counts.batches
    classes = int(len(counts.classes))
    p = counts.totals / n_total
    chi2 = max(float(np.sum(counts.squares / p)) - n_total, 0.0) if classes else 0.0
    df = (batches - 1) * max(classes - 1, 0)
    mean_size = n_total / batches
    ratio = effective = p_value = None
    if df > 0:
        ratio = chi2 * (n_total - 1) / (n_total * df)
        effective = mean_size / ratio if ratio > 0 else math.inf
        q = torch.special.gammaincc(
            torch.tensor(df / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)
        )
        p_value = float(q)
    return {
        "batches": batches,
        "samples": n_total,
        "classes": classes,
        "mean_batch_size": mean_size,
        "single_class_batches": counts.single_class,
        "chi2": chi2,
        "df": df,
        "ratio": ratio,
        "effective_size": effective,
        "p_value": p_value,
    }

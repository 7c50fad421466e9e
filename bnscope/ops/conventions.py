"""Conversion and convention checks: BN statistics ported from another framework.

Checkpoints converted from TensorFlow/Keras, Caffe or Caffe2 carry three well-known mistakes
(Wu, "Devils in BatchNorm"; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"), each a
finding of the dynamic ``inspect`` (docs/statistics.md, section 11):

- ``momentum-convention`` (:func:`tf_momentum`): a BN module's ``momentum`` written in the
  other convention. TF/Keras/Caffe call the weight of the *old* value "momentum" or "decay"
  (0.9, 0.99, 0.997, 0.999), PyTorch the weight of the *new* batch (m = 1 - decay): PyTorch's
  ``momentum=0.9`` keeps only 10% of the EMA's past, whose noise is then m / (2 - m) = 0.82 of
  one batch's (section 5.2).
- ``var-convention`` (:func:`fit_var_convention`): ``running_var`` holding a standard
  deviation, an inverse variance or an inverse standard deviation (Caffe2's ``inv_std``), or
  running statistics still multiplied by Caffe's ``scale_factor`` blob. Found by a robust fit
  of log running_var against log var_pop over the channels (Theil 1950, Sen 1968): the slope is
  1 for variances, 1/2 for standard deviations, -1 for inverse variances, -1/2 for inverse
  standard deviations; a scale factor s keeps the slope 1 with the offset log s, and scales the
  running means by the same s.
- ``eps-mismatch`` (:func:`other_eps`, :func:`gain_ratio`, :func:`eps_sensitive`,
  :func:`eps_outcome`): an ``eps`` of the other framework (TF/Keras 1e-3, PyTorch 1e-5), which
  matters only where the variances are small against it; inspect then measures the outputs
  with the other eps.

Pure functions on per-channel arrays (numpy float64, or anything ``numpy.asarray`` takes): no
model, no device, no wording (:mod:`bnscope.findings` words the findings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

import numpy as np

#: ``momentum-convention`` when a module's momentum m (PyTorch's: the weight of the newest batch)
#: is at least this and below 1: the newest batch weighs at least as much as the whole past.
#: PyTorch recipes use 0.1 (the default), 0.01, 0.03, 0.003, 0.001 or None; 1 - decay of TF
#: (0.9, 0.99, 0.997, 0.999) is at least 0.9. m = 1 (the running statistics are the last batch's)
#: is a deliberate PyTorch setting and 1 - 1 = 0 no momentum, so it is left alone.
MOMENTUM_CONVENTION = 0.5

#: var-convention: channels used by the fit need var_pop above this many eps (where eps does
#: not dominate what a converter may have added to it) and a finite running_var > 0 ...
VAR_FLOOR = 10.0
#: ... at least this many of them ...
MIN_CHANNELS = 8
#: ... a standard deviation of x = log var_pop over them of at least this (where all variances
#: are alike there is no slope to measure, and the conversions hardly change them) ...
MIN_LOG_SPREAD = 0.1
#: ... and a slope measured to within this standard error: sigma_r / (sd(x) sqrt(n)), sigma_r
#: the robust spread of the residuals (1.4826 median absolute deviation). Then a slope near a
#: conversion's is at least 3 standard errors from the next one's (SLOPE_TOL = 0.2). Clean
#: conversions fit exactly and are judged at any spread above MIN_LOG_SPREAD; stale statistics
#: need channels whose variances differ more.
MAX_SLOPE_SE = 0.07
#: the fit uses at most this many channels (evenly spaced in var_pop order): Theil-Sen takes
#: every pair, n (n - 1) / 2 slopes
MAX_FIT_CHANNELS = 512
#: a conversion's slope must be within this of the fitted one (the slopes 1, 1/2, -1/2, -1
#: are 1/2 apart: 0.2 leaves a gap between any two)
SLOPE_TOL = 0.2
#: std, inverse var and inverse std leave no offset: |intercept| at most log 2
OFFSET_TOL = math.log(2.0)
#: ... and the conversion must explain the channels at least twice as well as "running_var is
#: the variance": median |y - b_k x| <= RESID_RATIO * median |y - x|
RESID_RATIO = 0.5
#: scale: a common factor s with |log s| >= log 4 (Caffe's s is about 1000 after training; a
#: factor near 1 is too easily mimicked by noisy stale statistics) ...
SCALE_MIN = 4.0
#: ... the channels' log ratios within RESID_RATIO * |log s| of log s (median absolute
#: deviation) ...
#: ... and the running means scaled by the same s: the median of running_mean / mu_pop over
#: the channels with |mu_pop| >= MEAN_INFORMATIVE * sigma (at least MIN_MEAN_CHANNELS of them)
#: within MEAN_SCALE_TOL of log s (in log). A model whose layer input was scaled by c after its
#: EMA has means off by c and variances by c^2, never the same factor.
MEAN_INFORMATIVE = 0.2
MIN_MEAN_CHANNELS = 3
MEAN_SCALE_TOL = 0.2

#: eps of the two conventions: PyTorch (Keras-ported ResNets' 1.001e-5 counts as this) and
#: TF/Keras
TORCH_EPS = 1e-5
TF_EPS = 1e-3
#: eps below this is read as PyTorch's convention, at or above as TF's (the geometric mean)
EPS_BOUNDARY = 1e-4
#: eps matters in a channel when the other convention changes its eval-mode gain
#: 1 / sqrt(var_pop + eps) by at least this factor minus 1 (1%) ...
EPS_GAIN = 0.01
#: ... and in a layer when at least this fraction of its channels are such channels: then
#: inspect runs the model once more per batch with the other eps
EPS_CHANNELS = 0.05
#: with labels: the other eps is clearly better when accuracy rises by more than this ...
EPS_ACCURACY = 0.02
#: ... or accuracy does not fall and the loss falls by more than this fraction
EPS_LOSS = 0.1
#: without labels: the change is material when top-1 agreement with the model's own eps is
#: below this, or (outputs that are no class scores) the relative output change above
#: EPS_REL_DIFF
EPS_AGREEMENT = 0.99
EPS_REL_DIFF = 0.05

Conversion: TypeAlias = Literal["std", "inverse-var", "inverse-std", "scale"]
#: the slope of log running_var against log var_pop of each conversion (1: variances)
SLOPES: dict[Conversion, float] = {
    "std": 0.5,
    "inverse-var": -1.0,
    "inverse-std": -0.5,
    "scale": 1.0,
}


# --------------------------------------------------------------------------------------------
# momentum


def tf_momentum(momentum: float | None) -> float | None:
    """The PyTorch momentum 1 - m a module with ``momentum`` m probably meant, when m looks
    like TF/Keras's momentum ("decay", the weight of the old value): MOMENTUM_CONVENTION <= m
    < 1. None otherwise (``momentum=None``, a cumulative average, included)."""
    if momentum is None or not math.isfinite(momentum):
        return None
    if MOMENTUM_CONVENTION <= momentum < 1.0:
        return round(1.0 - momentum, 12)
    return None


def ema_noise_factor(momentum: float) -> float:
    """m / (2 - m): the stationary variance of an EMA with momentum m of i.i.d. batch
    statistics, in units of one batch's (docs/statistics.md, section 5.2)."""
    return momentum / (2.0 - momentum)


# --------------------------------------------------------------------------------------------
# var-convention


@dataclass(frozen=True)
class VarFit:
    """The fit of one layer: log running_var = ``intercept`` + ``slope`` * log var_pop over
    ``channels`` channels (Theil-Sen), the ``conversion`` that explains it (None: variances, or
    nothing fits well enough) and, for ``scale``, the common factor ``scale`` (exp of the
    intercept) and ``mean_scale`` (the factor of the running means). ``x`` and ``y`` are the
    points fitted (:func:`var_fit_points`), kept for drawing the fit."""

    channels: int
    slope: float
    intercept: float
    conversion: Conversion | None = None
    scale: float | None = None
    mean_scale: float | None = None
    x: np.ndarray | None = field(default=None, repr=False, compare=False)
    y: np.ndarray | None = field(default=None, repr=False, compare=False)


def theil_sen(x: Any, y: Any) -> tuple[float, float]:
    """(slope, intercept) of the Theil-Sen line through the points: the median of the slopes of
    every pair with distinct x (Theil 1950, Sen 1968), and the median of y - slope * x. Robust:
    up to 29% of the points may be anywhere. Needs two distinct x."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(xs.size, k=1)
    dx = xs[j] - xs[i]
    ok = dx != 0
    if not ok.any():
        raise ValueError("theil_sen needs two distinct x")
    slope = float(np.median((ys[j] - ys[i])[ok] / dx[ok]))
    return slope, float(np.median(ys - slope * xs))


def slope_se(x: Any, y: Any, slope: float, intercept: float) -> float:
    """The standard error of a fitted slope: sigma_r / (sd(x) sqrt(n)), with sigma_r = 1.4826
    times the median absolute deviation of the residuals y - (intercept + slope x) (the
    standard deviation for normal residuals, robust to outliers); the least-squares formula,
    which Theil-Sen matches within a few percent for normal errors. inf without spread in x."""
    xs = np.asarray(x, dtype=np.float64)
    r = np.asarray(y, dtype=np.float64) - (intercept + slope * xs)
    spread = float(np.std(xs))
    if spread == 0 or xs.size < 2:
        return math.inf
    sigma = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return sigma / (spread * math.sqrt(xs.size))


def _subsample(x: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` points, evenly spaced in the order of x."""
    order = np.argsort(x, kind="stable")
    if order.size <= limit:
        return order
    return order[np.round(np.linspace(0, order.size - 1, limit)).astype(np.int64)]


def fit_var_convention(
    running_mean: Any,
    running_var: Any,
    pop_mean: Any,
    pop_var: Any,
    eps: float,
    init_weight: float = 0.0,
) -> VarFit | None:
    """Which quantity ``running_var`` holds, judged against the population statistics of the
    same channels (docs/statistics.md, section 11.2). None when the layer cannot be judged:
    fewer than :data:`MIN_CHANNELS` usable channels (var_pop > VAR_FLOOR * eps, running_var
    finite and > 0), a spread of x below :data:`MIN_LOG_SPREAD`, or a slope whose standard error
    (:func:`slope_se`) is above :data:`MAX_SLOPE_SE`.

    ``init_weight`` is w = (1-m)^T, the weight an EMA still gives its initial mean 0 / var 1
    (0 when unknown): the running statistics of a correct but unwarmed EMA are
    (1 - w) mu_pop and (1 - w) var_pop + w, and the fit compares with those. With
    x = log((1 - w) var_pop + w) and y = log running_var, (b, a) = :func:`theil_sen`; the
    conversion k
    whose slope b_k (:data:`SLOPES`) is nearest b, when |b - b_k| <= SLOPE_TOL:

    - b_k = 1: variances (no conversion), or ``scale`` when |a| >= log SCALE_MIN, the median
      |y - x - a| <= RESID_RATIO |a|, and the running means carry the same factor
      (:func:`mean_scale` within MEAN_SCALE_TOL of a, in log);
    - 1/2, -1, -1/2 (``std``, ``inverse-var``, ``inverse-std``): |a| <= OFFSET_TOL and
      median |y - b_k x| <= RESID_RATIO * median |y - x|.
    """
    r_mean = np.asarray(running_mean, dtype=np.float64).reshape(-1)
    p_mean = np.asarray(pop_mean, dtype=np.float64).reshape(-1)
    p_var = np.asarray(pop_var, dtype=np.float64).reshape(-1)
    w = _init_weight(init_weight)  # (the EMA correction of the means below uses it too)
    x, y = var_fit_points(running_var, p_var, eps, w)
    if x.size < MIN_CHANNELS:
        return None
    if float(np.std(x)) < MIN_LOG_SPREAD:
        return None
    pick = _subsample(x, MAX_FIT_CHANNELS)
    slope, intercept = theil_sen(x[pick], y[pick])
    if slope_se(x, y, slope, intercept) > MAX_SLOPE_SE:
        return None
    fit = VarFit(channels=int(x.size), slope=slope, intercept=intercept, x=x, y=y)
    nearest = min(SLOPES, key=lambda k: abs(SLOPES[k] - slope))
    if abs(SLOPES[nearest] - slope) > SLOPE_TOL:
        return fit
    if nearest == "scale":
        if abs(intercept) < math.log(SCALE_MIN):
            return fit
        if float(np.median(np.abs(y - x - intercept))) > RESID_RATIO * abs(intercept):
            return fit
        s_mu = mean_scale(r_mean, (1.0 - w) * p_mean, (1.0 - w) ** 2 * (p_var + eps))
        if s_mu is None or abs(math.log(s_mu) - intercept) > MEAN_SCALE_TOL:
            return fit
        return replace(fit, conversion="scale", scale=math.exp(intercept), mean_scale=s_mu)
    if abs(intercept) > OFFSET_TOL:
        return fit
    resid = float(np.median(np.abs(y - SLOPES[nearest] * x)))
    if resid > RESID_RATIO * float(np.median(np.abs(y - x))):
        return fit
    return replace(fit, conversion=nearest)


def _init_weight(init_weight: float) -> float:
    return min(max(float(init_weight), 0.0), 1.0) if math.isfinite(init_weight) else 0.0


def var_fit_points(
    running_var: Any, pop_var: Any, eps: float, init_weight: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The points :func:`fit_var_convention` fits, one per usable channel (var_pop above
    ``VAR_FLOOR * eps``, running_var finite and > 0): x = log((1 - w) var_pop + w) and
    y = log running_var, with w = ``init_weight`` (clipped to [0, 1]; 0 when not finite)."""
    r_var = np.asarray(running_var, dtype=np.float64).reshape(-1)
    p_var = np.asarray(pop_var, dtype=np.float64).reshape(-1)
    w = _init_weight(init_weight)
    # (comparisons with NaN are False and raise no warning: no np.errstate, whose context
    # variable would outlive the call)
    usable = np.isfinite(r_var) & (r_var > 0) & np.isfinite(p_var) & (p_var > VAR_FLOOR * eps)
    return np.log((1.0 - w) * p_var[usable] + w), np.log(r_var[usable])


def mean_scale(running_mean: Any, pop_mean: Any, sigma2: Any) -> float | None:
    """The common factor of the running means: the median of running_mean / mu_pop over the
    channels with |mu_pop| >= MEAN_INFORMATIVE * sigma (``sigma2`` = var_pop + eps); None with
    fewer than MIN_MEAN_CHANNELS such channels or a median <= 0."""
    r = np.asarray(running_mean, dtype=np.float64).reshape(-1)
    m = np.asarray(pop_mean, dtype=np.float64).reshape(-1)
    s2 = np.asarray(sigma2, dtype=np.float64).reshape(-1)
    sigma = np.sqrt(np.where(np.isfinite(s2) & (s2 > 0), s2, 0.0))
    ok = np.isfinite(r) & np.isfinite(m) & (m != 0) & (np.abs(m) >= MEAN_INFORMATIVE * sigma)
    if int(ok.sum()) < MIN_MEAN_CHANNELS:
        return None
    ratio = float(np.median(r[ok] / m[ok]))
    return ratio if ratio > 0 else None


# --------------------------------------------------------------------------------------------
# eps-mismatch


def other_eps(eps: float) -> float:
    """The eps of the other convention: TF/Keras's 1e-3 for an eps below EPS_BOUNDARY
    (PyTorch's 1e-5, Keras ResNets' 1.001e-5), PyTorch's 1e-5 otherwise."""
    return TF_EPS if eps < EPS_BOUNDARY else TORCH_EPS


def gain_ratio(pop_var: Any, eps: float, other: float) -> np.ndarray:
    """Per channel, how much the eval-mode gain 1 / sqrt(var + eps) changes when eps becomes
    ``other``: sqrt((var + max) / (var + min)) >= 1 of the two eps (var = var_pop, clamped at
    0; NaN stays NaN)."""
    v = np.clip(np.asarray(pop_var, dtype=np.float64).reshape(-1), 0.0, None)
    lo, hi = max(min(eps, other), 1e-30), max(eps, other)  # eps = 0: no division by zero
    return np.asarray(np.sqrt((v + hi) / (v + lo)))


def eps_sensitive(ratios: Any) -> tuple[bool, int]:
    """(whether eps matters in the layer, how many of its channels it matters in): channels
    whose gain changes by at least EPS_GAIN, in at least EPS_CHANNELS of the channels."""
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return False, 0
    hit = int((r >= 1.0 + EPS_GAIN).sum())  # NaN compares False
    return hit > 0 and hit >= EPS_CHANNELS * r.size, hit


EpsOutcome: TypeAlias = Literal["better", "material"]


def eps_outcome(
    accuracy: float | None,
    loss: float | None,
    other_accuracy: float | None,
    other_loss: float | None,
    agreement: float | None,
    rel_diff: float,
) -> EpsOutcome | None:
    """What the evaluation with the other eps says (docs/statistics.md, section 11.3):
    ``"better"`` when labels show it clearly better (accuracy up by more than EPS_ACCURACY, or
    not down and the loss down by more than EPS_LOSS of it); with labels otherwise None (the
    model's eps is as good: it fits these statistics). Without labels ``"material"`` when
    top-1 agreement is below EPS_AGREEMENT (or, without class scores, the relative output
    change is above EPS_REL_DIFF), else None."""
    if accuracy is not None and other_accuracy is not None:
        if other_accuracy - accuracy > EPS_ACCURACY:
            return "better"
        if (
            other_accuracy >= accuracy
            and loss is not None
            and other_loss is not None
            and other_loss < (1.0 - EPS_LOSS) * loss
        ):
            return "better"
        return None
    if agreement is not None:
        return "material" if agreement < EPS_AGREEMENT else None
    return "material" if rel_diff > EPS_REL_DIFF else None

"""The conversion and convention checks on planted per-channel arrays (no model): the
Theil-Sen fit against closed-form lines, each conversion of running_var found with its slope,
healthy and stale statistics left alone, the momentum and eps rules at their thresholds
(docs/statistics.md, section 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnscope.ops.conventions import (
    EPS_CHANNELS,
    MAX_SLOPE_SE,
    MIN_CHANNELS,
    MOMENTUM_CONVENTION,
    SLOPES,
    ema_noise_factor,
    eps_outcome,
    eps_sensitive,
    fit_var_convention,
    gain_ratio,
    mean_scale,
    other_eps,
    slope_se,
    tf_momentum,
    theil_sen,
)

EPS = 1e-5


def population(channels: int = 32, seed: int = 0):
    """Per-channel population statistics of a layer whose variances span e^-3 .. e^3, with means
    of about one sigma (some negative)."""
    rng = np.random.default_rng(seed)
    var = np.exp(rng.permutation(np.linspace(-3.0, 3.0, channels)))
    mean = rng.normal(0.0, 1.0, channels) * np.sqrt(var) + 0.5 * np.sqrt(var)
    return mean, var


def noisy(values, sd: float, seed: int = 1):
    """``values`` times exp(N(0, sd^2)) per channel: EMA noise or staleness in log terms."""
    rng = np.random.default_rng(seed)
    return values * np.exp(rng.normal(0.0, sd, np.shape(values)))


# --------------------------------------------------------------------------------------------
# Theil-Sen


def test_theil_sen_recovers_a_line_through_outliers():
    x = np.linspace(-2, 2, 40)
    y = 2.0 * x + 1.0
    y[::5] = 50.0  # 20% anywhere: the median of pairwise slopes does not move
    slope, intercept = theil_sen(x, y)
    assert slope == pytest.approx(2.0, abs=1e-12) and intercept == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="distinct"):
        theil_sen([1.0, 1.0], [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# var-convention: each conversion planted exactly, then with noise


@pytest.mark.parametrize(
    ("conversion", "stored"),
    [
        ("std", lambda v: np.sqrt(v)),
        ("inverse-var", lambda v: 1.0 / v),
        ("inverse-std", lambda v: 1.0 / np.sqrt(v + EPS)),  # Caffe2's inv_std
    ],
)
def test_each_conversion_has_its_slope(conversion, stored):
    mean, var = population()
    fit = fit_var_convention(mean, stored(var), mean, var, EPS)
    assert fit is not None and fit.conversion == conversion
    assert fit.slope == pytest.approx(SLOPES[conversion], abs=1e-4)  # exact power laws
    assert fit.intercept == pytest.approx(0.0, abs=1e-3) and fit.scale is None
    assert fit.channels == 32
    # the same with EMA noise on the stored statistics (5% per channel) and a stale mean
    fit = fit_var_convention(noisy(mean, 0.1), noisy(stored(var), 0.05), mean, var, EPS)
    assert fit is not None and fit.conversion == conversion
    assert abs(fit.slope - SLOPES[conversion]) < 0.05


def test_caffe_scale_factor_is_found_from_both_statistics():
    mean, var = population()
    s = 999.98  # Caffe's scale_factor after long training with moving_average_fraction 0.999
    fit = fit_var_convention(s * mean, noisy(s * var, 0.05), mean, var, EPS)
    assert fit is not None and fit.conversion == "scale"
    assert fit.scale == pytest.approx(s, rel=0.05) and fit.mean_scale == pytest.approx(s)
    assert fit.slope == pytest.approx(1.0, abs=0.05)
    assert fit.intercept == pytest.approx(math.log(s), abs=0.05)
    # a scale below one is the same mistake the other way round
    fit = fit_var_convention(mean / 8, var / 8, mean, var, EPS)
    assert fit is not None and fit.conversion == "scale" and fit.scale == pytest.approx(1 / 8)


def test_healthy_and_stale_statistics_are_variances():
    mean, var = population()
    healthy = fit_var_convention(noisy(mean, 0.02), noisy(var, 0.05), mean, var, EPS)
    assert healthy is not None and healthy.conversion is None
    assert healthy.slope == pytest.approx(1.0, abs=0.05)
    # stale: every channel's variance off by its own factor (sd 0.4 in log: x0.67 .. x1.5)
    stale = fit_var_convention(noisy(mean, 0.3, 3), noisy(var, 0.4, 4), mean, var, EPS)
    assert stale is not None and stale.conversion is None
    assert abs(stale.slope - 1.0) < 0.3


def test_an_unwarmed_ema_is_compared_with_what_it_holds():
    """An EMA that still weighs its initial var 1 by w = (1-m)^T holds (1-w) var_pop + w and
    (1-w) mu_pop: correct statistics, whose log-log slope is flatter than 1."""
    mean, var = population()
    w = 0.3
    stored_mean, stored_var = (1 - w) * mean, (1 - w) * var + w
    fit = fit_var_convention(stored_mean, stored_var, mean, var, EPS, init_weight=w)
    assert fit is not None and fit.conversion is None
    assert fit.slope == pytest.approx(1.0, abs=1e-9) and fit.intercept == pytest.approx(0.0)
    assert fit_var_convention(stored_mean, stored_var, mean, var, EPS).slope < 0.7
    # a std stored by an unwarmed EMA's converter is still a std
    fit = fit_var_convention(stored_mean, np.sqrt(stored_var), mean, var, EPS, init_weight=w)
    assert fit is not None and fit.conversion == "std"


@pytest.mark.parametrize("c", [1.8, 3.0, 10.0])
def test_input_scaled_after_the_ema_is_no_scale_factor(c):
    """A layer input scaled by c after the EMA: means off by c, variances by c^2 (the planted
    stale layer of tests/ops/test_dynamic.py): one common offset in the variances, but the
    means disagree, so this is staleness, not Caffe's scale factor."""
    mean, var = population()
    fit = fit_var_convention(mean / c, var / c**2, mean, var, EPS)
    assert fit is not None and fit.conversion is None
    assert fit.intercept == pytest.approx(-2 * math.log(c), abs=1e-6)


def test_scale_needs_the_means_to_agree():
    mean, var = population()
    assert fit_var_convention(mean, var * 1000, mean, var, EPS).conversion is None  # var only
    zero_means = np.zeros_like(mean)  # means that say nothing: no scale finding either
    assert fit_var_convention(zero_means, var * 1000, zero_means, var, EPS).conversion is None
    assert mean_scale(zero_means, zero_means, var) is None
    assert mean_scale(-3 * mean, mean, var + EPS) is None  # a negative factor is no scale


def test_layers_that_cannot_be_judged_give_no_fit():
    mean, var = population(channels=MIN_CHANNELS - 1)
    assert fit_var_convention(mean, np.sqrt(var), mean, var, EPS) is None  # too few channels
    mean, _ = population()
    alike = np.exp(np.linspace(-0.15, 0.15, 32))  # sd of log var 0.09 < MIN_LOG_SPREAD
    assert fit_var_convention(mean, np.sqrt(alike), mean, alike, EPS) is None
    tiny = np.full(32, 5 * EPS)  # every channel at eps's scale: none is usable
    assert fit_var_convention(mean, np.sqrt(tiny), mean, tiny, EPS) is None


def test_narrow_spread_is_judged_when_the_slope_is_precise():
    """Variances within a factor 2 (sd of log var 0.24): an exact conversion still has a
    precise slope; statistics that scatter 20% around it do not (standard error 0.24 / 0.24 /
    sqrt(32) = 0.18 > MAX_SLOPE_SE), and then nothing is said."""
    mean, _ = population()
    narrow = np.exp(np.linspace(-0.4, 0.4, 32))
    fit = fit_var_convention(mean, np.sqrt(narrow), mean, narrow, EPS)
    assert fit is not None and fit.conversion == "std"
    assert slope_se(np.log(narrow), 0.5 * np.log(narrow), 0.5, 0.0) == 0.0
    scattered = noisy(np.sqrt(narrow), 0.2)
    x, y = np.log(narrow), np.log(scattered)
    b, a = theil_sen(x, y)
    assert slope_se(x, y, b, a) > MAX_SLOPE_SE
    assert fit_var_convention(mean, scattered, mean, narrow, EPS) is None


def test_slope_se_closed_form():
    """Residuals +-r alternating (median absolute deviation r) over x with sd s, n points:
    1.4826 r / (s sqrt(n))."""
    x = np.linspace(-1.0, 1.0, 16)
    r = 0.1 * np.where(np.arange(16) % 2 == 0, 1.0, -1.0)
    expected = 1.4826 * 0.1 / (np.std(x) * 4.0)
    assert slope_se(x, 2 * x + 1 + r, 2.0, 1.0) == pytest.approx(expected, rel=1e-12)
    assert slope_se(np.ones(5), np.ones(5), 1.0, 0.0) == math.inf


def test_unusable_channels_are_left_out():
    mean, var = population()
    stored = np.sqrt(var)
    stored[:3] = [np.nan, 0.0, -1.0]  # non-finite and non-positive running_var
    fit = fit_var_convention(mean, stored, mean, var, EPS)
    assert fit is not None and fit.conversion == "std" and fit.channels == 29


def test_a_slope_between_conversions_is_no_conversion():
    mean, var = population()
    fit = fit_var_convention(mean, var**0.75, mean, var, EPS)  # halfway between 1/2 and 1
    assert fit is not None and fit.conversion is None
    assert fit.slope == pytest.approx(0.75, abs=1e-4)


# --------------------------------------------------------------------------------------------
# momentum-convention


@pytest.mark.parametrize(
    ("momentum", "meant"),
    [(0.9, 0.1), (0.99, 0.01), (0.997, 0.003), (0.999, 0.001), (MOMENTUM_CONVENTION, 0.5)],
)
def test_tf_momenta_are_flagged_with_one_minus_m(momentum, meant):
    assert tf_momentum(momentum) == pytest.approx(meant, abs=1e-12)


@pytest.mark.parametrize("momentum", [None, 0.1, 0.01, 0.03, 0.003, 0.3, 0.49, 1.0, 0.0,
                                      float("nan")])  # fmt: skip
def test_pytorch_momenta_are_not_flagged(momentum):
    assert tf_momentum(momentum) is None


def test_ema_noise_factor():
    assert ema_noise_factor(0.9) == pytest.approx(0.9 / 1.1)  # 0.82 of one batch's variance
    assert ema_noise_factor(0.1) == pytest.approx(0.1 / 1.9)


# --------------------------------------------------------------------------------------------
# eps-mismatch


def test_other_eps_swaps_the_two_conventions():
    assert other_eps(1e-5) == 1e-3 and other_eps(1.001e-5) == 1e-3 and other_eps(0.0) == 1e-3
    assert other_eps(1e-3) == 1e-5 and other_eps(1e-4) == 1e-5 and other_eps(0.1) == 1e-5


def test_gain_ratio_closed_form():
    ratio = gain_ratio([0.0, 1e-3, 1.0, -1.0], 1e-5, 1e-3)
    expected = [10.0, math.sqrt(2e-3 / 1.01e-3), math.sqrt(1.001 / 1.00001), 10.0]
    assert ratio == pytest.approx(expected, rel=1e-12)
    assert gain_ratio([1e-3], 1e-3, 1e-5) == pytest.approx(gain_ratio([1e-3], 1e-5, 1e-3))


def test_eps_sensitive_thresholds():
    big = [1.0] * 100
    assert eps_sensitive(gain_ratio(big, 1e-5, 1e-3)) == (False, 0)
    small = [1e-3] * 4 + big[:96]  # 4% of the channels: not enough
    assert eps_sensitive(gain_ratio(small, 1e-5, 1e-3)) == (False, 4)
    small = [1e-3] * 5 + big[:95]  # 5%
    assert EPS_CHANNELS == 0.05 and eps_sensitive(gain_ratio(small, 1e-5, 1e-3)) == (True, 5)
    # the 1% gain boundary: var ~ 0.049 for 1e-5 vs 1e-3
    assert eps_sensitive(gain_ratio([0.045], 1e-5, 1e-3))[0]
    assert not eps_sensitive(gain_ratio([0.055], 1e-5, 1e-3))[0]
    assert eps_sensitive([]) == (False, 0)


def test_eps_outcome():
    # labels: clearly better accuracy, or better loss without losing accuracy
    assert eps_outcome(0.80, 1.0, 0.95, 0.3, 0.8, 0.5) == "better"
    assert eps_outcome(0.90, 1.0, 0.90, 0.85, 0.99, 0.1) == "better"
    assert eps_outcome(0.90, 1.0, 0.90, 0.95, 0.99, 0.1) is None  # 5% lower loss: not clearly
    assert eps_outcome(0.95, 0.3, 0.80, 1.0, 0.8, 0.5) is None  # the model's eps is the right one
    assert eps_outcome(0.95, 0.3, 0.94, 0.1, 0.98, 0.2) is None  # lower accuracy
    # no labels: material when more than 1% of the predictions change
    assert eps_outcome(None, None, None, None, 0.985, 0.3) == "material"
    assert eps_outcome(None, None, None, None, 0.995, 0.3) is None
    assert eps_outcome(None, None, None, None, None, 0.06) == "material"  # no class scores
    assert eps_outcome(None, None, None, None, None, 0.04) is None


def test_simulated_stale_layers_are_never_called_converted():
    """Healthy and stale layers of many shapes (8 to 64 channels, log-variance spreads 0.15 to
    1.2, per-channel log noise 0.02 to 0.6 on the stored variances and 0.02 to 0.6 sigma on the
    means, every other one with its input rescaled by a random c after the EMA): no conversion,
    ever (a seeded run: the same draws every time). The same layers with sqrt(running_var)
    and little noise are all found."""
    rng = np.random.default_rng(0)
    flagged, missed = [], []
    for n in (8, 16, 64):
        for spread in (0.15, 0.6, 1.2):
            for noise in (0.02, 0.3, 0.6):
                for case in range(12):
                    x = rng.normal(rng.uniform(-2, 2), spread, n)
                    var = np.exp(x)
                    mean = rng.normal(0, 1, n) * np.sqrt(var)
                    c = math.exp(rng.normal(0, 0.5)) if case % 2 else 1.0
                    stored = var * c**2 * np.exp(rng.normal(0, noise, n))
                    stored_mean = mean * c + rng.normal(0, noise, n) * np.sqrt(var)
                    fit = fit_var_convention(stored_mean, stored, mean, var, EPS)
                    if fit is not None and fit.conversion is not None:
                        flagged.append((n, spread, noise, case, fit))
                    if spread >= 0.6 and noise == 0.02:
                        std = np.sqrt(var) * np.exp(rng.normal(0, noise, n))
                        fit = fit_var_convention(mean, std, mean, var, EPS)
                        if fit is None or fit.conversion != "std":
                            missed.append((n, spread, case, fit))
    assert not flagged, flagged
    assert not missed, missed

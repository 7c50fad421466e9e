"""The finding catalog: the wording (message and fix) of every finding, and of every verdict.

Operations measure and decide; they pass the facts (layer names, figures, the thresholds they
applied) to the functions here and get :class:`~bnscope.records.Finding` objects or verdict
lines back. Nothing else in bnscope words a finding, so every text can be read, reviewed and
changed in one place. The rules that raise each code are in ``docs/statistics.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .extras import InspectVerdict
from .fmt import num, pct, percent
from .records import Finding, Severity

# --------------------------------------------------------------------------------------------
# Static findings (buffers alone)


def no_batchnorm() -> Finding:
    return Finding(
        code="no-batchnorm",
        severity=Severity.WARNING,
        layer=None,
        message="no BatchNorm layer found (no *.running_mean / *.running_var buffers)",
        fix=(
            "nothing to fix; check that this is the checkpoint you meant "
            "(or pass --key to pick another entry)"
        ),
    )


def non_finite(layer: str, nonfinite_values: int, negative_var_channels: int, fix: str) -> Finding:
    parts = []
    if nonfinite_values:
        parts.append(f"{nonfinite_values} NaN/Inf values")
    if negative_var_channels:
        parts.append(f"{negative_var_channels} negative running_var channels")
    return Finding(
        code="non-finite",
        severity=Severity.ERROR,
        layer=layer,
        message=f"{' and '.join(parts)} in BN buffers or parameters",
        fix=(
            f"{fix} (if weight/bias are non-finite, training diverged: go back to an earlier "
            "checkpoint)"
        ),
    )


def never_updated(layer: str, num_batches_tracked: int | None, fix: str) -> Finding:
    count = "num_batches_tracked = 0" if num_batches_tracked == 0 else "no num_batches_tracked"
    return Finding(
        code="never-updated",
        severity=Severity.ERROR,
        layer=layer,
        message=(
            f"running stats are still the initial mean 0 / var 1 ({count}): "
            "eval() normalizes with values this layer never saw"
        ),
        fix=fix,
    )


def ema_warmup(
    layer: str, updates: int, init_weight: float, momentum: float | None, assumed: bool, fix: str
) -> Finding:
    note = ", PyTorch's default, assumed" if assumed else ""
    return Finding(
        code="ema-warmup",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            f"EMA has only {updates} updates: (1-m)^n = {init_weight:.3g} of the running stats is "
            f"still the initial mean 0 / var 1 (momentum {momentum}{note})"
        ),
        fix=fix,
    )


def tiny_variance(
    layer: str, channels: int, num_features: int, var_min: float, gain_max: float | None, fix: str
) -> Finding:
    gain = "n/a" if gain_max is None else f"{gain_max:.3g}"
    return Finding(
        code="tiny-variance",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            f"{channels} of {num_features} channels have running_var near zero (min {var_min:.3g}; "
            f"max gain |gamma|/sqrt(var+eps) = {gain}): eval() amplifies them"
        ),
        fix=f"{fix}; if it persists, the channel is constant on the data",
    )


def dead_channel(layer: str, channels: int, num_features: int, threshold: float) -> Finding:
    return Finding(
        code="dead-channel",
        severity=Severity.INFO,
        layer=layer,
        message=f"{channels} of {num_features} channels have |gamma| < {threshold:g}: switched off",
        fix=(
            "prune these channels, or exclude BN weights from weight decay if they were not meant "
            "to die"
        ),
    )


# --------------------------------------------------------------------------------------------
# Layer usage (every operation that runs the model)

#: what to do about a layer that never ran, per operation
NOT_CALLED_FIX = {
    "precise": "check the forward: the layer is defined but unused, or the data skips its branch",
    "adapt": "the layer never ran on the target data: its source statistics were kept",
    "inspect": "check the forward: a layer defined but unused keeps statistics nobody updates",
}


def not_called(layer: str, operation: str) -> Finding:
    return Finding(
        code="not-called",
        severity=Severity.WARNING,
        layer=layer,
        message="the layer never ran on the data: its running statistics were kept as they are",
        fix=NOT_CALLED_FIX[operation],
    )


def reused(layer: str, calls_per_forward: int) -> Finding:
    return Finding(
        code="reused",
        severity=Severity.INFO,
        layer=layer,
        message=(
            f"called {calls_per_forward} times per forward: every call's input is pooled into one "
            "set of statistics shared by all those uses"
        ),
        fix="give each use its own BatchNorm module if the inputs differ in distribution",
    )


def non_iid_labels(
    batch_size: float,
    effective_size: float,
    batches: int,
    classes: int,
    single_class: int,
    p_value: float,
) -> Finding:
    """Labelled batches mix classes far less than random batches would (docs/statistics.md,
    section 2.8): ``effective_size`` independent samples would vary as much as a batch of
    ``batch_size``."""
    single = (
        f"; {single_class} of {batches} batches hold a single class" if single_class else ""
    )
    return Finding(
        code="non-iid-batches",
        severity=Severity.WARNING,
        layer=None,
        message=(
            f"the labelled batches are far from i.i.d.: the class mix of a batch of "
            f"{batch_size:.3g} samples varies like that of {effective_size:.3g} independent "
            f"samples (chi-square over {batches} batches x {classes} classes, p = "
            f"{p_value:.2g}){single}: BN statistics gathered from them are those of the model "
            "fed such batches, not of i.i.d. ones"
        ),
        fix=(
            "shuffle the data and run again: bnscope.load_data and the commands read image "
            "folders and tensor files shuffled; a DataLoader or data factory must shuffle "
            "itself (DataLoader(..., shuffle=True))"
        ),
    )


# --------------------------------------------------------------------------------------------
# Adaptive BN


def domain_shift(
    layer: str,
    kl_median: float,
    kl_max: float,
    d_mu_median: float,
    d_var_median: float,
    frozen_kept: bool,
) -> Finding:
    return Finding(
        code="domain-shift",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            f"target statistics differ from the source: median symmetric KL {kl_median:.3g} (max "
            f"{kl_max:.3g}), median |d_mu| {d_mu_median:.3g}, median |log var ratio| "
            f"{d_var_median:.3g}"
        ),
        fix=(
            "adapt this frozen layer too with include_frozen=True"
            if frozen_kept
            else "use the adapted statistics on this domain (bnscope adapt writes them); keep the "
            "source checkpoint for source-domain data"
        ),
    )


# --------------------------------------------------------------------------------------------
# Dynamic inspect


def precise_effect(
    accuracy_running: float | None,
    accuracy_precise: float | None,
    agreement_precise: float | None,
) -> str:
    """The fix of stale statistics, with what bnscope precise would change on this data."""
    if accuracy_running is not None and accuracy_precise is not None:
        return (
            f"bnscope precise CKPT --data TRAIN_DATA would change accuracy from "
            f"{pct(accuracy_running)} to {pct(accuracy_precise)} on this data"
        )
    tail = (
        f" (it would change {pct(1 - agreement_precise)} of the predictions on this data)"
        if agreement_precise
        else ""
    )
    return f"bnscope precise CKPT --data TRAIN_DATA recomputes exact statistics{tail}"


def precise_frozen_fix() -> str:
    """The fix by bnscope precise of frozen layers' statistics: it keeps them by default."""
    return (
        "bnscope precise CKPT --data TRAIN_DATA --include-frozen recomputes exact statistics "
        "for them (frozen BN layers keep their stored statistics without --include-frozen)"
    )


def stale_ema(
    layer: str,
    d_mu_median: float,
    d_var_median: float,
    z: float,
    momentum: float | None,
    fix: str,
) -> Finding:
    return Finding(
        code="stale-ema",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            f"running statistics are {d_mu_median:.3g} sigma (median d_mu; d_var "
            f"{d_var_median:.3g}) from the population statistics of this model, {z:.1f}x the "
            f"noise an EMA with momentum {momentum} would have: they describe an earlier state "
            "of the model"
        ),
        fix=fix,
    )


def noisy_ema(
    layer: str, d_mu_median: float, d_var_median: float, momentum: float | None
) -> Finding:
    return Finding(
        code="small-nbs",
        severity=Severity.INFO,
        layer=layer,
        message=(
            f"running statistics are {d_mu_median:.3g} sigma (median d_mu; d_var "
            f"{d_var_median:.3g}) from the population statistics, about what the EMA's noise at "
            f"this batch size and momentum {momentum} explains"
        ),
        fix=(
            "bnscope precise averages over all the data instead of the last ~2/m batches; or train "
            "with a lower momentum or larger normalization batches"
        ),
    )


def train_test_gap(
    kind: str,
    stale: bool,
    agreement: float | None,
    accuracy: dict[str, float | None],
    precise_fix: str,
    converted: bool = False,
) -> Finding:
    """``kind`` is ``"worse"`` (eval mode loses against batch statistics) or ``"better"``;
    ``accuracy`` has the accuracies with running, batch and precise statistics; ``stale``
    whether some layer is stale, ``converted`` whether some layer's running_var is in another
    convention (var-convention)."""
    what = ""
    if accuracy.get("running") is not None:
        what = (
            f"accuracy with batch statistics {pct(accuracy['batch'])}, with running statistics "
            f"{pct(accuracy['running'])}, with precise statistics {pct(accuracy['precise'])}; "
        )
    if kind == "better":
        severity = Severity.INFO
        cause = (
            "eval mode is the better one: batch statistics at this batch size are noisy, so "
            "train-mode metrics understate the model"
        )
        fix = "nothing to fix for evaluation; bnscope ghost shows the NBS curve"
    elif stale or converted:
        severity = Severity.WARNING
        cause = " and ".join(
            (["running statistics in another convention (see var-convention)"] if converted
             else []) + (["stale running statistics (see stale-ema)"] if stale else [])
        )  # fmt: skip
        fix = precise_fix
    else:
        severity = Severity.WARNING
        cause = (
            "the running statistics are not stale, so batch statistics at this batch size "
            "differ from the population's"
        )
        fix = (
            "compare normalization batch sizes with bnscope ghost; check that training batches "
            "are i.i.d. (shuffled)"
        )
    return Finding(
        code="train-test-gap",
        severity=severity,
        layer=None,
        message=(
            f"outputs with batch statistics and with running statistics disagree ({what}top-1 "
            f"agreement {pct(agreement)}): {cause}"
        ),
        fix=fix,
    )


def inspect_verdict(
    verdict: InspectVerdict,
    stale: Sequence[str],
    noisy: Sequence[str],
    analysed: int,
    accuracy: dict[str, float | None],
    agreement: Mapping[str, float | None],
    frozen_converted: bool = False,
) -> str:
    """The first line of the dynamic report, for ``verdict`` stale, gap, noisy or healthy
    (``stale`` lists the stale layers not explained by a ``var-convention``: none when every
    stale layer is a converted one, which :func:`converted_verdict` has named;
    ``frozen_converted`` whether a converted layer is a frozen one, which bnscope precise
    re-estimates only with --include-frozen); ``accuracy`` and ``agreement`` (with running
    statistics) per variant: ``running``, ``precise`` and ``batch``."""
    if accuracy.get("running") is not None:
        figures = (
            f" Accuracy on this data: running statistics {pct(accuracy['running'])}, precise "
            f"statistics {pct(accuracy['precise'])}, batch statistics {pct(accuracy['batch'])}."
        )
    else:
        figures = (
            f" Top-1 agreement of running-statistics outputs with batch statistics "
            f"{pct(agreement['batch'])}, with precise statistics {pct(agreement['precise'])}."
        )
    if verdict == "stale" and not stale:  # every stale layer is explained by a conversion
        run = "bnscope precise --include-frozen" if frozen_converted else "bnscope precise"
        return (
            f"Run {run}, or undo the conversion, so that eval mode normalizes with "
            f"this data's statistics.{figures}"
        )
    if verdict == "stale":
        names = ", ".join(stale[:4]) + (", ..." if len(stale) > 4 else "")
        return (
            f"Stale running statistics: {len(stale)} of {analysed} BN layers ({names}) are "
            "further from this model's population statistics than EMA noise explains; run "
            f"bnscope precise.{figures}"
        )
    if verdict == "gap":
        return (
            "Train/test gap without stale statistics: batch statistics at this batch size "
            f"differ from the population's; see bnscope ghost.{figures}"
        )
    if verdict == "noisy":
        return (
            f"Running statistics are noisy ({len(noisy)} layers differ from the population by "
            f"about the EMA's own noise); bnscope precise removes that noise.{figures}"
        )
    return f"Running statistics match this model's population statistics within EMA noise.{figures}"


# --------------------------------------------------------------------------------------------
# Ghost batches


def small_nbs(
    layer: str | None,
    size: int,
    at_batch_size: bool,
    accuracy: float | None,
    population_accuracy: float | None,
    agreement: float | None,
    target: int | None,
) -> Finding:
    """Batch statistics of ``size`` samples or fewer stray from population statistics;
    ``target`` is the smallest larger size within tolerance (None when there is none)."""
    if accuracy is not None and population_accuracy is not None:
        what = (
            f"accuracy {pct(accuracy)} with batch statistics of {size} samples vs "
            f"{pct(population_accuracy)} with population statistics"
        )
    else:
        what = (
            f"outputs with batch statistics of {size} samples agree with population statistics "
            f"on {pct(agreement)}"
        )
    where = " (the data's batch size)" if at_batch_size else ""
    fix = (
        f"normalize over at least {target} samples while training "
        f"(bnscope.nn.GhostBatchNorm(ghost_size={target}), a larger per-device batch, or "
        "SyncBatchNorm)"
        if target
        else "normalize over more samples while training (a larger per-device batch or "
        "SyncBatchNorm)"
    ) + "; evaluate with population statistics (bnscope precise)"
    return Finding(
        code="small-nbs",
        severity=Severity.WARNING if at_batch_size else Severity.INFO,
        layer=layer,
        message=f"normalization batches of {size} or fewer samples are too noisy{where}: {what}",
        fix=fix,
    )


def non_iid_batches(layer: str, size: int, effective_size: float) -> Finding:
    ratio = effective_size / size
    return Finding(
        code="non-iid-batches",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            f"chunks of {size} samples vary like {effective_size:.1f} independent samples "
            f"({100 * ratio:.0f}% of {size}): samples in a batch are correlated"
        ),
        fix=(
            "shuffle the training data so every batch mixes samples from across the dataset (the "
            "sampler), or normalize over larger batches drawn across groups"
        ),
    )


def ghost_verdict(
    noisy_up_to: int | None,
    smallest: int | None,
    fine_from: int | None,
    agreement_threshold: float,
    accuracy_drop: float,
) -> str:
    """The first line of the ghost report: ``noisy_up_to`` is the largest size whose outputs
    stray (None: none does), ``smallest`` the smallest size analysed (None: no size could be
    analysed), ``fine_from`` the smallest larger size within tolerance."""
    if smallest is None:
        return "No size could be analysed."
    if noisy_up_to is None:
        return (
            "Batch statistics reproduce population-statistics outputs at every size down to "
            f"g={smallest}."
        )
    tail = f"; g={fine_from} and above are within tolerance" if fine_from is not None else ""
    return (
        f"Batch statistics of {noisy_up_to} or fewer samples change this model's outputs "
        f"(agreement below {percent(agreement_threshold)} or accuracy down more than "
        f"{100 * accuracy_drop:.0f} points){tail}."
    )


# --------------------------------------------------------------------------------------------
# Frozen BN output (precise with freeze=True; docs/statistics.md, section 3.2)

#: a layer record's reason: a layer that never ran, written frozen
FROZEN_NOT_CALLED_REASON = "never ran on the data; frozen with its stored statistics"
#: added to a skipped layer's reason (it has no running statistics)
FROZEN_SKIPPED_NOTE = "no running statistics to freeze: written as it was"


def not_called_frozen(layer: str) -> Finding:
    """``not-called`` when the checkpoint is written frozen: the layer is frozen with
    statistics nobody recomputed."""
    return Finding(
        code="not-called",
        severity=Severity.WARNING,
        layer=layer,
        message=(
            "the layer never ran on the data: it was frozen with its stored running "
            "statistics, which were not recomputed"
        ),
        fix=(
            "check the forward (the layer is defined but unused, or the data skips its "
            "branch); its frozen statistics stay what training left"
        ),
    )


# --------------------------------------------------------------------------------------------
# Information leakage within a batch (bnscope leakage; docs/statistics.md, section 10)

#: accuracy with grouped batches this far (absolute) from the i.i.d. one is worth a sentence
LEAK_ACCURACY_NOTE = 0.02


def batch_leakage(
    group_by: str,
    layer: str | None,
    *,
    metric: str,
    change: float,
    noise: float,
    ratio: float,
    flips: float | None,
    noise_flips: float | None,
    accuracy: float | None,
    iid_accuracy: float | None,
    spread_ratio: float | None,
) -> Finding:
    """Batches grouped by ``group_by`` change the train-mode outputs ``ratio`` times more than
    another i.i.d. arrangement of the same samples does (``change`` against ``noise``, the
    mean per-sample ``metric``: ``kl`` or ``l2``); ``flips`` and ``noise_flips`` are the
    fractions of top-1 predictions that change (None without class scores); ``layer`` is the
    layer whose batch means carry the groups most: their variance is ``spread_ratio`` times
    that of i.i.d. batches."""
    what = "symmetric KL" if metric == "kl" else "relative L2 change"
    parts = [
        f"batches grouped by {group_by} change the model's train-mode outputs "
        f"{num(ratio, 3)}x more than re-shuffled i.i.d. batches of the same samples do (mean "
        f"per-sample {what} {num(change)} vs {num(noise)})"
    ]
    if flips is not None and noise_flips is not None:
        parts.append(f"{pct(flips)} of top-1 predictions change (i.i.d.: {pct(noise_flips)})")
    if accuracy is not None and iid_accuracy is not None:
        parts.append(f"accuracy {pct(accuracy)} vs {pct(iid_accuracy)} with i.i.d. batches")
    message = "; ".join(parts)
    if accuracy is not None and iid_accuracy is not None:
        if accuracy - iid_accuracy > LEAK_ACCURACY_NOTE:
            message += (
                ": the statistics of grouped batches tell each sample about its group, so "
                "train-mode metrics on such batches overstate the model"
            )
        elif iid_accuracy - accuracy > LEAK_ACCURACY_NOTE:
            message += (
                ": normalizing with one group's statistics removes what tells the groups apart"
            )
    if layer is not None and spread_ratio is not None:
        message += (
            f" (the batch means of {layer} vary {num(spread_ratio, 3)}x as much as in i.i.d. "
            "batches)"
        )
    return Finding(
        code="batch-leakage",
        severity=Severity.WARNING,
        layer=layer,
        message=message,
        fix=(
            f"train with batches that mix {group_by}s (a shuffling sampler across groups): a "
            "model trained on grouped batches can read the group from the batch statistics "
            "and loses it in eval mode; where batches must be grouped, normalize without "
            "batch statistics (GroupNorm, frozen BN) or over samples drawn across groups "
            "(SyncBatchNorm, shuffled BN)"
        ),
    )


def leakage_verdict(
    verdict: str,
    leaked: Sequence[tuple[str, float | None]],
    clean: Sequence[tuple[str, float | None]],
    *,
    ratio_threshold: float,
    excess_threshold: float,
    batch_size: int,
    batches: int,
    min_batches: int,
) -> str:
    """The first line of the leakage report: ``verdict`` ``leak``, ``none`` or
    ``independent``; ``leaked`` and ``clean`` the groupings (name, ratio) that did and did not
    meet the rule; ``batches`` per arrangement, ``min_batches`` needed to judge."""
    if verdict == "independent":
        return (
            "Train-mode outputs do not depend on which samples share a batch (no sample's "
            "output changes between arrangements: no BN layer normalizes with batch "
            "statistics): nothing can leak between samples."
        )

    def named(rows: Sequence[tuple[str, float | None]]) -> str:
        return ", ".join(f"{name} ({num(ratio, 3)}x)" for name, ratio in rows)

    if verdict == "leak":
        tail = f"; grouping by {named(clean)} does not" if clean else ""
        return (
            f"Batch statistics leak information between samples: batches of {batch_size} "
            f"grouped by {named(leaked)} change train-mode outputs beyond i.i.d. noise{tail}."
        )
    if batches < min_batches:
        return (
            f"Not judged: {batches} batches of {batch_size} per arrangement, fewer than the "
            f"{min_batches} a reliable i.i.d. noise floor needs (grouped by {named(clean)} of "
            "it); use more samples or smaller batches."
        )
    return (
        f"No leakage found: batches of {batch_size} grouped by {named(clean)} change "
        "train-mode outputs about as much as re-shuffled i.i.d. batches do (the ratio shown; "
        f"a leak needs {num(ratio_threshold)}x and {percent(excess_threshold)} more changed "
        "predictions)."
    )


# --------------------------------------------------------------------------------------------
# Separate statistics per domain (adapt with several target domains)


def in_domain(finding: Finding, domain: str) -> Finding:
    """A finding of one domain's adaptation, its message led by the domain's name (the
    multi-domain report lists every domain's findings in one list)."""
    return Finding(
        code=finding.code,
        severity=finding.severity,
        layer=finding.layer,
        message=f"domain {domain}: {finding.message}",
        fix=finding.fix,
    )


def domain_divergence(layer: str, a: str, b: str, kl_median: float, threshold: float) -> Finding:
    return Finding(
        code="domain-divergence",
        severity=Severity.INFO,
        layer=layer,
        message=(
            f"domains {a} and {b} need different statistics here: median symmetric KL "
            f"{kl_median:.3g} between their statistics (above {threshold:g})"
        ),
        fix=(
            "keep one set of statistics per domain: the per-domain checkpoints bnscope adapt "
            "writes, or one model with bnscope.nn.SplitBatchNorm layers (bnscope adapt --split "
            "writes its checkpoint)"
        ),
    )


# --------------------------------------------------------------------------------------------
# Conversion and convention checks (docs/statistics.md, section 11): momentum-convention,
# var-convention, eps-mismatch


def momentum_convention(
    layer: str,
    momentum: float,
    meant: float,
    operation: str,
    measured: tuple[float, float, int] | None = None,
) -> Finding:
    """A momentum that looks like TF/Keras's (the weight of the old value). ``operation`` is
    static, inspect, precise or adapt (what the fix says); ``measured`` (dynamic inspect) is
    (the running means' distance from the population, a single batch's, both in sigma and RMS
    over channels, and over how many layers of this momentum their medians were taken)."""
    factor = momentum / (2.0 - momentum)
    message = (
        f"momentum {momentum:g} keeps only {pct(1 - momentum, 0)} of the EMA's past: it looks "
        f"like TF/Keras's momentum (decay) {momentum:g}, which is PyTorch's {meant:g}; such an "
        f"EMA is about as noisy as one batch (variance m/(2-m) = {factor:.2f} of a single "
        "batch's)"
    )
    if measured is not None:
        gap, spread, count = measured
        where = "" if count == 1 else f"; medians over the {count} layers with this momentum"
        figures = (
            f"{gap:.3g} sigma vs a single batch's {spread:.3g} sigma (RMS over channels{where})"
        )
        if gap >= 0.5 * spread:
            message += (
                "; measured: the running means are as far from the population as one batch's: "
                + figures
            )
        else:
            message += (
                f"; measured: the running means are closer to the population than one batch's "
                f"(recomputed since?): {figures}"
            )
    if operation == "precise":
        fix = (
            f"set momentum={meant:g} on this layer in the model code before training on: the "
            "statistics written now are exact, more training with this momentum makes them "
            "one batch's again"
        )
    elif operation == "adapt":
        fix = (
            f"set momentum={meant:g} on this layer in the model code if the model is trained "
            "further (the adapted statistics written now do not depend on it)"
        )
    else:
        fix = (
            f"set momentum={meant:g} on this layer in the model code, then recompute the "
            "statistics: bnscope precise"
        )
    return Finding(
        code="momentum-convention",
        severity=Severity.WARNING,
        layer=layer,
        message=message,
        fix=fix,
    )


#: what each conversion of var-convention stored in running_var, and how to undo it
VAR_CONVERSIONS = {
    "std": ("standard deviations", "running_var = running_var ** 2"),
    "inverse-var": ("inverse variances", "running_var = 1 / running_var"),
    "inverse-std": ("inverse standard deviations (Caffe2's inv_std)",
                    "running_var = running_var ** -2"),  # fmt: skip
}


def var_convention(
    layer: str,
    conversion: str,
    slope: float,
    offset: float,
    scale: float | None,
    count: int,
    fitted: int,
    precise_fix: str,
) -> Finding:
    """running_var holds another quantity than the variance (``conversion``: std, inverse-var,
    inverse-std) or the statistics need a scale factor (``scale``: s = exp(``offset``)).
    ``slope``, ``offset`` and ``scale`` are medians over the ``count`` layers with this
    conversion, of ``fitted`` layers the fit could judge; ``precise_fix`` says what bnscope
    precise would change."""
    where = (
        "in this layer"
        if count == 1
        else f"in {count} of the {fitted} BN layers the fit could judge"
    )
    median = "" if count == 1 else "median over them; "
    if conversion == "scale":
        s = scale if scale is not None else float("nan")
        message = (
            f"running_mean and running_var are both s = {s:.6g} times the population "
            f"statistics {where} (Caffe's scale_factor not divided out): log running_var "
            f"against log var_pop has slope {slope:.2f} and offset log s = {offset:.2f}"
            f"{f' ({median[:-2]})' if median else ''}, and the running means carry the same "
            "factor; eval mode normalizes with the wrong statistics"
        )
        undo = f"running_mean /= {s:.6g}; running_var /= {s:.6g}"
    else:
        what, undo = VAR_CONVERSIONS[conversion]
        message = (
            f"running_var holds {what}, not variances, {where}: log running_var against log "
            f"var_pop has slope {slope:.2f} ({median}1 for variances, "
            f"{conversion_slope(conversion)} for {what.split(' (')[0]}); eval mode normalizes with "
            "the wrong scale"
        )
    return Finding(
        code="var-convention",
        severity=Severity.ERROR,
        layer=layer,
        message=message,
        fix=f"{precise_fix}; or convert the checkpoint's buffers: {undo}",
    )


def conversion_slope(conversion: str) -> str:
    """The slope of log running_var on log var_pop that a conversion gives, as text."""
    return {"std": "1/2", "inverse-var": "-1", "inverse-std": "-1/2"}[conversion]


def eps_mismatch(
    outcome: str,
    eps: float,
    other: float,
    layers: int,
    channels: int,
    max_gain_ratio: float,
    running: Mapping[str, float | None],
    variant: Mapping[str, float | None],
) -> Finding:
    """The model's eps against the other convention's (``other``) on the same batches with
    running statistics: ``outcome`` ``"better"`` (labels: the other eps is clearly better,
    a warning) or ``"material"`` (no labels: the predictions change, info). ``running`` and
    ``variant`` have ``accuracy`` and ``loss`` (the variant also ``agreement``, ``kl`` and
    ``rel_diff`` against running)."""
    where = (
        f"{channels} channels in {layers} BN layer{'s' if layers != 1 else ''} have variances "
        f"small against eps (gain 1/sqrt(var+eps) changes up to {max_gain_ratio:.3g}x)"
    )
    agreement = variant.get("agreement")
    changed = (
        f"{pct(1 - agreement)} of the top-1 predictions change"
        if agreement is not None
        else f"the outputs change by {pct(variant.get('rel_diff'))} (relative L2)"
    )
    if outcome == "better":
        return Finding(
            code="eps-mismatch",
            severity=Severity.WARNING,
            layer=None,
            message=(
                f"eps {eps:g} does not fit these statistics: with eps {other:g} instead, "
                f"accuracy goes from {pct(running.get('accuracy'))} to "
                f"{pct(variant.get('accuracy'))} and loss from {_loss(running)} to "
                f"{_loss(variant)} on this data ({changed}); {where}"
            ),
            fix=(
                f"set eps={other:g} on the BN layers in the model code: the checkpoint was "
                f"trained with it ({_framework(other)})"
            ),
        )
    return Finding(
        code="eps-mismatch",
        severity=Severity.INFO,
        layer=None,
        message=(
            f"eps matters for this model: with eps {other:g} instead of {eps:g}, {changed} on "
            f"this data; {where}"
        ),
        fix=(
            "eps must be the one the checkpoint was trained with (PyTorch 1e-5, TF/Keras 1e-3): "
            "check the framework it came from; with labelled data bnscope inspect tells which "
            "fits"
        ),
    )


def _loss(metrics: Mapping[str, float | None]) -> str:
    loss = metrics.get("loss")
    return "n/a" if loss is None else f"{loss:.3g}"


def _framework(eps: float) -> str:
    return "TF/Keras's default 1e-3" if eps >= 1e-4 else "PyTorch's default 1e-5"


def converted_verdict(conversions: Mapping[str, int], fitted: int) -> str:
    """The sentence the dynamic inspect verdict starts with when some layers hold running_var
    in another convention: ``conversions`` counts the layers of each (std, inverse-var,
    inverse-std, scale), of ``fitted`` layers the fit could judge."""
    what = {
        "std": "running_var holds standard deviations",
        "inverse-var": "running_var holds inverse variances",
        "inverse-std": "running_var holds inverse standard deviations",
        "scale": "both running statistics carry a scale factor",
    }
    parts = [f"{what.get(k, k)} in {n} of {fitted}" for k, n in conversions.items()]
    return (
        f"Converted checkpoint: {'; '.join(parts)} BN layer{'s' if fitted != 1 else ''} the "
        "fit could judge (var-convention). "
    )

"""``bnscope adapt``: Adaptive BN (population statistics on target-domain data)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..session import DEFAULT_ONLINE_PRIOR
from . import options as o
from .app import BnscopeCommand, app
from .inputs import JobFlags, open_job
from .runtime import (
    Ui,
    begin_output,
    check_fail_on,
    emit_report,
    exit_code_for,
    finish,
    progress_bar,
    project_config,
    report_folder,
)

HELP = (
    "Re-estimate BN statistics on unlabeled target-domain --data (Adaptive BN) and write "
    "CKPT.adapted.pt; report where in the network the domain differs.\n\n"
    "--prior N mixes in the source statistics as N pseudo samples (Schneider et al. 2020). "
    "--only and --first-layers adapt part of the statistics. "
    "--eval-data (labelled target data) compares source statistics, adapted statistics, "
    "test-time batch statistics and test-batch statistics mixed with the source statistics "
    "(--online-prior; bnscope.nn.PriorBatchNorm ships it); --online-priors sweeps that N.\n\n"
    "--domain NAME=SPEC, repeated, adapts to several target domains separately: one "
    "checkpoint per domain (CKPT.adapted.NAME.pt; --split also writes CKPT.adapted.split.pt for "
    "a model with bnscope.nn.SplitBatchNorm layers) and a comparison of the domains, layer by "
    "layer.\n\n"
    "Under torchrun each rank reads its share of --data and the ranks pool exact statistics; "
    "rank 0 writes the checkpoint.\n\n"
    "Example: bnscope adapt runs/ckpt.pt --model model.py:make_model --data corrupted/train "
    "--eval-data corrupted/val"
)


@app.command("adapt", help=HELP, cls=BnscopeCommand)
def adapt_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    domain: Annotated[
        list[str] | None,
        typer.Option(
            "--domain",
            metavar="DOMAIN",
            help="A target domain as NAME=SPEC (or SPEC, named after its folder or file), "
            "instead of --data; repeat it for several. Each domain is adapted separately and "
            "written to CKPT.adapted.NAME.pt (-o PATH: NAME goes before PATH's suffix); the "
            "report compares the domains layer by layer (domain_divergence.png). NAME: "
            "letters, digits, _ and -.",
            rich_help_panel=o.P_DATA,
        ),
    ] = None,
    eval_data: o.EvalData = None,
    prior: Annotated[
        float,
        typer.Option(
            "--prior",
            metavar="N",
            help="Pseudo sample count N of the source statistics (lambda = N/(N+n), n = target "
            "samples); 0 = pure target statistics.",
            min=0.0,
        ),
    ] = 0.0,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            metavar="STAT",
            help="Adapt only the means (mean) or only the variances (var); the other statistic "
            "keeps its source values. Default: both.",
            autocompletion=o.complete_from("mean", "var"),
        ),
    ] = None,
    first_layers: Annotated[
        int | None,
        typer.Option(
            "--first-layers",
            metavar="K",
            help="Adapt only the first K BN layers in module order (the report's #); the "
            "others keep their source statistics and are reported as kept.",
        ),
    ] = None,
    online_prior: Annotated[
        float,
        typer.Option(
            "--online-prior",
            metavar="N",
            help="With --eval-data: also evaluate test-time adaptation, each test batch's "
            "statistics mixed with the source statistics as N pseudo samples (lambda = "
            "N/(N+n), n = the batch's samples; 0 = test-batch statistics, inf = source), "
            "reported as the prior column.",
        ),
    ] = DEFAULT_ONLINE_PRIOR,
    online_priors: Annotated[
        str | None,
        typer.Option(
            "--online-priors",
            metavar="LIST",
            help="With --eval-data: a sweep of test-time priors N, comma-separated (e.g. "
            "0,16,64,256; inf allowed): accuracy, agreement and loss against N in a table and "
            "online_priors.png.",
        ),
    ] = None,
    batch_size: o.BatchSize = None,
    batches: o.Batches = None,
    workers: o.Workers = None,
    drop_last: o.DropLast = None,
    skip_unreadable: o.SkipUnreadable = None,
    input_key: o.InputKey = None,
    call: o.CallSpec = None,
    image_size: o.ImageSize = None,
    resize: o.Resize = None,
    channels: o.Channels = None,
    mean: o.Mean = None,
    std: o.Std = None,
    device: o.Device = None,
    amp: o.Amp = None,
    channels_last: o.ChannelsLast = False,
    include_frozen: o.IncludeFrozen = False,
    seed: o.Seed = 0,
    output: o.Output = None,
    split: Annotated[
        bool,
        typer.Option(
            "--split",
            help="With --domain: also write CKPT.adapted.split.pt, every domain's statistics for "
            "the model converted by bnscope.nn.convert_to_split_bn (running_mean and "
            "running_var of shape [domains, C], in the order of the --domain options).",
            rich_help_panel=o.P_OUT,
        ),
    ] = False,
    force: o.Force = False,
    report_dir: o.ReportDir = None,
    out: o.OutAlias = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    report_dir = report_folder(ui, report_dir, out, force=force, output=output)
    level = check_fail_on(fail_on)
    flags = JobFlags(
        key=key, trust=trust_checkpoint, model=model, model_kwargs=model_kwargs,
        eval_data=eval_data, batch_size=batch_size, workers=workers, input_key=input_key,
        call=call, image_size=image_size, resize=resize, channels=channels, mean=mean, std=std,
        seed=seed, drop_last=drop_last, skip_unreadable=skip_unreadable, device=device, amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    # --data (the target) and --eval-data are taken literally: the project file's describe the
    # source domain. Its data stays the job's data (the source training data, not read): its
    # class folders name the model's classes for --eval-data.
    if domain:
        _check_domain_flags(data, eval_data, online_priors)
    elif split:
        raise UsageError("--split writes one checkpoint for several domains", "add --domain")
    job = open_job(ui, project_config(), checkpoint, flags, literal=("eval_data",))
    if domain:
        with progress_bar(ui, "collecting target statistics", None) as progress:
            domains = job.adapt_domains(
                domain, prior=prior, batches=batches, output=output, force=force, split=split,
                include_frozen=include_frozen, only=only, first_layers=first_layers,
                progress=progress,
            )  # fmt: skip
        if begin_output():
            domains.save()
            emit_report(ui, domains.report, report_dir, force=force)
        finish(exit_code_for(domains.report, level))
        return
    with progress_bar(ui, "collecting target statistics", batches) as progress:
        result = job.adapt(
            data, prior=prior, batches=batches, eval_data=eval_data, output=output, force=force,
            include_frozen=include_frozen, only=only, first_layers=first_layers,
            online_prior=online_prior, online_priors=online_priors, progress=progress,
        )  # fmt: skip
    if begin_output():  # rank 0 writes and shows, once every rank got here
        result.save()
        emit_report(ui, result.report, report_dir, force=force)
    finish(exit_code_for(result.report, level))


def _check_domain_flags(data: str | None, eval_data: str | None, online_priors: str | None) -> None:
    """--domain replaces --data, and evaluates nothing (one adapted model per domain)."""
    if data is not None:
        raise UsageError(
            "--data and --domain both name the target data",
            "give every target domain as --domain NAME=SPEC",
        )
    if eval_data is not None or online_priors is not None:
        flag = "--eval-data" if eval_data is not None else "--online-priors"
        raise UsageError(
            f"{flag} evaluates one adapted model, and --domain adapts one per domain",
            "run bnscope adapt --data SPEC --eval-data SPEC on the domain to evaluate",
        )

"""Whole jobs on a checkpoint file, exactly as the commands do them: ``bnscope.open``.

A :class:`Job` is bound to one checkpoint and one :class:`Options` (the model, the data and
how to run, resolved once). It loads the checkpoint, builds and fills the model and opens the
data when an operation first needs them, runs :meth:`Job.inspect`, :meth:`Job.precise`,
:meth:`Job.adapt` or :meth:`Job.ghost` with the commands' defaults, and returns a
:class:`Result` whose :meth:`~Result.save` writes the structure-preserving checkpoint the CLI
writes. ``bnscope.write_report(result.report, folder)`` (:mod:`bnscope.render`) writes the same
report.json, figures and report.html as ``--report-dir``. The CLI is a thin layer over this
module: it resolves flags and the project file into :class:`Options`, calls a job, and renders.

Nothing here prints: notices (an EMA copy left unused, samples left out of the last batch) go
to ``notify`` and status lines to ``info`` (both default to nothing; the CLI passes its
stderr writers). Messages name the library's parameters (``data=``, ``key=``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from .extras import StaticExtra
    from .io.checkpoint import Checkpoint
    from .io.config import ProjectConfig
    from .io.data import DataSource
    from .io.images import ImageOptions
    from .records import Report

Notify = Callable[[str], None]
Progress = Callable[[int, "int | None"], None]

#: file-name tags of written checkpoints: ``ckpt.precise.pt``, ``ckpt.adapted.pt``
OUTPUT_TAGS = {"precise": "precise", "adapt": "adapted"}
#: the tag of a checkpoint written for a frozen-BN model (``precise`` with ``freeze=True``):
#: ``ckpt.frozen.pt``
FROZEN_TAG = "frozen"
#: the model spec reported for a trusted whole module loaded from the checkpoint
WHOLE_MODULE = "(whole module from the checkpoint)"
#: adapt's test-time prior N of the ``prior`` evaluation variant (PriorBatchNorm): with the
#: batches of 32 of bnscope's data specs, lambda = 16/48 = 1/3 of the source statistics
DEFAULT_ONLINE_PRIOR = 16.0


@dataclass(frozen=True)
class Options:
    """Every option of a job, resolved once (the CLI: flags over the project file over these
    defaults, which are the commands' defaults).

    ``model`` is a spec (``pkg.module:factory``, ``file.py:factory``) or a built
    ``nn.Module``; ``data``/``eval_data`` a spec (image folder, tensor file, factory) or any
    iterable of batches (a ``DataLoader``); ``call`` a spec or a function ``call(model,
    batch)``. ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``amp`` None, ``bf16``
    or ``fp16``. ``skip_unreadable``: an image that cannot be decoded is left out (one notice
    names them) instead of stopping the job with an error (:func:`bnscope.io.data.load_data`).
    ``project_file`` is reported as where the values came from."""

    key: str | None = None
    trust: bool = False
    model: Any = None
    model_kwargs: str | dict[str, Any] | None = None
    data: Any = None
    eval_data: Any = None
    batch_size: int = 32
    workers: int = 0
    input_key: str | None = None
    call: Any = None
    image_size: int | None = None
    resize: int | None = None
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = 0
    drop_last: bool = False
    skip_unreadable: bool = False
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    project_file: Path | None = None

    def image(self) -> ImageOptions:
        from .io.images import ImageOptions

        defaults = ImageOptions()
        return ImageOptions(
            image_size=self.image_size,
            resize=self.resize,
            channels=self.channels,
            mean=self.mean or defaults.mean,
            std=self.std or defaults.std,
        )


#: options a project file may not set: they are chosen per invocation
NOT_IN_PROJECT_FILE = frozenset({"trust", "seed", "device", "project_file"})


def resolve_options(
    config: ProjectConfig, given: Mapping[str, Any], *, literal: Iterable[str] = ()
) -> Options:
    """The one place where given values (the command line's flags), the project file and the
    defaults meet: each option is its given value when not None, else the project file's,
    else the default of :class:`Options`; switches (``trust``, ``channels_last``) are on
    when given or (``channels_last`` only) set in the file. Options in ``literal`` ignore the
    project file (``adapt``: the file's ``data`` is the source training data, not the
    target). ``project_file`` records where values came from: it is reported."""
    defaults = Options()
    skip = NOT_IN_PROJECT_FILE | set(literal)
    values: dict[str, Any] = {}
    for option in fields(Options):
        name = option.name
        if name == "project_file":
            continue
        value = given.get(name)
        if name in ("trust", "channels_last"):
            values[name] = bool(value) or (name not in skip and bool(config.get(name, False)))
            continue
        if value is None and name not in skip:
            value = config.get(name)
        values[name] = getattr(defaults, name) if value is None else value
    for name in ("mean", "std"):
        values[name] = parse_floats(values[name], name)
    return Options(**values, project_file=config.path)


@dataclass
class LoadedModel:
    """The model with the checkpoint's weights loaded, the key prefix stripped from them, and
    the spec it came from (for the report)."""

    module: nn.Module
    prefix: str
    spec: str | None


@dataclass
class Result:
    """What an operation returns: its :class:`~bnscope.records.Report` (the ``--json``
    document; ``bnscope.write_report(result, folder)`` writes it as ``--report-dir`` does)
    and, for precise and adapt, the new BN buffers, which :meth:`save` writes into a copy of
    the checkpoint (same structure and format). ``frozen``: the key prefixes of the BN layers
    :meth:`save` writes in the frozen-BN layout (``precise`` with ``freeze=True``)."""

    report: Report
    job: Job
    updates: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None  # where save() writes by default
    force: bool = False
    frozen: tuple[str, ...] = ()

    def save(self, path: str | Path | None = None, *, force: bool | None = None) -> Path:
        """Write the checkpoint with the new statistics, as ``bnscope precise``/``adapt``
        write it: atomically, never over the input, an existing file only with ``force=True``
        (default: the job's). Default path: the one the operation was given, else next to the
        input with ``.precise``/``.adapted`` (``.frozen`` for ``precise(freeze=True)``) before
        the suffix. The report's ``output`` is updated. A frozen result writes its BN layers
        in the layout of a frozen BN layer (see :meth:`Job.precise`)."""
        from .io.saving import save_checkpoint

        if self.report.command not in OUTPUT_TAGS:
            raise UsageError(
                f"a {self.report.command} result has no checkpoint to save",
                "bnscope.write_report(result, folder) writes its report",
            )
        target = Path(path) if path is not None else self.output
        if target is None:
            raise UsageError(
                "this job has no checkpoint file to write next to", "pass path= to save()"
            )
        ckpt = self.job.checkpoint
        # an old checkpoint without num_batches_tracked keeps having none (torch fills it in)
        updates = {
            k: v
            for k, v in self.updates.items()
            if k in ckpt.state_dict or not k.endswith("num_batches_tracked")
        }
        written = save_checkpoint(
            ckpt, updates, target, force=self.force if force is None else force,
            freeze=self.frozen,
        )  # fmt: skip
        self.report = replace(self.report, extra={**self.report.extra, "output": str(written)})
        return written


@dataclass
class DomainsResult:
    """What :meth:`Job.adapt_domains` returns: its :class:`~bnscope.records.Report` and each
    domain's new BN buffers (``updates``: domain -> checkpoint key -> tensor), which
    :meth:`save` writes as one checkpoint per domain (``outputs``) and, when asked for, one
    split checkpoint (``split_updates`` at ``split_output``)."""

    report: Report
    job: Job
    updates: dict[str, dict[str, Any]]
    outputs: dict[str, Path] = field(default_factory=dict)
    split_updates: dict[str, Any] | None = None
    split_output: Path | None = None
    force: bool = False

    def save(self, *, force: bool | None = None) -> list[Path]:
        """Write every domain's checkpoint (and the split checkpoint), as ``bnscope adapt
        --domain`` writes them: each structure-preserving, never over the input, existing
        files only with ``force=True`` (default: the job's), and all or none (every file is
        checked and written before any is put in place). The report's ``domains`` entries get
        their ``output``, and ``split_output`` is set. Returns the paths written."""
        from .io.saving import save_checkpoints

        if not self.outputs:
            raise UsageError(
                "this job has no checkpoint file to write next to", "adapt a job on a checkpoint"
            )
        ckpt = self.job.checkpoint
        jobs: list[tuple[dict[str, Any], Path]] = [
            (_known_tracked(self.updates[name], ckpt.state_dict), path)
            for name, path in self.outputs.items()
        ]
        if self.split_updates is not None and self.split_output is not None:
            jobs.append((_known_tracked(self.split_updates, ckpt.state_dict), self.split_output))
        written = save_checkpoints(
            ckpt, jobs, force=self.force if force is None else force,
            reshape=self.split_updates is not None,
        )  # fmt: skip
        extra = dict(self.report.extra)
        extra["domains"] = [
            {**entry, "output": str(self.outputs[entry["name"]])} for entry in extra["domains"]
        ]
        if self.split_output is not None:
            extra["split_output"] = str(self.split_output)
        self.report = replace(self.report, extra=extra)
        return written


def _known_tracked(updates: dict[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``updates`` without the ``num_batches_tracked`` entries a checkpoint does not have (an
    old checkpoint without them keeps having none; torch fills them in)."""
    return {
        k: v for k, v in updates.items() if k in state_dict or not k.endswith("num_batches_tracked")
    }


class Job:
    """One checkpoint with its model and data (see the module docstring).

    ``checkpoint`` may be None for a job whose model is a live ``nn.Module`` (nothing to load
    or save)."""

    def __init__(
        self,
        checkpoint: str | Path | None,
        options: Options | None = None,
        *,
        notify: Notify | None = None,
        info: Notify | None = None,
    ) -> None:
        self.path = Path(checkpoint) if checkpoint is not None else None
        self.options = options or Options()
        self.notify: Notify = notify or (lambda message: None)
        self.info: Notify = info or (lambda message: None)
        self._checkpoint: Checkpoint | None = None
        self._model: LoadedModel | None = None
        self._model_built = False
        self._run: dict[str, Any] | None = None
        self._device: tuple[str, str | None] | None = None

    # -- inputs ---------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        """The loaded checkpoint (loaded on first use)."""
        if self._checkpoint is None:
            from .io.checkpoint import load_checkpoint

            if self.path is None:
                raise UsageError("this job has no checkpoint", "pass checkpoint= to bnscope.open")
            if self.options.trust:
                self._model_folder_importable()
            self._checkpoint = load_checkpoint(
                self.path, key=self.options.key, trust=self.options.trust
            )
        return self._checkpoint

    def _model_folder_importable(self) -> None:
        """A ``file.py:factory`` model spec's folder goes on ``sys.path`` before a trusted
        checkpoint is unpickled: a whole module saved from that folder imports its code (a
        ``model.py`` next to the factory) from there."""
        spec = self.options.model
        if not isinstance(spec, str):
            return
        from .io.modelspec import add_to_sys_path, split_spec

        parts = split_spec(spec)
        if parts is not None and parts[0].endswith(".py") and Path(parts[0]).is_file():
            add_to_sys_path(Path(parts[0]).resolve().parent)

    def check_run(self) -> tuple[str, str | None]:
        """``device`` and ``amp`` resolved and checked (before anything is loaded): a device
        that does not exist or an autocast dtype it cannot run is one error up front."""
        if self._device is None:
            from .engine.runner import amp_spec, device_spec

            device = device_spec(self.options.device)
            self._device = (device, amp_spec(self.options.amp, device))
        return self._device

    def run_options(self) -> dict[str, Any]:
        """``device``, ``amp``, ``channels_last``, ``call`` and ``input_key`` for the engine,
        checked once (before anything is loaded)."""
        if self._run is None:
            device, amp = self.check_run()
            self._run = {
                "device": device,
                "amp": amp,
                "channels_last": bool(self.options.channels_last),
                "call": self._call(),
                "input_key": self.options.input_key,
            }
        return self._run

    def _call(self) -> Any:
        call = self.options.call
        if call is None or callable(call):
            return call
        from .io.modelspec import resolve_spec

        fn = resolve_spec(str(call), UsageError, "call")
        if not callable(fn):
            raise UsageError(
                f"call={call} is a {type(fn).__name__}, not a function",
                "point call= at a function call(model, batch) that returns the model's output",
            )
        return fn

    def model(self) -> LoadedModel | None:
        """The model filled with the checkpoint's weights (strict), or None without model
        code (no ``model`` and no trusted whole module in the checkpoint). A checkpoint with
        several networks: the one the model fits (an EMA/SWA copy before the raw weights of
        the same architecture), with a notice about the network left unused."""
        if self._model_built:
            return self._model
        from torch import nn

        from .io.fitting import load_into_model
        from .io.modelspec import build_model

        spec, kwargs = self.options.model, self.options.model_kwargs
        if isinstance(spec, nn.Module):
            if kwargs:
                raise UsageError("model_kwargs= given with a built model", "drop model_kwargs=")
            prefix = ""
            if self.path is not None:
                prefix = load_into_model(spec, self.checkpoint.state_dict, key=self.checkpoint.key)
                self._notice_ema(prefix)
            self._model = LoadedModel(spec, prefix, type(spec).__name__)
        elif spec is None:
            ckpt = self.checkpoint
            if kwargs:
                raise UsageError("model_kwargs= given without model=", "add model=SPEC")
            if ckpt.format == "module" and ckpt.module is not None:
                self._model = LoadedModel(ckpt.module, "", WHOLE_MODULE)
            else:
                self._model = None
        else:
            ckpt = self.checkpoint
            if ckpt.format == "torchscript":
                raise UsageError(
                    "a TorchScript archive cannot be loaded into a model= (its weights are "
                    "inspected statically)",
                    "drop model=, or save the model's state_dict() and use that",
                )
            module = build_model(str(spec), kwargs)
            prefix = load_into_model(module, ckpt.state_dict, key=ckpt.key)
            self._notice_ema(prefix)
            self._model = LoadedModel(module, prefix, str(spec))
        self._model_built = True
        return self._model

    def _notice_ema(self, prefix: str) -> None:
        notice = self.checkpoint.ema_notice(prefix)
        if notice:
            self.notify(notice)

    def _require_model(self, operation: str) -> LoadedModel:
        loaded = self.model()
        if loaded is None:
            raise UsageError(
                f"{operation} runs the model: it needs model=pkg.module:factory or "
                "file.py:factory",
                "pass model= (or set model in bnscope.toml)",
            )
        return loaded

    def source(
        self,
        data: Any,
        role: str = "data",
        *,
        shard: bool = True,
        shuffle: bool = True,
        classes: Sequence[str] | None = None,
        keys: Sequence[str] = (),
    ) -> DataSource:
        """``data`` (a spec or an iterable of batches) as a :class:`~bnscope.io.data.DataSource`:
        built-in specs are read shuffled (seeded by ``seed``: batch statistics need i.i.d.
        batches) and in the same order on every reading; under ``torchrun`` each rank gets its
        share when ``shard``. A last batch of 1 sample is left out (BatchNorm cannot normalize
        it), every incomplete one with ``drop_last``; either is announced, and so are class
        folders named like dataset splits. ``classes``: the model's class names, which the
        class folders of an image folder are matched to by name. ``role`` names the option in
        messages (``data``, ``eval_data``). ``keys``: per-sample entries of tensor files to
        carry into the batches (group ids, :meth:`leakage`)."""
        from .engine.distributed import get_rank, get_world_size, is_initialized
        from .io.data import DataSource, load_data

        if data is None:
            raise UsageError(f"{role}= is required here", f"pass {role}=SPEC")
        if not isinstance(data, (str, Path)):
            return DataSource(data, f"{type(data).__name__} object", "iterable", None, None)
        o = self.options
        rank, world_size = (get_rank(), get_world_size()) if shard and is_initialized() else (0, 1)
        source = load_data(
            str(data),
            batch_size=o.batch_size,
            workers=o.workers,
            image=o.image(),
            shuffle=shuffle,
            seed=o.seed,
            drop_last=o.drop_last,
            skip_unreadable=o.skip_unreadable,
            drop_single=True,  # a last batch of 1 sample: BatchNorm cannot normalize it
            rank=rank,
            world_size=world_size,
            same_order=True,  # inspect and ghost read it twice, inspect pairs the passes
            classes=classes,
            keys=keys,
        )
        self._notice_dropped(source, role, rank, world_size)
        if source.split_folders:
            names = ", ".join(source.split_folders)
            self.notify(
                f"{role}={data} has class folders named like dataset splits ({names}): each "
                f"is read as one class of images; point {role}= at one split, e.g. "
                f"{Path(str(data)) / source.split_folders[0]}"
            )
        if world_size > 1 and source.kind == "factory" and not _factory_shards(str(data)):
            self.notify(
                f"{role}={data} does not take rank and world_size, so each of the {world_size} "
                "ranks reads all of its batches (statistics stay exact; the work is repeated)"
            )
        return source

    def _notice_dropped(self, source: DataSource, role: str, rank: int, world_size: int) -> None:
        from .io.data import DROP_SINGLE

        if source.kind == "factory":
            if self.options.drop_last:
                self.notify(
                    f"drop_last=True does not apply to {role}= {source.description}: a data "
                    "factory batches itself (let its DataLoader drop the incomplete last batch)"
                )
            return
        if not source.dropped_samples:
            return
        total = (source.num_samples or 0) + source.dropped_samples
        where = f" on rank {rank} of {world_size}" if world_size > 1 else ""
        size = self.options.batch_size
        if source.dropped_reason == DROP_SINGLE:
            self.notify(
                f"{role}=: left out the last batch of 1 sample{where} ({total} samples in "
                f"batches of {size}): BatchNorm cannot normalize a single sample with batch "
                "statistics (a batch_size= that leaves no batch of 1 uses every sample)"
            )
        else:
            count = source.dropped_samples
            self.info(
                f"{role}=: drop_last=True left out the incomplete last batch of {count} "
                f"sample{'s' if count != 1 else ''}{where} ({total} samples in batches of "
                f"{size})"
            )

    def class_names(self) -> list[str] | None:
        """The model's class names when the checkpoint carries them (see
        :attr:`bnscope.io.checkpoint.Checkpoint.class_names`), else None."""
        if self.path is None:
            return None
        return self.checkpoint.class_names

    def _eval_classes(self, train: DataSource | None = None) -> list[str] | None:
        """The class names ``eval_data``'s class folders are matched to: the checkpoint's,
        else those of the training data: ``train`` (precise's ``data``) or the job's
        ``data`` (adapt: the source training data) when it is a labelled image folder."""
        names = self.class_names()
        if names is not None:
            return names
        if train is not None:
            return train.classes
        spec = self.options.data
        if isinstance(spec, (str, Path)):
            from .io.images import folder_classes

            return folder_classes(spec)
        return None

    def _notice_labels(self, source: DataSource, role: str, has_labels: bool, hint: str) -> bool:
        """A labelled image folder whose class folders were not matched by name and that the
        model does not output one class score per folder for: its labels were set aside (see
        :func:`bnscope.engine.evaluate.batch_kind`). Announced; True when it was."""
        if has_labels or source.classes is None or source.matched:
            return False
        n = len(source.classes)
        self.notify(
            f"{role}=: the labels of its {n} class folders were not used (no accuracy or "
            f"loss): the model does not output {n} class scores and its class names are "
            "unknown, so folder i (in name order) need not be the model's class i; to use them, "
            f"store the class names in the checkpoint (a 'classes' list){hint}, or add an empty "
            "folder for each missing class"
        )
        return True

    def _notice_unreadable(self, source: DataSource | None, role: str) -> None:
        """Images left out because they could not be decoded (``skip_unreadable``): counted
        and named."""
        if source is None:
            return
        bad = source.unreadable()
        if not bad:
            return
        shown = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        s = "s" if len(bad) != 1 else ""
        self.notify(
            f"{role}=: left out {len(bad)} image{s} that could not be read: {shown}{more} "
            "(remove or replace them)"
        )

    def describe_run(self) -> str:
        """"cuda:0, bf16 autocast, channels-last" for status lines."""
        run = self.run_options()
        parts = [run["device"]]
        if run["amp"]:
            parts.append(f"{run['amp']} autocast")
        if run["channels_last"]:
            parts.append("channels-last")
        return ", ".join(parts)

    def base_extra(self, loaded: LoadedModel, source: DataSource | None) -> dict[str, Any]:
        """The report keys every model-running operation shares."""
        run = self.run_options()
        extra: dict[str, Any] = {}
        if self.path is not None:
            ckpt = self.checkpoint
            extra.update({"format": ckpt.format, "key": ckpt.key, "prefix": loaded.prefix})
            extra.update(ckpt.network_info(loaded.prefix))
        extra.update(
            {
                "model": loaded.spec,
                "project_file": str(self.options.project_file)
                if self.options.project_file
                else None,
            }
        )
        if source is not None:
            extra.update(
                {
                    "data": source.description,
                    "dropped_samples": source.dropped_samples,
                    "dropped_reason": source.dropped_reason,
                }
            )
        extra.update(
            {"device": run["device"], "amp": run["amp"], "channels_last": run["channels_last"]}
        )
        return extra

    def _run_extra(self, loaded: LoadedModel, source: DataSource, result: Report) -> dict[str, Any]:
        """:meth:`base_extra` and the operation's own keys; its ``metrics`` (measured on
        ``source``) get the data's description, as precise and adapt give theirs."""
        extra: dict[str, Any] = {**self.base_extra(loaded, source), **result.extra}
        if "metrics" in extra:
            extra["metrics"] = {"data": source.description, **extra["metrics"]}
        return extra

    def _output(
        self, operation: str, output: str | Path | None, force: bool, tag: str | None = None
    ) -> Path | None:
        """Where precise/adapt write, checked before anything runs (nothing runs if it would
        be refused); ``tag`` replaces the operation's file-name tag."""
        from .io.saving import check_output, default_output_path

        if self.path is None:
            return Path(output) if output is not None else None
        out = Path(output) if output is not None else default_output_path(
            self.path, tag or OUTPUT_TAGS[operation]
        )
        if self.path.exists():
            check_output(self.path, out, force=force)
        return out

    def _checked_model(self, operation: str, include_frozen: bool | None) -> LoadedModel:
        import torch

        self.run_options()  # device, amp and call= are checked before anything is loaded
        torch.manual_seed(self.options.seed)
        loaded = self._require_model(operation)
        require_batchnorm(loaded.module, operation, include_frozen)
        return loaded

    def _report(self, result: Report, extra: dict[str, Any]) -> Report:
        from .records import Report

        return Report(
            command=result.command,
            checkpoint=str(self.path) if self.path is not None else None,
            layers=result.layers,
            findings=result.findings,
            extra=extra,
            arrays=result.arrays,
        )

    # -- operations -------------------------------------------------------------------------
    def _static(self) -> Report:
        """The static report: from the buffers (and the model's momentum and eps when there
        is model code); a checkpoint holding several networks is reported on the one the
        model fits, without a model on the EMA/SWA copy, with every network listed."""
        from .io.fitting import strip_prefix
        from .io.statedict import common_prefix
        from .ops.static import static_inspect

        ckpt = self.checkpoint
        loaded = self.model()
        extra: StaticExtra = {
            "format": ckpt.format,
            "key": ckpt.key,
            "prefix": loaded.prefix if loaded else "",
            "model": loaded.spec if loaded else None,
            "project_file": str(self.options.project_file) if self.options.project_file else None,
        }
        fix = recompute_fix(str(self.path), loaded.spec if loaded else None)
        if loaded is not None:
            extra.update(ckpt.network_info(loaded.prefix))
            return static_inspect(
                loaded.module, checkpoint=str(self.path), recompute_fix=fix, extra=extra
            )
        state = ckpt.state_dict
        chosen = ckpt.default_network()  # several networks: the EMA/SWA copy
        base = chosen.prefix if chosen is not None else ""
        if chosen is not None:
            state = ckpt.network_state(chosen)
        prefix = common_prefix(state.keys())
        extra["prefix"] = base + prefix
        extra.update(ckpt.network_info(base + prefix))
        self._notice_ema(base + prefix)
        state = strip_prefix(state, prefix) if prefix else state
        return static_inspect(state, checkpoint=str(self.path), recompute_fix=fix, extra=extra)

    def inspect(
        self,
        batches: int | None = None,
        *,
        static: bool = False,
        progress: Progress | None = None,
    ) -> Result:
        """The dynamic report (EMA staleness, train/test consistency, layer usage) when the
        job has model code and ``data``, else (or with ``static=True``) the static one."""
        if static or self.options.data is None:
            return Result(self._static(), self)
        self.run_options()
        import torch

        torch.manual_seed(self.options.seed)
        loaded = self.model()
        if loaded is None:
            return Result(self._static(), self)
        from .ops.inspect import inspect

        source = self.source(self.options.data, classes=self.class_names())
        self.info(f"dynamic inspection on {source.description} ({self.describe_run()})")
        result = inspect(
            loaded.module, source, batches, progress=progress,
            num_classes=_unmatched_classes(source), **self.run_options(),
        )  # fmt: skip
        self._notice_unreadable(source, "data")
        self._notice_labels(source, "data", result.extra["metrics"]["has_labels"], "")
        return Result(self._report(result, self._run_extra(loaded, source, result)), self)

    def precise(
        self,
        batches: int | None = None,
        *,
        output: str | Path | None = None,
        force: bool = False,
        include_frozen: bool = False,
        freeze: bool = False,
        progress: Progress | None = None,
    ) -> Result:
        """Precise BN on ``data`` (and, with ``eval_data``, accuracy and agreement before and
        after). ``output`` (default: ``CKPT.precise.pt`` next to the input) is checked first;
        :meth:`Result.save` writes it.

        ``freeze=True`` writes the checkpoint for a model whose BN layers are frozen
        (:class:`bnscope.nn.FrozenBatchNorm`, torchvision's ``FrozenBatchNorm2d``; Wu & Johnson
        2021: recompute exact statistics, then freeze them for fine-tuning). Default output:
        ``CKPT.frozen.pt``. Every BN layer with running statistics gets exactly a frozen
        layer's entries, ``weight``, ``bias``, ``running_mean``, ``running_var`` (its
        ``num_batches_tracked`` dropped; ``affine=False`` layers get weight ones and bias
        zeros): the recomputed statistics, or the stored ones of a layer that never ran on
        the data (``not-called``, worded so). Layers already frozen keep their statistics
        (unless ``include_frozen``) and lose a ``num_batches_tracked`` entry they do not
        hold; layers without running statistics (``track_running_stats=False``) are written
        as they were. Everything else of the checkpoint is kept, as without ``freeze``; a
        pickled whole module gets its layers replaced by :func:`bnscope.nn.freeze_bn`. The
        report's ``freeze`` says so. The job's model itself is not converted: its BN layers
        hold the new statistics (``bnscope.nn.freeze_bn(model)`` freezes it)."""
        from .engine.distributed import local_batchnorm
        from .engine.evaluate import evaluate_models
        from .ops.precise import precise_bn

        if self.options.data is None:
            raise UsageError("precise needs data= (the training data)", "pass data=SPEC")
        if freeze and self.path is None:
            raise UsageError(
                "freeze=True writes a checkpoint file, and this job has none",
                "freeze the model itself with bnscope.nn.freeze_bn(model) after precise",
            )
        self.run_options()
        out = self._output("precise", output, force, FROZEN_TAG if freeze else None)
        loaded = self._checked_model("precise", include_frozen)
        if freeze:
            require_freezable(loaded.module)
        source = self.source(self.options.data)
        evaluation = self._evaluation(reference=self._eval_classes(source))
        original = copy.deepcopy(loaded.module) if evaluation is not None else None
        self.info(f"Precise BN on {source.description} ({self.describe_run()})")
        result = precise_bn(
            loaded.module, source, batches, progress=progress, include_frozen=include_frozen,
            **self.run_options(),
        )  # fmt: skip
        extra: dict[str, Any] = {**self.base_extra(loaded, source), **result.extra}
        if evaluation is not None and original is not None:
            self.info(f"evaluating before/after on {evaluation.description}")
            models = {"running": original, "precise": loaded.module}
            with local_batchnorm(*models.values()):
                ev = evaluate_models(
                    models, evaluation,
                    num_classes=_unmatched_classes(evaluation), **self.run_options(),
                )  # fmt: skip
            extra["metrics"] = {"data": evaluation.description, **ev.to_dict()}
            self._notice_labels(
                evaluation, "eval_data", ev.has_labels,
                ", pass data= the training image folder with its class folders",
            )  # fmt: skip
        self._notice_unreadable(source, "data")
        self._notice_unreadable(evaluation, "eval_data")
        extra["output"] = str(out) if out is not None else None
        if self.path is not None:
            extra["freeze"] = freeze
        report = self._report(result, extra)
        frozen: tuple[str, ...] = ()
        if freeze:
            report = frozen_report(report)
            frozen = frozen_prefixes(loaded.module, report.layers, loaded.prefix)
        return Result(
            report, self, bn_updates(loaded.module, result.layers, loaded.prefix), out, force,
            frozen,
        )  # fmt: skip

    def _evaluation(
        self, eval_data: Any = None, *, reference: list[str] | None = None
    ) -> DataSource | None:
        spec = eval_data if eval_data is not None else self.options.eval_data
        if spec is None:
            return None
        # every rank evaluates all of it, so every rank computes the same metrics
        return self.source(spec, "eval_data", shard=False, classes=reference)

    def adapt(
        self,
        target: Any,
        *,
        prior: float = 0.0,
        batches: int | None = None,
        eval_data: Any = None,
        output: str | Path | None = None,
        force: bool = False,
        include_frozen: bool = False,
        only: str | None = None,
        first_layers: int | None = None,
        online_prior: float | None = DEFAULT_ONLINE_PRIOR,
        online_priors: str | Sequence[float] | None = None,
        progress: Progress | None = None,
    ) -> Result:
        """Adaptive BN on ``target`` (unlabeled target-domain data; the job's ``data`` is the
        source training data and is not used), mixed with the source statistics as ``prior``
        pseudo samples; ``only`` and ``first_layers`` adapt part of the statistics (see
        :func:`~bnscope.ops.adapt.adapt_bn`). ``eval_data`` (labelled target data) compares
        source statistics, adapted statistics, test-time batch statistics and, unless
        ``online_prior`` is None, test-batch statistics mixed with the source statistics by
        ``online_prior`` pseudo samples (:class:`bnscope.nn.PriorBatchNorm`, the variant
        ``prior``); ``online_priors`` (e.g. ``"0,16,64,256"``) adds a sweep over N, reported
        as the ``online_priors`` rows."""
        from .engine.distributed import local_batchnorm
        from .engine.evaluate import evaluate_models, prior_model
        from .ops.adapt import (
            adapt_bn,
            check_first_layers,
            check_online_prior,
            check_only,
            parse_priors,
        )

        if target is None:
            raise UsageError("adapt needs target= (unlabeled target-domain data)",
                             "pass target=SPEC")  # fmt: skip
        prior = float(prior)  # reported as a float, however given
        if prior < 0:
            raise UsageError(f"prior= must be >= 0, got {prior}", "e.g. prior=16")
        check_only(only)
        check_first_layers(first_layers)
        n_online = None if online_prior is None else check_online_prior(online_prior)
        sweep = parse_priors(online_priors)
        if sweep is not None and eval_data is None:
            raise UsageError(
                "online_priors= evaluates on labelled target data, and there is none",
                "pass eval_data= as well",
            )
        self.run_options()
        out = self._output("adapt", output, force)
        loaded = self._checked_model("adapt", include_frozen)
        source = self.source(target)
        evaluation = (
            self._evaluation(eval_data, reference=self._eval_classes())
            if eval_data is not None
            else None
        )
        original = copy.deepcopy(loaded.module) if evaluation is not None else None
        self.info(
            f"Adaptive BN on {source.description} (prior {prior:g}, {self.describe_run()})"
        )
        result = adapt_bn(
            loaded.module, source, prior, batches, progress=progress,
            include_frozen=include_frozen, only=only, first_layers=first_layers,
            **self.run_options(),
        )  # fmt: skip
        extra: dict[str, Any] = {**self.base_extra(loaded, source), **result.extra}
        if evaluation is not None and original is not None:
            self.info(f"evaluating on {evaluation.description}")
            models = {
                "running": original,  # the source statistics
                "adapted": loaded.module,
                "batch": copy.deepcopy(original),
            }
            if n_online is not None:  # PriorBatchNorm copies share the source's tensors
                models["prior"] = prior_model(original, n_online)
            swept = {f"online prior {n:g}": n for n in sweep or ()}
            models.update({key: prior_model(original, n) for key, n in swept.items()})
            with local_batchnorm(*models.values()):
                ev = evaluate_models(
                    models, evaluation, modes={"batch": "batch"},
                    num_classes=_unmatched_classes(evaluation), **self.run_options(),
                )  # fmt: skip
            evaluated = ev.to_dict()
            variants = dict(evaluated["variants"])  # the sweep's rows leave the variants
            if n_online is not None:
                extra["online_prior"] = n_online
            if sweep is not None:
                extra["online_priors"] = [
                    {"prior": n, **variants.pop(key)} for key, n in swept.items()
                ]
            extra["metrics"] = {
                "data": evaluation.description, **evaluated, "variants": variants
            }
            hint = (
                ", make the job's data the source training image folder (for bnscope adapt: "
                "data in the project file)"
            )
            if not ev.has_labels and not self._notice_labels(
                evaluation, "eval_data", False, hint
            ):
                self.notify(
                    f"{evaluation.description} has no usable labels: reporting agreement with "
                    "the source model instead of accuracy"
                )
        self._notice_unreadable(source, "data")
        self._notice_unreadable(evaluation, "eval_data")
        extra["output"] = str(out) if out is not None else None
        return Result(
            self._report(result, extra), self,
            bn_updates(loaded.module, result.layers, loaded.prefix), out, force,
        )  # fmt: skip

    def adapt_domains(
        self,
        domains: Mapping[str, Any] | Sequence[str],
        *,
        prior: float = 0.0,
        batches: int | None = None,
        output: str | Path | None = None,
        force: bool = False,
        split: bool = False,
        include_frozen: bool = False,
        only: str | None = None,
        first_layers: int | None = None,
        progress: Progress | None = None,
    ) -> DomainsResult:
        """Adaptive BN on several target domains, each separately (``domains``: name -> data
        spec or iterable of batches, or ``NAME=SPEC`` strings; see
        :func:`~bnscope.ops.domains.parse_domains`), with the options of :meth:`adapt`;
        see :func:`~bnscope.ops.domains.adapt_domains`. :meth:`DomainsResult.save` writes one
        checkpoint per domain, the domain's name before the suffix of ``output`` (default
        ``CKPT.adapted.pt``: ``CKPT.adapted.fog.pt``) and, with ``split=True``, the split
        checkpoint ``CKPT.adapted.split.pt`` for the model converted by
        :func:`bnscope.nn.convert_to_split_bn` (``running_mean``/``running_var`` of shape
        ``[domains, C]``, ``num_batches_tracked`` of shape ``[domains]``, domains in the order
        given; docs/statistics.md, section 4.3). Every output is checked before anything
        runs, and nothing is written when a domain fails."""
        from .errors import BnscopeError
        from .io.saving import default_output_path
        from .ops.adapt import check_first_layers, check_only
        from .ops.domains import adapt_domains, in_domain_error, parse_domains

        specs = parse_domains(domains)
        prior = float(prior)
        if prior < 0:
            raise UsageError(f"prior= must be >= 0, got {prior}", "e.g. prior=16")
        check_only(only)
        check_first_layers(first_layers)
        self.run_options()
        outputs: dict[str, Path] = {}
        split_out: Path | None = None
        if output is not None and Path(output).is_dir():
            raise UsageError(
                f"output={output} is a folder: with domains= it is the path each domain's name "
                "goes into, before the suffix",
                f"e.g. output={Path(output) / 'model.pt'} (writes model.NAME.pt)",
            )
        if self.path is not None:
            from .io.saving import check_output

            base = Path(output) if output is not None else default_output_path(
                self.path, OUTPUT_TAGS["adapt"]
            )
            outputs = {name: default_output_path(base, name) for name in specs}
            if split:
                split_out = default_output_path(base, "split")
            if self.path.exists():
                for out in [*outputs.values(), *([split_out] if split_out else [])]:
                    check_output(self.path, out, force=force)
        elif split:
            raise UsageError(
                "split=True writes a checkpoint, and this job has none", "drop split="
            )
        loaded = self._checked_model("adapt", include_frozen)
        if split:
            self._check_splittable(loaded, include_frozen)
        sources: dict[str, DataSource] = {}
        for name, spec in specs.items():
            try:
                sources[name] = self.source(spec, "domains")
            except BnscopeError as exc:
                raise in_domain_error(exc, name) from None
        described = ", ".join(f"{name} ({src.description})" for name, src in sources.items())
        self.info(
            f"Adaptive BN on {len(sources)} domains: {described} (prior {prior:g}, "
            f"{self.describe_run()})"
        )
        result = adapt_domains(
            loaded.module, sources, prior, batches, progress=progress,
            include_frozen=include_frozen, only=only, first_layers=first_layers,
            **self.run_options(),
        )  # fmt: skip
        extra: dict[str, Any] = {**self.base_extra(loaded, None), **result.extra}
        entries = []
        for entry in result.extra["domains"]:
            src = sources[entry["name"]]
            entries.append(
                {
                    **entry,
                    "data": src.description,
                    "dropped_samples": src.dropped_samples,
                    "dropped_reason": src.dropped_reason,
                    "output": None,
                }
            )
            self._notice_unreadable(src, "domains")
        extra["domains"] = entries
        extra["split_output"] = None
        report = self._report(result, extra)
        updates = {
            name: _domain_updates(loaded, report, name, updated_only=True) for name in specs
        }
        split_updates = _split_updates(loaded, report, list(specs)) if split else None
        return DomainsResult(
            report, self, updates, outputs, split_updates, split_out, force,
        )  # fmt: skip

    def _check_splittable(self, loaded: LoadedModel, include_frozen: bool) -> None:
        """``split=True`` needs every BN layer whose statistics adapt may write to be one that
        :func:`bnscope.nn.convert_to_split_bn` converts, and a checkpoint whose buffers may
        change shape: checked before anything runs."""
        from .engine.capture import is_batchnorm, is_frozen_batchnorm
        from .nn_split import splittable
        from .records import layer_label

        ckpt = self.checkpoint
        if ckpt.format != "torch" and ckpt.format != "safetensors":
            raise UsageError(
                f"split=True cannot write a {ckpt.format} checkpoint: its BN buffers keep their "
                "shapes",
                "save the model's state_dict() and adapt that checkpoint, or drop split=",
            )
        for name, module in loaded.module.named_modules():
            frozen = is_frozen_batchnorm(module)
            if frozen and not include_frozen:
                continue
            if not (is_batchnorm(module) or frozen):
                continue
            if getattr(module, "track_running_stats", True) is False:
                continue
            if not splittable(module):
                raise UsageError(
                    f"split=True: BN layer {layer_label(name)} ({type(module).__name__}) cannot "
                    "be converted to bnscope.nn.SplitBatchNorm (only BatchNorm1d/2d/3d and "
                    "SyncBatchNorm layers with their own forward can)",
                    "drop split= and use the per-domain checkpoints",
                )

    def ghost(
        self,
        sizes: Iterable[int] | str = (2, 4, 8, 16, 32),
        batches: int | None = None,
        *,
        progress: Progress | None = None,
    ) -> Result:
        """The normalization-batch-size analysis on ``data``."""
        from .ops.ghost import ghost_analysis, parse_sizes

        wanted = parse_sizes(sizes)
        if self.options.data is None:
            raise UsageError("ghost needs data= (batches to split into ghost batches)",
                             "pass data=SPEC")  # fmt: skip
        loaded = self._checked_model("ghost", None)
        source = self.source(self.options.data, classes=self.class_names())
        self.info(
            f"ghost-size analysis on {source.description} ({self.describe_run()}), sizes {wanted}"
        )
        result = ghost_analysis(
            loaded.module, source, wanted, batches, progress=progress,
            num_classes=_unmatched_classes(source), **self.run_options(),
        )  # fmt: skip
        self._notice_unreadable(source, "data")
        self._notice_labels(source, "data", result.extra["metrics"]["has_labels"], "")
        return Result(self._report(result, self._run_extra(loaded, source, result)), self)


    def leakage(
        self,
        group_by: Any = "label",
        samples: int | None = 2048,  # ops.leakage.DEFAULT_SAMPLES (imported lazily)
        *,
        batch_size: int | None = None,
        groups: Any = None,
        progress: Progress | None = None,
    ) -> Result:
        """The leakage analysis on ``data`` (:func:`bnscope.leakage_analysis`): its first
        ``samples`` samples (None: all of it) in i.i.d. batches and in batches grouped by each
        of ``group_by`` (``"label"``, a key of the batches or of a tensor file, a function,
        or a comma-separated list), all of ``batch_size`` samples (default: the data's batch
        size, ``batch_size`` of the job for image folders and tensor files). ``seed`` (the
        job's) fixes the data order and the arrangements."""
        from .ops.leakage import leakage_analysis, parse_group_by

        specs = parse_group_by(group_by)
        if self.options.data is None:
            raise UsageError("leakage needs data= (the samples to put into batches)",
                             "pass data=SPEC")  # fmt: skip
        loaded = self._checked_model("leakage", None)
        keys = [s for s in specs if isinstance(s, str) and s != "label"]
        source = self.source(self.options.data, classes=self.class_names(), keys=keys)
        if keys and source.kind == "images":
            raise UsageError(
                f"group_by={keys[0]}: the samples of an image folder carry no entry "
                f"{keys[0]!r} (its labels are its class folders)",
                "group by class folder with group_by=label, or pass data= a tensor file with "
                "that entry or a data factory whose batches are dicts with that key",
            )
        names = ", ".join(s if isinstance(s, str) else getattr(s, "__name__", "function")
                          for s in specs)  # fmt: skip
        self.info(
            f"leakage analysis on {source.description} ({self.describe_run()}), grouped by "
            f"{names or 'groups='}"
        )
        result = leakage_analysis(
            loaded.module, source, specs or None, batch_size, samples, groups=groups,
            seed=self.options.seed, progress=progress, num_classes=_unmatched_classes(source),
            **self.run_options(),
        )  # fmt: skip
        self._notice_unreadable(source, "data")
        self._notice_labels(source, "data", result.extra["has_labels"], "")
        return Result(self._report(result, self._run_extra(loaded, source, result)), self)


def open(  # noqa: A001 - the library's entry point, named as the README uses it
    checkpoint: str | Path | None = None,
    *,
    model: str | nn.Module | None = None,
    model_kwargs: str | dict[str, Any] | None = None,
    data: Any = None,
    eval_data: Any = None,
    key: str | None = None,
    trust: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    input_key: str | None = None,
    call: str | Callable[..., Any] | None = None,
    image_size: int | None = None,
    resize: int | None = None,
    channels: int = 3,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    seed: int = 0,
    drop_last: bool = False,
    skip_unreadable: bool = False,
    device: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    notify: Notify | None = None,
    info: Notify | None = None,
) -> Job:
    """A :class:`Job` on ``checkpoint`` (a checkpoint file; None with a live ``model``) with
    the commands' options and defaults (see :class:`Options`). Nothing is loaded until an
    operation needs it; ``device`` and ``amp`` are checked by the first operation before
    anything runs. ``notify`` receives notices (an EMA copy left unused, samples left out,
    images skipped), ``info`` status lines. An image of an image folder that cannot be decoded
    stops the operation with a :class:`~bnscope.errors.DataError` naming it, before anything
    is written; ``skip_unreadable=True`` leaves such images out instead, with a notice.

    >>> job = bnscope.open("runs/ckpt.pt", model="model.py:make_model", data="data/train")
    >>> job.precise(batches=100).save()          # runs/ckpt.precise.pt, like bnscope precise
    """
    options = Options(
        key=key,
        trust=trust,
        model=model,
        model_kwargs=model_kwargs,
        data=data,
        eval_data=eval_data,
        batch_size=batch_size,
        workers=workers,
        input_key=input_key,
        call=call,
        image_size=image_size,
        resize=resize,
        channels=channels,
        mean=parse_floats(mean, "mean"),
        std=parse_floats(std, "std"),
        seed=seed,
        drop_last=drop_last,
        skip_unreadable=skip_unreadable,
        device=device,
        amp=amp,
        channels_last=channels_last,
    )
    return Job(checkpoint, options, notify=notify, info=info)


def parse_floats(text: str | Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    """``'0.5,0.5,0.5'`` (or a list) -> ``(0.5, 0.5, 0.5)``."""
    if text is None:
        return None
    if isinstance(text, str):
        items: list[Any] = [t for t in text.replace(" ", "").split(",") if t]
    else:
        items = list(text)
    try:
        values = tuple(float(t) for t in items)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{name}= must be comma-separated numbers, got {text!r}", f"e.g. {name}=0.5,0.5,0.5"
        ) from exc
    if not values:
        raise UsageError(f"{name}= is empty", f"e.g. {name}=0.5,0.5,0.5")
    return values


def recompute_fix(path: str, spec: str | None) -> str:
    """The fix of static findings: the command that recomputes the statistics."""
    model = spec if spec and not spec.startswith("(") else "SPEC"
    return f"recompute the statistics: bnscope precise {path} --model {model} --data TRAIN_DATA"


def require_batchnorm(model: Any, operation: str, include_frozen: bool | None = None) -> None:
    """precise, adapt and ghost have nothing to do on a model without BN layers: one error
    before anything runs. Frozen BN layers count; for precise and adapt
    (``include_frozen`` not None) a model whose BN layers are all frozen needs
    ``include_frozen=True``."""
    from .engine.capture import is_batchnorm, is_frozen_batchnorm

    frozen = [m for m in model.modules() if is_frozen_batchnorm(m)]
    if any(is_batchnorm(m) for m in model.modules()):
        return
    if not frozen:
        raise UsageError(
            f"the model has no BatchNorm layer: {operation} has nothing to do",
            "check model= (inspect on the checkpoint lists the BN layers it holds)",
        )
    kind = type(frozen[0]).__name__
    if operation == "ghost":
        raise UsageError(
            f"every BN layer of the model is frozen ({len(frozen)} {kind}): frozen layers "
            "normalize with their stored statistics at every batch size, so ghost has nothing "
            "to analyse",
            "inspect with data= measures frozen statistics against the data",
        )
    if include_frozen is False:
        raise UsageError(
            f"every BN layer of the model is frozen ({len(frozen)} {kind}): {operation} keeps "
            "frozen statistics unless asked",
            "pass include_frozen=True to re-estimate them (inspect with data= measures them "
            "against the data)",
        )


def module_aliases(model: Any) -> dict[int, list[str]]:
    """Every name of each module, by ``id``: a module used at several places of the model has
    one name per place, and the state dict holds its entries under each of them."""
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(name)
    return aliases


def _key_prefix(prefix: str, name: str) -> str:
    return f"{prefix}{name}." if name else prefix


def bn_updates(model: Any, layers: Any, prefix: str) -> dict[str, Any]:
    """Checkpoint keys -> new running_mean/running_var (and num_batches_tracked, which precise
    and adapt count, docs/statistics.md section 3.1) of the layers with status updated, under
    every name of a layer used at several places."""
    from .records import module_name

    modules = dict(model.named_modules())
    aliases = module_aliases(model)
    updates: dict[str, Any] = {}
    for rec in layers:
        if rec.status != "updated":
            continue
        mod = modules[module_name(rec.name)]
        values = {
            "running_mean": mod.running_mean.detach().cpu(),
            "running_var": mod.running_var.detach().cpu(),
        }
        tracked = mod._buffers.get("num_batches_tracked")
        if tracked is not None:
            values["num_batches_tracked"] = tracked.detach().cpu()
        for name in aliases[id(mod)]:
            base = _key_prefix(prefix, name)
            updates.update({f"{base}{entry}": value for entry, value in values.items()})
    return updates


def require_freezable(model: Any) -> None:
    """``freeze=True`` needs a BN layer with running statistics, or a frozen one: one error
    before anything runs."""
    from .engine.capture import is_batchnorm, is_frozen_batchnorm

    for mod in model.modules():
        if is_frozen_batchnorm(mod) or (is_batchnorm(mod) and mod.running_mean is not None):
            return
    raise UsageError(
        "freeze=True: no BN layer of the model has running statistics to freeze "
        "(track_running_stats=False everywhere)",
        "drop freeze=True",
    )


def frozen_prefixes(model: Any, layers: Any, prefix: str) -> tuple[str, ...]:
    """The checkpoint key prefixes (every name of a shared layer) of the BN layers a frozen
    checkpoint writes in the frozen-BN layout: every BN layer with running statistics, and
    the frozen layers that hold no ``num_batches_tracked`` of their own (a checkpoint entry
    of that name, which they ignore, is dropped)."""
    from .engine.capture import is_batchnorm
    from .records import module_name

    modules = dict(model.named_modules())
    aliases = module_aliases(model)
    out: list[str] = []
    for rec in layers:
        mod = modules[module_name(rec.name)]
        if is_batchnorm(mod):
            if mod.running_mean is None or mod.running_var is None:
                continue  # no statistics to freeze: written as it was
        elif "num_batches_tracked" in mod._buffers:
            continue  # a frozen layer with a count of its own: written as it was
        out.extend(_key_prefix(prefix, name) for name in aliases[id(mod)])
    return tuple(out)


def frozen_report(report: Report) -> Report:
    """The report of ``precise(freeze=True)``: a layer that never ran is frozen with its
    stored statistics, and one without running statistics is written as it was, as its
    ``reason`` and the ``not-called`` finding say."""
    from . import findings
    from .records import Status

    def worded(rec: Any) -> Any:
        if rec.status == Status.NOT_CALLED:
            return replace(rec, reason=findings.FROZEN_NOT_CALLED_REASON)
        if rec.status == Status.SKIPPED:
            return replace(rec, reason=f"{rec.reason}; {findings.FROZEN_SKIPPED_NOTE}")
        return rec

    found = tuple(
        findings.not_called_frozen(f.layer) if f.code == "not-called" and f.layer else f
        for f in report.findings
    )
    return replace(report, layers=tuple(worded(r) for r in report.layers), findings=found)


def _domain_updates(
    loaded: LoadedModel, report: Report, domain: str, *, updated_only: bool
) -> dict[str, Any]:
    """Checkpoint keys -> ``domain``'s BN statistics (:func:`bnscope.ops.domains.
    domain_state_dict`), on the CPU; ``updated_only``: only the layers the domain's run
    updated, as :func:`bn_updates` gives for one domain."""
    from .ops.domains import domain_state_dict
    from .records import module_name

    state = domain_state_dict(report, domain)
    if updated_only:
        entry = next(e for e in report.extra["domains"] if e["name"] == domain)
        keys = {
            (f"{module_name(r['name'])}." if module_name(r["name"]) else "") + key
            for r in entry["layers"]
            if r["status"] == "updated"
            for key in ("running_mean", "running_var", "num_batches_tracked")
        }
        state = {k: v for k, v in state.items() if k in keys}
    prefix = loaded.prefix
    return {f"{prefix}{k}": v.detach().cpu() for k, v in state.items()}


def _split_updates(loaded: LoadedModel, report: Report, domains: list[str]) -> dict[str, Any]:
    """Checkpoint keys -> the split model's statistics (:mod:`bnscope.nn_split` layout): for
    every layer :func:`bnscope.nn.convert_to_split_bn` converts, at every path it has in the
    model (a module used at two places has two sets of keys), ``running_mean`` and
    ``running_var`` stacked over the domains ``[D, C]`` and ``num_batches_tracked`` ``[D]``;
    a domain whose run did not update the layer contributes the source statistics."""
    import torch

    from .nn_split import splittable

    states = [_domain_updates(loaded, report, d, updated_only=False) for d in domains]
    prefix = loaded.prefix
    updates: dict[str, Any] = {}
    for name, module in loaded.module.named_modules(remove_duplicate=False):
        if not splittable(module):
            continue
        first = next(n for n, m in loaded.module.named_modules() if m is module)
        source = f"{prefix}{first}." if first else prefix
        target = f"{prefix}{name}." if name else prefix
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            rows = [state.get(source + key) for state in states]
            if any(row is None for row in rows):
                continue
            updates[target + key] = torch.stack([row for row in rows if row is not None])
    return updates


def _unmatched_classes(source: DataSource) -> int | None:
    """How many class folders a labelled image folder has when they were not matched to the
    model's class names (their labels are then only positions in name order), else None."""
    if source.classes is None or source.matched:
        return None
    return len(source.classes)


def _factory_shards(spec: str) -> bool:
    """Whether a data factory's signature takes ``rank`` and ``world_size``."""
    import inspect

    from .errors import DataError
    from .io.modelspec import resolve_spec

    try:
        obj = resolve_spec(spec, DataError, "data")
        params = inspect.signature(obj).parameters if callable(obj) else {}
    except Exception:  # noqa: BLE001 - only for a notice
        return True
    return "rank" in params and "world_size" in params

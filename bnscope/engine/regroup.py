"""Samples re-batched: a pool of the data's samples, per-sample group ids, and arrangements.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", §6 ("Information Leakage within a
Batch"): in training mode a sample's output depends on which other samples share its batch.
To measure that dependence the same samples are put into batches in several ways (i.i.d.
draws, or grouped by label or by a group key), with the same number of samples per batch.

:func:`read_pool` reads the data's first samples and pools them into one batch of the data's
own structure (a tensor, a tuple/list, a dict; per-sample lists such as file names too), with
each sample's group id under every grouping asked for; :func:`take` cuts a batch of any
samples out of it, in the same structure, so ``call(model, batch)`` and the batch protocol see
batches of the kind the data yields. :func:`iid_order` and :func:`grouped_order` are the
arrangements (docs/statistics.md, section 10.1).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from ..io.batches import _key_list
from .runner import Runner

__all__ = [
    "LABEL",
    "GroupSpec",
    "Pool",
    "grouped_order",
    "iid_order",
    "read_pool",
    "take",
]

#: the grouping by the batches' labels
LABEL = "label"

#: a grouping: "label", a key of dict batches, or a function batch -> per-sample ids
GroupSpec = str | Callable[[Any], Any]


@dataclass(frozen=True)
class _Rows:
    """A per-sample leaf of a pooled batch: a tensor with one row per sample, or a list of
    per-sample values (file names, ids)."""

    value: torch.Tensor | list[Any]


@dataclass
class Pool:
    """Samples of the data, pooled: ``batch`` is the data's batch structure with every
    per-sample leaf holding all ``size`` samples (in data order), ``codes`` the group id of
    each sample under each grouping (name -> int64 tensor of codes 0..groups-1), ``batches``
    the batches read and ``largest_batch`` the largest of them."""

    batch: Any
    size: int
    codes: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    largest_batch: int = 0


def spec_name(spec: GroupSpec) -> str:
    """The name a grouping is reported under: the label, the key, or the function's name."""
    if isinstance(spec, str):
        return spec
    return str(getattr(spec, "__name__", type(spec).__name__))


def _per_sample_list(value: Any, n: int) -> bool:
    if not isinstance(value, (list, tuple)) or len(value) != n or n == 0:
        return False
    return not any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in value)


def _concat(parts: list[Any], sizes: list[int], where: str) -> Any:
    """One pooled batch from ``parts`` (batches of the same structure) with ``sizes`` samples."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.ndim and all(
            isinstance(p, torch.Tensor) and p.ndim and p.shape[0] == n
            for p, n in zip(parts, sizes, strict=True)
        ):
            try:
                return _Rows(torch.cat(parts))
            except RuntimeError as exc:
                raise DataError(
                    f"the batches' {where} differ in shape or dtype, so their samples cannot "
                    f"be re-batched ({' '.join(str(exc).split())[:120]})",
                    "make every batch hold samples of the same shape",
                ) from exc
        return first  # a per-batch constant
    if isinstance(first, Mapping):
        keys = list(first)
        for p in parts:
            if not isinstance(p, Mapping) or list(p) != keys:
                raise DataError(
                    f"the batches differ in structure (keys {_key_list(keys)} and "
                    f"{_key_list(p) if isinstance(p, Mapping) else type(p).__name__})",
                    "make every batch a dict with the same keys",
                )
        return {k: _concat([p[k] for p in parts], sizes, f"entry {k!r}") for k in keys}
    if isinstance(first, (tuple, list)):
        if all(_per_sample_list(p, n) for p, n in zip(parts, sizes, strict=True)):
            return _Rows([v for p in parts for v in p])
        if any(not isinstance(p, (tuple, list)) or len(p) != len(first) for p in parts):
            raise DataError(
                "the batches differ in structure (sequences of different lengths)",
                "make every batch the same kind of tuple or list",
            )
        items = [_concat([p[i] for p in parts], sizes, f"item {i}") for i in range(len(first))]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
            return type(first)(*items)
        return type(first)(items)
    return first


def take(pooled: Any, index: torch.Tensor) -> Any:
    """The batch of the samples ``index`` (positions in the pool, any order) in the data's
    structure."""
    if isinstance(pooled, _Rows):
        value = pooled.value
        if isinstance(value, torch.Tensor):
            return value[index.to(value.device)]
        return [value[i] for i in index.tolist()]
    if isinstance(pooled, Mapping):
        return {k: take(v, index) for k, v in pooled.items()}
    if isinstance(pooled, tuple) and hasattr(pooled, "_fields"):
        return type(pooled)(*(take(v, index) for v in pooled))
    if isinstance(pooled, (tuple, list)):
        return type(pooled)(take(v, index) for v in pooled)
    return pooled


def _ids(value: Any, n: int, what: str, fix: str) -> list[Hashable]:
    """Per-sample group ids as hashable Python values (ints, strings...)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 1 or value.shape[0] != n or value.is_floating_point() or (
            value.is_complex()
        ):
            raise DataError(
                f"{what} must be one integer (or string) per sample, got a tensor of shape "
                f"{tuple(value.shape)} ({value.dtype}) for a batch of {n} samples",
                fix,
            )
        return list(value.tolist())
    if isinstance(value, (list, tuple)) and len(value) == n:
        try:
            for v in value:
                hash(v)
        except TypeError:
            raise DataError(f"{what} must be hashable values (ints, strings)", fix) from None
        return list(value)
    raise DataError(
        f"{what} must be one id per sample (a 1-D integer tensor or a list of {n}), got "
        f"{type(value).__name__}",
        fix,
    )


def _group_ids(spec: GroupSpec, batch: Any, runner: Runner, n: int, index: int) -> list[Hashable]:
    name = spec_name(spec)
    if spec == LABEL:
        labels = runner.labels(batch)
        if labels is None:
            raise DataError(
                f"group_by=label needs labels, but batch {index} carries none",
                "give the data labels (class folders, an (x, y) tensor file, a 'y' entry) or "
                "group by a key of the batches: group_by=KEY",
            )
        return _ids(labels, n, "labels", "labels must be a 1-D integer tensor, one per sample")
    fix = f"make the batches carry one id per sample under {name!r}, or group_by=label"
    if isinstance(spec, str):
        if not isinstance(batch, Mapping):
            raise DataError(
                f"group_by={name}: batches are {type(batch).__name__}s, not dicts with a key "
                f"{name!r}",
                "yield dict batches with that key (a data factory), or save the ids in the "
                "tensor file under that name, or group_by=label",
            )
        if name not in batch:
            raise DataError(
                f"group_by={name}: batches have no key {name!r} (keys: "
                f"{_key_list(batch.keys())})",
                "pass group_by= with one of those keys, or group_by=label",
            )
        return _ids(batch[name], n, f"the batch entry {name!r}", fix)
    try:
        value = spec(batch)
    except Exception as exc:
        raise DataError(
            f"the group function {name} failed on batch {index}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}",
            "make group_by= functions take a batch as the data yields it and return one id "
            "per sample",
        ) from exc
    return _ids(value, n, f"the ids returned by {name}", fix)


def _codes(ids: list[Hashable]) -> torch.Tensor:
    """Group ids as int64 codes 0..k-1, in order of first appearance."""
    table: dict[Hashable, int] = {}
    return torch.tensor([table.setdefault(v, len(table)) for v in ids], dtype=torch.int64)


def _given_ids(values: Any, name: str) -> list[Hashable]:
    """Ids given for the samples in data order (a 1-D tensor or array, or a sequence)."""
    fix = "pass one id per sample of the data, in the order the data yields them"
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        shape = tuple(getattr(values, "shape", ()))
        if len(shape) != 1:
            raise DataError(f"groups= {name!r} has shape {shape}: one id per sample", fix)
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise DataError(f"groups= {name!r} is a {type(values).__name__}, not a sequence", fix)
    try:
        for v in values:
            hash(v)
    except TypeError:
        raise DataError(f"groups= {name!r} holds unhashable ids", fix) from None
    return list(values)


def read_pool(
    data: Iterable[Any],
    runner: Runner,
    samples: int | None,
    specs: Sequence[GroupSpec] = (),
    given: Mapping[str, Any] | None = None,
) -> Pool:
    """The first ``samples`` samples of ``data`` (all of it when None) as a :class:`Pool`,
    with each sample's code under every grouping of ``specs`` and ``given`` (name -> ids of
    the samples in data order, one per sample at least up to the pool's size). Batches are
    read as the data yields them, on the host when the data is; nothing runs the model.
    Raises :class:`DataError` for batches whose samples cannot be pooled or that lack the ids
    asked for."""
    parts: list[Any] = []
    sizes: list[int] = []
    ids: dict[str, list[Hashable]] = {spec_name(s): [] for s in specs}
    total = 0
    for index, batch in enumerate(data):
        n = runner.samples(batch)
        if n == 0:
            raise DataError(
                f"batch {index} holds no input tensor", "check data= and input_key= (or call=)"
            )
        for spec in specs:
            ids[spec_name(spec)].extend(_group_ids(spec, batch, runner, n, index))
        parts.append(batch)
        sizes.append(n)
        total += n
        if samples is not None and total >= samples:
            break
    if not parts:
        raise DataError("the data yielded no batches", "check data= (is it empty?)")
    pooled = _concat(parts, sizes, "inputs")
    size = total if samples is None else min(total, samples)
    if size < total:
        pooled = take(pooled, torch.arange(size))
    codes = {name: _codes(values[:size]) for name, values in ids.items()}
    for name, values in (given or {}).items():
        listed = _given_ids(values, name)
        if len(listed) < size:
            raise DataError(
                f"groups= holds {len(listed)} ids for {name!r}, but {size} samples are analysed",
                "pass one id per sample of the data, in the order the data yields them",
            )
        codes[name] = _codes(listed[:size])
    return Pool(pooled, size, codes, len(parts), max(sizes))


def iid_order(n: int, seed: int) -> torch.Tensor:
    """A uniformly random order of the samples 0..n-1 (seeded): cut into batches, i.i.d.
    draws without replacement."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def grouped_order(codes: torch.Tensor, seed: int) -> torch.Tensor:
    """The samples sorted by group, the groups in a random order and the samples of a group
    in a random order (seeded): cut into batches, each batch holds one group, or the end of
    one and the start of the next (the R-CNN case of Wu & Johnson: all RoIs of an image)."""
    g = torch.Generator().manual_seed(seed)
    n = codes.numel()
    rank = torch.randperm(int(codes.max()) + 1 if n else 0, generator=g)
    shuffled = torch.randperm(n, generator=g)
    keys = rank[codes[shuffled]]
    return shuffled[torch.sort(keys, stable=True).indices]

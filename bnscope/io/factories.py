"""``pkg.module:factory`` data specs: call the factory, and word its failures in one line.

The factory is called with those of ``batch_size``, ``num_workers``/``workers``, ``seed``,
``rank`` and ``world_size`` that its signature names; a module-level iterable is used as it is.
Its batches are wrapped so that an error while producing one becomes a one-line
:class:`~bnscope.errors.DataError` naming the spec and the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from bnscope.errors import BnscopeError, DataError
from bnscope.io._messages import _exc_line
from bnscope.io.modelspec import resolve_spec, split_spec


def _factory_parts(spec: str) -> tuple[str, str] | None:
    """``(module_or_file, attribute)`` when ``spec`` is a factory spec (the grammar of
    :func:`bnscope.io.modelspec.split_spec`), else ``None``; an existing path is a path."""
    if ":" not in spec or Path(spec).exists():
        return None
    return split_spec(spec)


def _factory_kwargs(factory: Callable[..., Any], values: dict[str, int]) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    accepted = {
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in values.items() if k in accepted}


def _load_factory(target: str, attr: str, spec: str, values: dict[str, int]) -> Iterable[Any]:
    obj = resolve_spec(f"{target}:{attr}", DataError, "data")
    if callable(obj) and not isinstance(obj, (Iterable, Dataset)):
        try:
            result = obj(**_factory_kwargs(obj, values))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"data factory {spec!r} raised {_exc_line(exc)}", "fix the error in the factory"
            ) from exc
    else:
        result = obj
    if isinstance(result, Dataset) and not isinstance(result, IterableDataset):
        raise DataError(
            f"data factory {spec!r} returned a {type(result).__name__} (a dataset of samples), "
            "not batches",
            "return torch.utils.data.DataLoader(dataset, batch_size=batch_size)",
        )
    if not isinstance(result, Iterable) or isinstance(result, (str, bytes)):
        raise DataError(
            f"data factory {spec!r} returned a {type(result).__name__}, not an iterable of batches",
            "return a DataLoader or another iterable of batches",
        )
    return result


class _FactoryBatches:
    """A factory's iterable of batches whose failures while producing a batch become one-line
    DataErrors naming the spec and the batch (a reader that breaks after a few
    batches, a DataLoader worker that raises). ``KeyboardInterrupt``, ``StopIteration`` and
    bnscope's own errors pass through unchanged; other attributes are the loader's."""

    def __init__(self, loader: Iterable[Any], spec: str) -> None:
        self.loader = loader
        self.spec = spec

    def __iter__(self) -> Iterator[Any]:
        try:
            inner = iter(self.loader)
        except (BnscopeError, StopIteration):
            raise
        except Exception as exc:
            raise _iteration_error(self.spec, exc, 0) from exc
        return _FactoryIterator(inner, self.spec)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "spec"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class _FactoryIterator:
    """The iterator of :class:`_FactoryBatches`; other attributes (``_shutdown_workers`` of a
    DataLoader's iterator) are the wrapped iterator's."""

    def __init__(self, inner: Iterator[Any], spec: str) -> None:
        self.inner = inner
        self.spec = spec
        self.index = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self.inner)
        except (BnscopeError, StopIteration):
            raise
        except Exception as exc:
            raise _iteration_error(self.spec, exc, self.index) from exc
        self.index += 1
        return batch

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "spec", "index"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _iteration_error(spec: str, exc: BaseException, index: int) -> DataError:
    detail = _exc_line(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Original Traceback" in str(exc) and lines:  # from a DataLoader worker: its last line
        detail = lines[-1] if len(lines[-1]) <= 300 else lines[-1][:297] + "..."
    return DataError(
        f"data factory {spec!r} raised {detail} while producing batch {index}",
        "fix the error in the factory (or its data)",
    )

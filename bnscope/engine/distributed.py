"""Exact statistics under ``torch.distributed``: reductions, rank status, SyncBatchNorm.

Every rank accumulates float64 sufficient statistics of its own data; at the end they are
all-reduced once (not per batch), so every rank ends with the same population statistics as
one process on the union of the ranks' data. For per-channel moments (count n_r, mean m_r,
M2_r on rank r) two rounds give the pooled result exactly (Chan, Golub & LeVeque 1979):

    N = sum_r n_r,   mu = sum_r n_r m_r / N,   M2 = sum_r [M2_r + n_r (m_r - mu)^2]

The ranks never average per-rank averages of per-batch variances (pycls, mmpretrain), and never
keep their own statistics (fvcore, detectron2).

Failure protocol. A rank whose work fails must not leave the others blocked in a collective.
Every data collective issued through this module is preceded by a *status exchange* (one tiny
all-reduce of a per-rank error flag), and a failing rank takes part in the next status exchange
with its flag set instead of continuing. All ranks then know who failed: the failing rank
re-raises its own error, the others raise :class:`PeerFailed`. This only works if every
collective of the run goes through these helpers, in the same order on every rank: bnscope code
never calls ``torch.distributed`` directly.

``process_group`` arguments everywhere in bnscope: ``None`` means the default group when
``torch.distributed`` is initialized (and nothing otherwise), a ``ProcessGroup`` means that
group, and :data:`LOCAL` (``"local"``) means no communication at all.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import BnscopeError

if TYPE_CHECKING:
    from .stats import MomentAccumulator

#: ``process_group=LOCAL``: statistics of this process only (no communication).
LOCAL = "local"

#: The environment variables ``torchrun`` sets for every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Seconds a collective may wait for the other ranks (``BNSCOPE_DIST_TIMEOUT``; default:
#: torch's default process-group timeout).
TIMEOUT_ENV = "BNSCOPE_DIST_TIMEOUT"

_MESSAGE_BYTES = 1024
_STATUS_ATTR = "_bnscope_rank_status"


class PeerFailed(BnscopeError):
    """Another rank failed; this rank stopped too. ``status`` says which ranks failed."""

    kind = "distributed"

    def __init__(self, status: RankStatus) -> None:
        rank = status.failed[0]
        super().__init__(
            f"rank {rank} of {status.world_size} failed: {status.message}",
            "see that rank's error",
        )
        self.status = status


class CommunicationError(BnscopeError):
    """A collective itself failed (a rank crashed, the network, a timeout)."""

    kind = "distributed"


class BrokenExchange(CommunicationError):
    """A status exchange failed: its ``status.message`` is the collective's one-line error."""

    def __init__(self, status: RankStatus) -> None:
        super().__init__(
            status.message or "a status exchange with the other ranks failed",
            None if status.message else "check the other ranks' output",
        )
        self.status = status


@dataclass(frozen=True)
class RankStatus:
    """The outcome of a status exchange: which ranks failed (sorted) and the first failing
    rank's one-line message. ``broken`` when the exchange itself failed."""

    rank: int
    world_size: int
    failed: tuple[int, ...] = ()
    message: str = ""
    broken: bool = field(default=False)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.broken

    @property
    def reporter(self) -> bool:
        """True on the one rank that reports the failure: the lowest failing rank."""
        return bool(self.failed) and self.failed[0] == self.rank


# --------------------------------------------------------------------------------------------
# State of the process group


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = None) -> Any:
    """The group to communicate over, or None when there is nothing to do: not initialized,
    ``LOCAL``, or a group of one process."""
    if isinstance(process_group, str):
        if process_group != LOCAL:
            raise ValueError(f"process_group must be a ProcessGroup, None or {LOCAL!r}")
        return None
    if not is_initialized():
        if process_group is not None:
            raise ValueError("process_group given but torch.distributed is not initialized")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def get_rank(process_group: Any = None) -> int:
    """This process's rank in the group (0 without a process group)."""
    group = None if isinstance(process_group, str) else process_group
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(process_group: Any = None) -> int:
    """The number of processes in the group (1 without a process group)."""
    group = None if isinstance(process_group, str) else process_group
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a process without ``torch.distributed``."""
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment has what ``torchrun`` sets for a worker."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_rank() -> int:
    """``LOCAL_RANK`` from torchrun (0 when absent)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def timeout_from_env() -> timedelta | None:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError as exc:
        raise BnscopeError(
            f"{TIMEOUT_ENV}={value!r} is not a number of seconds", f"e.g. {TIMEOUT_ENV}=600"
        ) from exc
    return timedelta(seconds=seconds)


def init_from_env() -> bool:
    """Initialize the default process group from torchrun's environment.

    Does nothing (returns False) when ``torch.distributed`` is already initialized or the
    torchrun variables are absent. Backend: ``gloo`` for CPU tensors, plus ``nccl`` for CUDA
    tensors when CUDA and NCCL are available (``cpu:gloo,cuda:nccl``; each collective then
    runs on the backend of its tensors' device). With CUDA, the current device becomes
    ``cuda:LOCAL_RANK``. Returns True when this call initialized the group.
    """
    if is_initialized() or not launched_by_torchrun() or not dist.is_available():
        return False
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        if local_rank() < torch.cuda.device_count():
            torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {}
    timeout = timeout_from_env()
    if timeout is not None:
        kwargs["timeout"] = timeout
    try:
        dist.init_process_group(backend=backend, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any rendezvous failure is one line
        raise CommunicationError(
            f"could not join the torchrun process group: {error_text(exc)}",
            "check torchrun's --nnodes, --rdzv-endpoint / --master-addr and --master-port",
        ) from exc
    return True


def destroy() -> None:
    """Destroy the default process group (errors ignored)."""
    with contextlib.suppress(Exception):
        if is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Raw collectives (no status exchange: internal)


def _comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective's tensor must live for ``group``'s backend."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce(tensor: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    """All-reduce ``tensor`` (moved to the backend's device and back); returns the result.

    Before it, this rank records in the process group's store how many collectives it has
    entered (:func:`_mark_progress`), so that when the collective fails the ranks that never
    entered it can be named (:func:`communication_error`)."""
    op = dist.ReduceOp.SUM if op is None else op
    device = _comm_device(group, tensor.device)
    work = tensor.detach().to(device).contiguous()
    _mark_progress()
    try:
        dist.all_reduce(work, op=op, group=group)
    except Exception as exc:  # noqa: BLE001 - a collective failure of any kind
        raise communication_error(exc, group) from exc
    return work.to(tensor.device)


# --------------------------------------------------------------------------------------------
# Which rank stopped answering

#: The store key under which a rank records how many collectives it has entered.
_PROGRESS_KEY = "bnscope/collectives/{rank}"
_entered = 0


def _store() -> Any:
    """The default process group's key-value store (torchrun's agent store), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: ranks are then not named
        return None


def _mark_progress() -> None:
    """Count one more collective entered by this process, in the store (best effort: one
    ``set`` of a few bytes, before each of the run's few collectives)."""
    global _entered
    _entered += 1
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.set(_PROGRESS_KEY.format(rank=dist.get_rank()), str(_entered))


def silent_ranks(group: Any = None) -> list[int]:
    """The ranks of ``group`` (global ranks) that have entered fewer collectives than this
    one: after a collective failed, the ranks that never reached it (they hang, or they are
    gone). Empty when that cannot be told (no store, or every rank reached it)."""
    store = _store()
    if store is None:
        return []
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else None
    except Exception:  # noqa: BLE001
        ranks = None
    if ranks is None:
        ranks = list(range(dist.get_world_size()))
    me = dist.get_rank()
    behind = []
    for rank in ranks:
        if rank == me:
            continue
        key = _PROGRESS_KEY.format(rank=rank)
        try:
            entered = int(store.get(key).decode()) if store.check([key]) else 0
        except Exception:  # noqa: BLE001 - the store itself is gone: say nothing
            return []
        if entered < _entered:
            behind.append(rank)
    return behind


def _timeout_seconds(text: str) -> float | None:
    """The wait a timed-out collective reports (gloo: ``Timed out waiting 3000ms``)."""
    import re

    found = re.search(r"[Tt]imed out waiting (\d+)\s*ms", text)
    return int(found.group(1)) / 1000 if found else None


def communication_error(exc: BaseException, group: Any = None) -> CommunicationError:
    """The one-line error for a failed collective, naming the ranks that stopped answering
    when the store can tell (see :func:`silent_ranks`) and why the wait ended: a timeout
    (they hang, or are slower than ``BNSCOPE_DIST_TIMEOUT``) or a closed connection (the
    process exited or was killed)."""
    text = error_text(exc)
    silent = silent_ranks(group)
    if not silent:
        return CommunicationError(
            f"communication with the other ranks failed: {text}",
            "check the other ranks' output; a rank may have crashed or timed out",
        )
    who = ", ".join(str(r) for r in silent)
    ranks = f"rank {who}" if len(silent) == 1 else f"ranks {who}"
    waited = _timeout_seconds(text)
    if waited is not None or "timeout" in text.lower() or "timed out" in text.lower():
        within = f" within {waited:g} s" if waited is not None else ""
        return CommunicationError(
            f"{ranks} stopped answering: no reply{within}",
            f"check the output of {ranks}: it may hang in its data or model; if it is only "
            f"slow, raise {TIMEOUT_ENV} (seconds)",
        )
    return CommunicationError(
        f"{ranks} stopped answering: its connection closed (the "
        "process exited or was killed)",
        f"check the output of {ranks} and torchrun's summary (a signal, or the system "
        "running out of memory)",
    )


def error_text(exc: BaseException) -> str:
    """One line for an error: a BnscopeError's own line, else ``Type: message``."""
    text = " ".join(str(exc).split())
    if isinstance(exc, BnscopeError):
        return text
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Status exchange


def exchange_status(group: Any, error: str | None) -> RankStatus:
    """Every rank of ``group`` says whether it failed (``error`` is its one-line message).

    One all-reduce of ``world_size`` flags; when a rank failed, a second one carries the first
    failing rank's message (at most 1 KB). Every rank must call this at the same point."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    flags = torch.zeros(size, dtype=torch.float64)
    if error is not None:
        flags[rank] = 1
    try:
        flags = _all_reduce(flags, group)
        failed = tuple(i for i, v in enumerate(flags.tolist()) if v)
        if not failed:
            return RankStatus(rank, size)
        buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.float64)
        if rank == failed[0]:
            data = (error or "").encode("utf-8")[:_MESSAGE_BYTES]
            buf[: len(data)] = torch.tensor(list(data), dtype=torch.float64)
        buf = _all_reduce(buf, group)
    except CommunicationError as exc:
        return RankStatus(rank, size, message=exc.line(), broken=True)
    raw = bytes(int(v) for v in buf.tolist()).rstrip(b"\0")
    return RankStatus(rank, size, failed, raw.decode("utf-8", errors="replace"))


def check_peers(process_group: Any = None) -> None:
    """A status exchange in which this rank reports success; raises :class:`PeerFailed`
    when another rank failed (and :class:`CommunicationError` when the exchange failed).
    Every rank must call it at the same point. No-op without a process group."""
    group = resolve_group(process_group)
    if group is None:
        return
    status = exchange_status(group, None)
    if status.broken:
        raise BrokenExchange(status)
    if status.failed:
        raise PeerFailed(status)


def announce_failure(exc: BaseException, process_group: Any = None) -> RankStatus | None:
    """Report this rank's failure ``exc`` in the next status exchange, so the other ranks stop
    instead of waiting; the outcome is attached to ``exc`` (see :func:`status_of`). Call it
    where the other ranks will next exchange status, then re-raise ``exc``. Does nothing when
    the failure was already exchanged or there is no process group."""
    group = resolve_group(process_group)
    if group is None or status_of(exc) is not None:
        return status_of(exc)
    if isinstance(exc, CommunicationError):
        status = RankStatus(dist.get_rank(group), dist.get_world_size(group), broken=True)
    else:
        status = exchange_status(group, error_text(exc))
    with contextlib.suppress(Exception):
        setattr(exc, _STATUS_ATTR, status)
    return status


def status_of(exc: BaseException | None) -> RankStatus | None:
    """The status exchange an exception took part in (None when it has not been exchanged)."""
    if exc is None:
        return None
    if isinstance(exc, PeerFailed):
        return exc.status
    return getattr(exc, _STATUS_ATTR, None)


@contextlib.contextmanager
def failures_announced(process_group: Any = None) -> Iterator[None]:
    """Announce any exception raised in the block to the other ranks (then re-raise it)."""
    try:
        yield
    except Exception as exc:
        announce_failure(exc, process_group)
        raise


def barrier(process_group: Any = None) -> None:
    """Wait for every rank (a one-element all-reduce; errors ignored)."""
    group = resolve_group(process_group)
    if group is None:
        return
    with contextlib.suppress(CommunicationError):
        _all_reduce(torch.zeros(1, dtype=torch.float64), group)


# --------------------------------------------------------------------------------------------
# Public reductions (each one checks the other ranks first)


def all_reduce_sum(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (and returned): counts, sums, tallies.

    Checks first that no rank failed (raises :class:`PeerFailed`). Use float64 or int64 for
    sums that must be exact. Every rank must call it with a tensor of the same shape."""
    group = resolve_group(process_group)
    if group is None:
        return tensor
    check_peers(group)
    with torch.no_grad():
        tensor.copy_(_all_reduce(tensor, group))
    return tensor


def all_reduce_max(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Elementwise maximum over the ranks, in place (and returned); see :func:`all_reduce_sum`."""
    group = resolve_group(process_group)
    if group is None:
        return tensor
    check_peers(group)
    with torch.no_grad():
        tensor.copy_(_all_reduce(tensor, group, dist.ReduceOp.MAX))
    return tensor


def all_reduce_moments(accs: Sequence[MomentAccumulator], process_group: Any = None) -> None:
    """Pool :class:`~bnscope.engine.stats.MomentAccumulator` s over the ranks, in place.

    Afterwards every rank holds, in each accumulator, the count, mean and M2 of the union of
    all ranks' data (Chan et al. 1979, see the module docstring): one status exchange and two
    all-reduces for the whole list. Accumulators with no data on some ranks are fine. Every
    rank must pass the same number of accumulators with the same channel counts."""
    group = resolve_group(process_group)
    if group is None or not accs:
        if group is not None:
            check_peers(group)
        return
    check_peers(group)
    reduce_moments(accs, group)


def reduce_moments(
    accs: Sequence[MomentAccumulator],
    group: Any,
    extra_sum: torch.Tensor | None = None,
    extra_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`all_reduce_moments` without the status exchange (the caller did it), plus
    optional float64 vectors reduced by sum and by max in the same collectives. Returns the
    reduced ``(extra_sum, extra_max)``."""
    from .stats import F64

    device = accs[0].mean.device if accs else torch.device("cpu")
    counts = torch.tensor([float(a.count) for a in accs], dtype=F64, device=device)
    sums = [a.mean.to(device, F64) * float(a.count) for a in accs]
    parts = [counts, *sums]
    if extra_sum is not None:
        parts.append(extra_sum.to(device, F64))
    first = _all_reduce(torch.cat(parts), group)
    sizes = [len(accs)] + [a.num_features for a in accs]
    if extra_sum is not None:
        sizes.append(extra_sum.numel())
    pieces = list(torch.split(first, sizes))
    totals = pieces[0].tolist()
    means = []
    for i, n in enumerate(totals):
        means.append(pieces[1 + i] / n if n > 0 else torch.zeros_like(pieces[1 + i]))
    extra_sum_out = pieces[-1] if extra_sum is not None else None
    second_parts = []
    for acc, mean in zip(accs, means, strict=True):
        if acc.count:
            delta = acc.mean.to(device, F64) - mean
            second_parts.append(acc.m2.to(device, F64) + float(acc.count) * delta * delta)
        else:
            second_parts.append(torch.zeros_like(mean))
    extra_max_out = None
    if extra_max is not None:
        extra_max_out = _all_reduce(extra_max.to(device, F64), group, dist.ReduceOp.MAX)
    second = _all_reduce(torch.cat(second_parts), group) if second_parts else None
    m2s = torch.split(second, [a.num_features for a in accs]) if second is not None else ()
    for n, acc, mean, m2 in zip(totals, accs, means, m2s, strict=True):
        count = int(round(n))
        acc.count = count
        acc.mean = mean.to(acc.mean.device) if count else acc.mean.zero_()
        acc.m2 = m2.to(acc.m2.device) if count else acc.m2.zero_()
    return extra_sum_out, extra_max_out


def payload_bytes(num_features: Sequence[int]) -> int:
    """Bytes one rank contributes to the end-of-collection reduction for BN layers with these
    channel counts: float64 count, calls, samples and C sums (first all-reduce), calls per
    forward (max), C centred second moments (second all-reduce). Not counted: the status
    exchange before them (8 bytes per rank) and the collection's batch and sample totals
    (16 bytes)."""
    return sum(8 * (2 * c + 4) for c in num_features)


# --------------------------------------------------------------------------------------------
# SyncBatchNorm


def local_sync_forward(module: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``SyncBatchNorm.forward`` without the synchronization: exactly what it does itself when
    no process group is initialized (``_BatchNorm``'s forward on this process's batch)."""
    return nn.modules.batchnorm._BatchNorm.forward(module, x)


_SYNC_FORWARD = nn.SyncBatchNorm.forward
_local_depth = 0


@contextlib.contextmanager
def local_batchnorm(*models: nn.Module) -> Iterator[None]:
    """``SyncBatchNorm`` layers (and their subclasses) normalize with this process's batch for
    the block.

    Without an initialized process group ``SyncBatchNorm`` already does (nothing changes).
    Under one, in training mode it all-reduces every batch's statistics (and refuses CPU
    tensors), while bnscope wants each rank's own batch statistics (ranks then pool float64
    sufficient statistics once, at the end). The block therefore swaps
    ``SyncBatchNorm.forward`` itself, at the class, for :func:`local_sync_forward`: a subclass
    whose forward calls ``super().forward`` and then applies an activation or drop-path
    (timm's ``SyncBatchNormAct``) keeps its own forward and loses only the synchronization.
    Modules keep their class; the class attribute is put back on exit (nested blocks are
    fine). ``models`` is accepted for symmetry with other mode managers; every SyncBatchNorm
    of the process is local during the block."""
    global _local_depth
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    _local_depth += 1
    try:
        if _local_depth == 1:
            nn.SyncBatchNorm.forward = local_sync_forward  # type: ignore[method-assign,assignment]
        yield
    finally:
        _local_depth -= 1
        if _local_depth == 0:
            nn.SyncBatchNorm.forward = _SYNC_FORWARD  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# Streams on non-zero ranks


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[Any]:
    """On ranks other than 0, ``sys.stdout`` and ``sys.stderr`` drop everything for the block;
    yields the real stderr (for the one error line a failing rank prints)."""
    real_err = sys.stderr
    if is_main_process():
        yield real_err
        return
    out, err = sys.stdout, sys.stderr
    null = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    sys.stdout = sys.stderr = null
    try:
        yield real_err
    finally:
        sys.stdout, sys.stderr = out, err
        null.close()

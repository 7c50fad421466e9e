"""Device-to-host reads, all in one place.

On CUDA every read of a device value (``.item()``, ``bool(tensor)``, ``float(tensor)``,
``.tolist()``, ``.cpu()``) makes the host wait until the GPU has finished everything queued so
far: the GPU then idles while Python prepares the next launches. bnscope's loops over the data
therefore keep their counters, tallies and error flags on the device and read them with
:func:`fetch`: one transfer for any number of tensors, at the end of a pass (or, for error
flags, at most every :data:`bnscope.engine.capture.CHECK_SECONDS`). :data:`READS` counts the
transfers, so tests can check that a loop does not read per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: number of :func:`fetch` calls so far in this process: read points, counted on any device
#: (for tests and benchmarks)
READS = 0


def fetch(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The given tensors as CPU tensors (same shapes and dtypes), in one transfer per device.

    Tensors already on the CPU are returned as they are (detached); the others are flattened,
    concatenated per dtype and device, copied once and split again."""
    global READS
    if tensors:
        READS += 1
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        t = t.detach()
        if t.device.type == "cpu":
            out[i] = t
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for (_, _), idx in groups.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).cpu()
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].reshape(tensors[i].shape)
            offset += n
    return [t for t in out if t is not None]


def fetch_values(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Scalars (0-d or 1-element tensors, any device and dtype) as Python floats, in one
    transfer: ``int``-valued sums up to 2**53 stay exact."""
    if not tensors:
        return []
    flat = [t.detach().reshape(1).to(torch.float64) for t in tensors]
    return [v for t in fetch(flat) for v in t.tolist()]


def to_devices(
    tensors: Sequence[torch.Tensor], devices: Sequence[torch.device]
) -> list[torch.Tensor]:
    """Each tensor on the device at the same position, with one copy per (source, target,
    dtype) group instead of one per tensor. Tensors already there are returned as they are."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.device, torch.dtype], list[int]] = {}
    for i, (t, dev) in enumerate(zip(tensors, devices, strict=True)):
        if t.device == torch.device(dev):
            out[i] = t
        else:
            groups.setdefault((t.device, torch.device(dev), t.dtype), []).append(i)
    for (_, dev, _), idx in groups.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(dev)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].reshape(tensors[i].shape)
            offset += n
    return [t for t in out if t is not None]

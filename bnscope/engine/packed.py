"""Many small tensors kept for a whole pass, packed back to back into a few large ones.

A loop that keeps one small tensor per batch (an output, a fingerprint) for the next pass pays
for each a tensor object, a storage and an allocator chunk, and, on the host, the small chunks
kept among the large short-lived ones of every forward fragment the heap: benchmarks/soak.py
measured 8 to 23 KiB of resident memory per kept batch of 448 bytes of data. :class:`Packed`
copies each item into chunks that grow geometrically (from :data:`MIN_CHUNK_BYTES` to
:data:`MAX_CHUNK_BYTES`), so memory is the items' bytes plus at most one partly filled chunk,
and a long run keeps a few tensors, not one per batch. Appending is one device copy (no host
read); an item comes back as a view. Chunks can be let go as soon as their items are used.
"""

from __future__ import annotations

from array import array

import torch

#: the first chunk's size; each new chunk holds as much as all the items before it
MIN_CHUNK_BYTES = 64 << 10
#: no chunk is larger than this, unless one item is
MAX_CHUNK_BYTES = 4 << 20


class Packed:
    """Items of one dtype, device and trailing shape (the first item's), concatenated along
    dim 0. :meth:`append` refuses (returns False) an item that does not match; ``nbytes`` is
    the items' data plus the 24 bytes per item of the index, the figure to hold against a
    memory budget (the chunks allocated exceed it by less than one chunk)."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor | None] = []
        self._chunk = array("q")  # per item: its chunk,
        self._start = array("q")  # its first row there,
        self._rows = array("q")  # and its rows
        self._free = 0  # rows left in the last chunk
        self._kept = 0  # chunks before this one were let go
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._tail: tuple[int, ...] = ()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    def row_bytes(self, item: torch.Tensor) -> int:
        """Bytes of one row (one sample) of ``item``."""
        return item[0].numel() * item.element_size() if item.shape[0] else 0

    def matches(self, item: torch.Tensor) -> bool:
        """Whether ``item`` can join the items stored so far."""
        if item.ndim == 0:
            return False
        return self._dtype is None or (
            item.dtype == self._dtype
            and item.device == self._device
            and tuple(item.shape[1:]) == self._tail
        )

    def append(self, item: torch.Tensor) -> bool:
        """Copy ``item`` in (False, and nothing stored, when it does not :meth:`match`)."""
        if not self.matches(item):
            return False
        if self._dtype is None:
            self._dtype, self._device, self._tail = item.dtype, item.device, tuple(item.shape[1:])
        rows = item.shape[0]
        if not self._chunks or self._chunks[-1] is None or rows > self._free:
            row = max(self.row_bytes(item), 1)
            size = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, self.nbytes))
            capacity = max(rows, size // row)
            self._chunks.append(
                torch.empty((capacity, *self._tail), dtype=self._dtype, device=self._device)
            )
            self._free = capacity
        chunk = self._chunks[-1]
        assert chunk is not None  # a fresh one when the last was let go
        start = chunk.shape[0] - self._free
        chunk[start : start + rows].copy_(item.detach())
        self._free -= rows
        self._chunk.append(len(self._chunks) - 1)
        self._start.append(start)
        self._rows.append(rows)
        self.nbytes += rows * self.row_bytes(item) + 24
        return True

    def get(self, index: int) -> torch.Tensor | None:
        """Item ``index`` (a view into its chunk), or None when its chunk was let go."""
        chunk = self._chunks[self._chunk[index]]
        if chunk is None:
            return None
        start = self._start[index]
        return chunk[start : start + self._rows[index]]

    def release_through(self, index: int) -> None:
        """Let go of every chunk whose items all come at or before ``index`` (a reader that
        goes through the items in order calls this after each)."""
        last = self._chunk[index]
        if index + 1 < len(self) and self._chunk[index + 1] == last:
            last -= 1  # the item's chunk still holds later items
        for c in range(self._kept, last + 1):
            self._chunks[c] = None
        self._kept = max(self._kept, last + 1)

    def release_all(self) -> None:
        self._chunks = [None] * len(self._chunks)
        self._kept = len(self._chunks)

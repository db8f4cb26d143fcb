"""Batch tensors reused from batch to batch instead of allocated fresh for each one.

A 64 x 3 x 224 x 224 float32 batch is 38.5 MB: above glibc's mmap threshold in one process, and a new
shared-memory segment per batch in a DataLoader worker, so every fresh batch is faulted in and zeroed
by the kernel before it is filled (filling one costs 23.6 ms fresh vs 3.0 ms reused in one process,
33.5 ms as a fresh shared segment: `bench/RESULTS.md`, loader). A :class:`BatchPool` keeps a few
buffers per shape and hands one out again only once nothing else can read it:

* in its own process, the buffer's storage has no user left but the pool (every batch handed out
  is a *view* of its buffer, so any tensor made from it, or an autograd graph saving it, keeps the
  storage's use count up);
* across processes (a DataLoader worker's batches), the worker flags a buffer *sent* in a small
  shared tensor when the buffer leaves in a batch, and the main process (:class:`PoolReturns`)
  clears the flag once the storage it received is gone (the consumer, pin_memory's thread and
  DataLoader's queues all dropped it), watched with a weak reference; or, when a new pass resets
  the persistent workers, for the batches of earlier passes that were never delivered.

With no free buffer the pool allocates a fresh one (it never waits) and keeps at most ``depth`` per
shape and use per batch; nothing is written into memory that another holder can still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

SLOTS = 256  # flag entries per DataLoader worker: the most buffers one worker's pool keeps


def storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and storage handles) share ``t``'s storage; None where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(t.untyped_storage()._cdata))


@dataclass
class _Slot:
    buf: torch.Tensor
    users: int  # storage_users(buf) while the pool alone holds it


class BatchPool:
    """Reusable batch buffers of one process. ``alloc(shape, dtype)`` makes a fresh one (shared memory
    in a DataLoader worker); ``flags`` (int32 ``[SLOTS]``, shared with the main process) marks buffers
    that left in a batch with the pass that sent them, for :class:`PoolReturns` to clear; ``None`` in
    the main process itself."""

    def __init__(self, alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], depth: int,
                 flags: torch.Tensor | None = None) -> None:
        self.alloc, self.depth, self.flags = alloc, max(1, depth), flags
        self.slots: list[_Slot] = []
        self._uses: dict[tuple, int] = {}  # takes per (shape, dtype) in the batch being built
        self._peak: dict[tuple, int] = {}  # the most takes per batch seen so far
        self.reused = self.fresh = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor to fill: a free pooled buffer's view, a new pooled one, or (pool full) a fresh one."""
        key = (tuple(shape), dtype)
        self._uses[key] = self._uses.get(key, 0) + 1
        mine = [i for i, s in enumerate(self.slots) if (tuple(s.buf.shape), s.buf.dtype) == key]
        for i in mine:
            if self._free(i):
                self.reused += 1
                return self.slots[i].buf.view(key[0])
        self.fresh += 1
        buf = self.alloc(key[0], dtype)
        cap = self.depth * max(self._peak.get(key, 0), self._uses[key])
        users = storage_users(buf)
        if users is not None and len(mine) < cap and len(self.slots) < SLOTS:
            self.slots.append(_Slot(buf, users))
            return buf.view(buf.shape)
        return buf

    def _free(self, i: int) -> bool:
        if self.flags is not None and int(self.flags[i]) != 0:
            return False  # the main process still has it
        return storage_users(self.slots[i].buf) == self.slots[i].users

    def batch_done(self, batch: dict[str, Any], mark: int = 1) -> list[tuple[str, int, int]]:
        """End of a batch: in a worker, flag its pooled tensors sent (``mark``: the loader's pass number,
        >= 1); their places ``(key, view, slot)``."""
        for key, n in self._uses.items():
            self._peak[key] = max(self._peak.get(key, 0), n)
        self._uses = {}
        if self.flags is None:
            return []
        where = {s.buf.data_ptr(): i for i, s in enumerate(self.slots)}
        sent = []
        for key, view, t in _tensors(batch):
            slot = where.get(t.data_ptr())
            if slot is not None and tuple(t.shape) == tuple(self.slots[slot].buf.shape):
                self.flags[slot] = mark
                sent.append((key, view, slot))
        return sent


class PoolReturns:
    """The main process's side: which received tensors live in which worker's pooled buffer, and
    clearing a worker's flag once the main process no longer holds that buffer."""

    def __init__(self, workers: int) -> None:
        self.flags = torch.zeros((max(1, workers), SLOTS), dtype=torch.int32).share_memory_()
        self._pending: list[tuple[int, int, Any]] = []

    def track(self, batch: dict[str, Any]) -> None:
        """Note the pooled tensors of a received ``batch`` (its ``_pooled`` and ``_worker`` entries, removed)."""
        sent, worker = batch.pop("_pooled", ()), batch.pop("_worker", 0)
        for key, view, slot in sent:
            t = batch[key] if view < 0 else batch[key][view]
            self._pending.append((worker, slot, StorageWeakRef(t.untyped_storage())))
        self.sweep()

    def discard_undelivered(self, number: int) -> None:
        """Pass ``number`` starts, the DataLoader iterator reset: batches of earlier passes that were not
        delivered (still queued, or reordered when the consumer left the pass) are gone; free their buffers."""
        held = {(worker, slot) for worker, slot, _ in self._pending}
        stale = (self.flags > 0) & (self.flags < number)
        for worker, slot in stale.nonzero().tolist():
            if (worker, slot) not in held:
                self.flags[worker, slot] = 0

    def sweep(self) -> None:
        """Hand back to their workers the buffers nothing in this process holds any more."""
        keep = []
        for worker, slot, ref in self._pending:
            if ref.expired():
                self.flags[worker, slot] = 0
            else:
                keep.append((worker, slot, ref))
        self._pending = keep


def _tensors(batch: dict[str, Any]):
    """``(key, view, tensor)`` for each tensor value of ``batch`` (``view`` -1) and each of its lists."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            yield key, -1, value
        elif isinstance(value, list):
            for v, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    yield key, v, t

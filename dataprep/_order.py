"""The sample order of an epoch and how it is split across ranks: pure functions, no data read.

Vocabulary
----------
* **sample id**: a sample's index in manifest order (shard 0's samples first, then shard 1's ...).
* **epoch order**: a permutation of the sample ids (or, with ``resample``, N draws with
  replacement), a pure function of (per-shard counts, seed, epoch). Shards are permuted, grouped
  into *windows* of ``window_shards`` consecutive shards, and the samples of each window are
  permuted among themselves, so a reader only ever needs one window of shards at a time.
* **position**: an index into the epoch order.
* **plan**: what is left of an epoch and how it is split: ``segments`` (intervals of positions,
  concatenated), the ``world_size`` it is split for, and ``consumed`` (samples each rank has
  taken, equal on every rank). A plan is split into ``world_size`` contiguous, balanced chunks;
  rank r serves chunk r in order, then padding (``partial="pad"``) or stops early (``"drop"``).

An epoch starts with the plan ``segments=[(0, N)]``. Resuming with the same world size continues
the same plan; resuming with another world size makes a new plan from every rank's unserved
remainder (so each remaining sample is served exactly once) and splits that for the new size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

_ORDER_TAG = 0x5EED_0DE2  # separates the order's random stream from others seeded by the same seed


def _rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_ORDER_TAG, seed & 0xFFFFFFFF, seed >> 32,
                                                                         epoch, *extra])))


def shard_offsets(counts: Sequence[int]) -> np.ndarray:
    """Sample id of each shard's first sample; length ``len(counts) + 1`` (last = total)."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def epoch_order(counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True, window_shards: int = 4,
                resample: bool = False) -> np.ndarray:
    """Sample ids in the order epoch ``epoch`` serves them (int64, length = total samples).

    A pure function of its arguments. Without ``shuffle`` it is manifest order. With
    ``resample`` the ids are N draws with replacement, still grouped by window so reads stay local.
    """
    counts = np.asarray(counts, dtype=np.int64)
    offsets = shard_offsets(counts)
    total = int(offsets[-1])
    if not shuffle and not resample:
        return np.arange(total, dtype=np.int64)
    rng = _rng(seed, epoch)
    shard_perm = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    window_of_shard = np.empty(len(counts), dtype=np.int64)
    window_of_shard[shard_perm] = np.arange(len(counts)) // max(1, window_shards)
    if resample:
        ids = rng.integers(0, total, size=total, dtype=np.int64) if total else np.zeros(0, np.int64)
        shard_of = np.searchsorted(offsets, ids, side="right") - 1
        tiebreak = rng.random(total)
        return ids[np.lexsort((tiebreak, window_of_shard[shard_of]))]
    parts = []
    for start in range(0, len(counts), max(1, window_shards)):
        window = shard_perm[start:start + window_shards]
        ids = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in window]) if len(window) else []
        parts.append(rng.permutation(ids) if shuffle else np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Plan:
    """The unserved part of one epoch and its split; see the module docstring."""

    segments: tuple[tuple[int, int], ...]
    world_size: int
    consumed: int = 0

    @staticmethod
    def full(total: int, world_size: int) -> "Plan":
        return Plan(((0, total),) if total else (), world_size, 0)

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.segments)

    def chunk_bounds(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of rank's chunk, in plan coordinates (0 .. size). Balanced: sizes differ by <= 1."""
        m, w = self.size, self.world_size
        return rank * m // w, (rank + 1) * m // w

    def stream_length(self, batch_size: int, partial: str) -> int:
        """Samples every rank serves in total under this plan (a multiple of ``batch_size``)."""
        return self.batches(batch_size, partial) * batch_size

    def batches(self, batch_size: int, partial: str) -> int:
        m, w = self.size, self.world_size
        if partial == "drop":
            return (m // w) // batch_size
        return -(-(-(-m // w)) // batch_size)  # ceil(ceil(m / w) / b)

    def remainder(self, batch_size: int, partial: str) -> tuple[tuple[int, int], ...]:
        """Segments not yet served by any rank, in rank order (padding is never 'unserved')."""
        out: list[tuple[int, int]] = []
        for r in range(self.world_size):
            lo, hi = self.chunk_bounds(r)
            out.extend(slice_segments(self.segments, min(lo + self.consumed, hi), hi))
        return merge_segments(out)

    def resplit(self, world_size: int, batch_size: int, partial: str) -> "Plan":
        """This plan continued on ``world_size`` ranks: itself when the size is unchanged."""
        if world_size == self.world_size:
            return self
        return Plan(self.remainder(batch_size, partial), world_size, 0)


def slice_segments(segments: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Plan coordinates [lo, hi) of concatenated ``segments`` -> segments of positions."""
    out, base = [], 0
    for a, b in segments:
        n = b - a
        s, e = max(lo - base, 0), min(hi - base, n)
        if s < e:
            out.append((a + s, a + e))
        base += n
        if base >= hi:
            break
    return out


def merge_segments(segments: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Join adjacent intervals (order kept), drop empty ones."""
    out: list[tuple[int, int]] = []
    for a, b in segments:
        if a >= b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def positions_of(segments: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segments]) if segments \
        else np.zeros(0, np.int64)


@dataclass(frozen=True)
class RankStream:
    """What one rank serves under a plan: epoch positions and a padding flag per stream slot."""

    positions: np.ndarray  # [stream_length] epoch-order positions
    pad: np.ndarray        # [stream_length] bool, True for repeats added to even out ranks


def rank_stream(plan: Plan, rank: int, batch_size: int, partial: str) -> RankStream:
    """Rank ``rank``'s full stream under ``plan`` (including the part already consumed)."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank {rank} is outside world size {plan.world_size}")
    length = plan.stream_length(batch_size, partial)
    lo, hi = plan.chunk_bounds(rank)
    chunk = positions_of(slice_segments(plan.segments, lo, hi))
    if len(chunk) >= length:
        return RankStream(chunk[:length], np.zeros(length, dtype=bool))
    source = chunk if len(chunk) else positions_of(plan.segments)
    if not len(source):
        return RankStream(np.zeros(0, np.int64), np.zeros(0, dtype=bool))
    extra = length - len(chunk)
    start = 0 if len(chunk) else rank  # empty chunks spread their repeats over the plan
    fill = source[(start + np.arange(extra)) % len(source)]
    pad = np.concatenate([np.zeros(len(chunk), bool), np.ones(extra, bool)])
    return RankStream(np.concatenate([chunk, fill]), pad)


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """A 63-bit seed for one sample's augmentation (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + sample_id * 0x94D049BB133111EB + 0x2545F491) \
        & 0xFFFFFFFFFFFFFFFF
    for mult, shift in ((0xBF58476D1CE4E5B9, 30), (0x94D049BB133111EB, 27)):
        x ^= x >> shift
        x = (x * mult) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF

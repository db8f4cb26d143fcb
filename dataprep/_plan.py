"""Step 3 of a prep run, on the driver: scan columns -> early rejects, sample order, shards.

Deterministic: dedup in listing order (the first of equal bytes is kept), order by
``sha256(f"{seed}:{key}")``, the first ``val_fraction`` to ``val``, then cut into shards. It runs
on :class:`~dataprep._table.EntryTable` columns with numpy (sorts, not dicts), and the shards'
items are made one shard at a time when a task is submitted (:class:`Shards`), so the driver holds
~120 bytes per input plus an 8-byte row index, never one Python object per sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ._arrays import CHANNELS
from ._images import DUPLICATE, MASK
from ._table import EntryTable
from ._writer import ShardPlan, plan_digest
from .options import PrepOptions

_NONE = np.iinfo(np.int64).max


class PrepError(RuntimeError):
    """A prep run cannot go on; the message says what to do."""


class Shards(Sequence[ShardPlan]):
    """The plan's shards; ``shards[i]`` makes shard i's :class:`ShardPlan` (its items) when asked."""

    def __init__(self, table: EntryTable, rows: np.ndarray, cuts: list[tuple[str, int, int, int]], digest: str,
                 masks: dict[str, str] | None) -> None:
        self.table, self.rows, self.digest, self.masks = table, rows, digest, masks
        self.cuts = cuts  # (split, index, lo, hi): rows[lo:hi] are the shard's table rows, in output order

    def __len__(self) -> int:
        return len(self.cuts)

    def __getitem__(self, i: int) -> ShardPlan:  # type: ignore[override]
        split, index, lo, hi = self.cuts[i]
        items = tuple(self.table.item(int(r)) for r in self.rows[lo:hi])
        paired = tuple(self.masks[name] for _, name, _, _ in items) if self.masks is not None else ()
        return ShardPlan(split, index, items, plan_digest(self.digest, split, index, list(items), paired), paired)

    def __iter__(self) -> Iterator[ShardPlan]:
        return (self[i] for i in range(len(self)))

    def splits(self) -> list[str]:
        """Each shard's split, without making its items."""
        return [c[0] for c in self.cuts]


@dataclass
class Plan:
    shards: Shards
    early_rejects: list[dict[str, str]]
    inputs: int
    classes: list[str] | None
    ext: str
    content_digest: str
    layout: tuple[int, str] | None = None  # npy: the expected (channels, dtype)
    channel_names: list[str] | None = None


def make_plan(entries: EntryTable | Sequence[Any], classes: list[str] | None, options: PrepOptions,
              masks: dict[str, str] | None = None) -> Plan:
    """The plan of ``entries`` (an :class:`EntryTable`, or Entry objects in listing order).
    ``masks`` (input name -> mask URL): every input needs one; one without is rejected (``mask``)."""
    table = entries if isinstance(entries, EntryTable) else EntryTable.from_entries(entries)
    table = table.with_seed(options.seed)
    early: list[dict[str, str]] = []
    kept, content = _dedup(table, masks, options, early)  # table rows in sample order
    ext = options.format if options.format != "keep" else _dominant_format(table, kept)
    layout = None
    if ext == "npy":
        kept, layout = _check_layouts(table, kept, early)
    elif not options.to_rgb:
        _refuse_lossy(table, kept, ext)
    names = _channel_names(options.channels, layout)
    n_val = round(len(kept) * options.val_fraction)
    cuts = [("train", i, lo, hi) for i, (lo, hi) in enumerate(_cut(table, kept, n_val, len(kept), options))]
    cuts += [("val", i, lo, hi) for i, (lo, hi) in enumerate(_cut(table, kept, 0, n_val, options))]
    shards = Shards(table, kept, cuts, f"{options.digest()}:{ext}", masks)
    return Plan(shards, early, len(table), classes, ext, content, layout, names)


def _dedup(table: EntryTable, masks: dict[str, str] | None, options: PrepOptions,
           early: list[dict[str, str]]) -> tuple[np.ndarray, str]:
    """Rows kept, in sample order, and the content digest (sha256 of their sorted hex keys).

    In listing order an input is: rejected by the scan; else a duplicate when an earlier kept input
    has its bytes; else rejected for having no mask; else kept. Equal bytes have equal order keys,
    so duplicates are neighbours after the sort (checked against the full keys)."""
    for i in np.flatnonzero(table.reject >= 0):
        reason, detail = table.reject_of(int(i))
        early.append({"input": table.name(int(i)), "reason": reason, "detail": detail})
    rows = np.flatnonzero(table.reject < 0)
    rows = rows[_argsort_u64(table.order[rows, 0], lambda idx: table.order[rows[idx], 1:])]  # order key, listing
    starts = np.flatnonzero(_group_starts(table.order, rows))
    if masks is None and len(starts) == len(rows):  # the usual case: no duplicates, no masks to check
        return rows, _content_digest(table, rows)
    in_m = np.ones(len(rows), bool) if masks is None else \
        np.fromiter((table.name(int(i)) in masks for i in rows), bool, len(rows))
    first = np.minimum.reduceat(np.where(in_m, rows, _NONE), starts) if len(rows) else np.zeros(0, np.int64)
    first = np.repeat(first, np.diff(np.append(starts, len(rows))))  # [len(rows)] first kept row of the group
    keep, dup = rows == first, (first != _NONE) & (rows > first)
    if dup.any() and (table.keys[rows[dup]] != table.keys[first[dup]]).any():
        raise PrepError("two different inputs share a 128-bit order key; rerun with another --seed")
    for i, f in zip(rows[dup], first[dup]):
        early.append({"input": table.name(int(i)), "reason": DUPLICATE, "detail": f"same bytes as {table.name(int(f))}"})
    for i in rows[~keep & ~dup]:
        early.append({"input": table.name(int(i)), "reason": MASK, "detail": f"no mask for it in {options.masks!r}"})
    return rows[keep], _content_digest(table, rows[keep])


def _group_starts(order: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows)] bool: True where ``rows`` (sorted by order key) starts a new order key."""
    new = np.ones(len(rows), bool)
    hi = order[rows, 0]
    tie = np.flatnonzero(hi[1:] == hi[:-1])
    del hi
    new[tie[order[rows[tie], 1] == order[rows[tie + 1], 1]] + 1] = False
    return new


def _argsort_u64(first: np.ndarray, rest: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Stable argsort by ``first`` (uint64); ties broken by ``rest(idx)`` ([len(idx), k] uint64 columns),
    then by position. A radix sort of one column, with the (rare) ties settled apart: no N-wide temporaries
    beyond two int64 arrays."""
    perm = np.argsort(first, kind="stable")
    sorted_first = first[perm]
    pos = np.flatnonzero(sorted_first[1:] == sorted_first[:-1])
    if len(pos):
        pos = np.unique(np.concatenate([pos, pos + 1]))
        idx = perm[pos]
        cols = rest(idx)
        perm[pos] = idx[np.lexsort(tuple(cols[:, c] for c in reversed(range(cols.shape[1]))) + (sorted_first[pos],))]
    return perm


def _content_digest(table: EntryTable, kept: np.ndarray) -> str:
    """sha256 of the kept keys' hex digests in sorted order, concatenated."""
    words = table.keys.view(">u8")  # [N, 4] big-endian words of each key: their order is the bytes' order
    perm = _argsort_u64(words[kept, 0].astype(np.uint64), lambda idx: words[kept[idx], 1:].astype(np.uint64))
    h = hashlib.sha256()
    for start in range(0, len(perm), 8192):
        h.update(table.keys[kept[perm[start:start + 8192]]].tobytes().hex().encode())
    return h.hexdigest()


def _dominant_format(table: EntryTable, kept: np.ndarray) -> str:
    png = int((table.fmt[kept] == 2).sum())
    return "png" if png > len(kept) - png else "jpg"


def _check_layouts(table: EntryTable, kept: np.ndarray,
                   early: list[dict[str, str]]) -> tuple[np.ndarray, tuple[int, str] | None]:
    """``format: npy``: the layout most inputs share; every other one is rejected as ``channels``."""
    codes = table.layout[kept]
    pair_of = [(lay.channels, lay.dtype) for lay in table.layouts]
    counts: dict[tuple[int, str], int] = {}
    for code, n in zip(*np.unique(codes[codes >= 0], return_counts=True)):
        if pair_of[code][0] > 0:
            counts[pair_of[code]] = counts.get(pair_of[code], 0) + int(n)
    if not counts:
        return kept, None
    expected = max(sorted(counts), key=lambda k: counts[k])  # ties: the smaller layout, deterministically
    good = np.array([pair == expected for pair in pair_of] + [True], bool)  # index -1: no layout, the decode decides
    ok = good[codes]
    for i in np.sort(kept[~ok]):
        lay = table.layout_of(int(i))
        detail = (f"one file per channel must each hold 1 channel of one shape and dtype; expected {expected[0]} x "
                  f"{expected[1]}" if lay.channels < 0 else
                  f"had {lay.channels} x {lay.dtype}, expected {expected[0]} x {expected[1]} (the layout of most inputs)")
        early.append({"input": table.name(int(i)), "reason": CHANNELS, "detail": detail})
    return kept[ok], expected


def _refuse_lossy(table: EntryTable, kept: np.ndarray, ext: str) -> None:
    """Under jpg/png, refuse inputs that would lose channels or bit depth (unless ``to_rgb``)."""
    unsafe = np.array([not lay.rgb_safe for lay in table.layouts] + [False], bool)
    lossy = np.sort(kept[unsafe[table.layout[kept]] | (table.kind[kept] == 1)])
    if len(lossy):
        shown = "; ".join(f"{table.name(int(i))} ({lay.describe() if (lay := table.layout_of(int(i))) else 'one file per channel'})"
                          for i in lossy[:3])
        raise PrepError(
            f"{len(lossy)} input(s) would lose channels or bit depth as 8-bit RGB {ext} (e.g. {shown}). "
            "Use `format: npy` (--format npy) to keep every channel at its dtype, or pass --to-rgb "
            "(`to_rgb: true`) to convert them to 8-bit RGB on purpose.")


def _channel_names(names: list[str] | None, layout: tuple[int, str] | None) -> list[str] | None:
    if layout is None:
        return names
    if names is not None and len(names) != layout[0]:
        raise PrepError(f"channels names {len(names)} channel(s) {names}, but the inputs have {layout[0]}; "
                        f"give {layout[0]} names or none")
    return names or [str(i) for i in range(layout[0])]


def _cut(table: EntryTable, kept: np.ndarray, lo: int, hi: int, options: PrepOptions) -> list[tuple[int, int]]:
    """[lo, hi) of ``kept`` in consecutive runs of at most shard_size samples (or of at most shard_bytes
    input bytes, at least one sample each)."""
    limit = options.output_options()
    if limit["shard_size"]:
        return [(a, min(a + limit["shard_size"], hi)) for a in range(lo, hi, limit["shard_size"])]
    ends = np.concatenate([[0], np.cumsum(table.size[kept[lo:hi]])])  # bytes before each member
    out, a = [], 0
    while a < hi - lo:
        b = max(a + 1, int(np.searchsorted(ends, ends[a] + limit["shard_bytes"], side="right")) - 1)
        out.append((lo + a, lo + b))
        a = b
    return out

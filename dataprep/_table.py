"""Scan results as columns: what the driver holds per input, ~120 bytes instead of ~930 as objects.

A scan task turns its :class:`~dataprep._sources.Entry` list into an :class:`EntryTable` before it
returns, so the driver never holds one Python object per input: names are one UTF-8 blob with
offsets, keys raw 32-byte digests, refs a kind code + an index into a URL list + two integers,
labels, formats, rejects and layouts small codes into per-table value lists. ``order`` is the first
16 bytes of ``sha256(f"{seed}:{key}")``, the plan's sort key, computed where the key is.

The per-input numbers (names of ~25 characters, a Parquet source) are measured by
``bench/scale_bench.py``; see bench/RESULTS.md "scale".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._arrays import Layout

_KINDS = ("f", "m", "t", "p")  # ref kinds: file, one file per channel, tar member, Parquet row
_FORMATS = (None, "jpg", "png")


def order_key(seed: int, key: str) -> bytes:
    """The plan's sort key of one sample key: the first 16 bytes of ``sha256(f"{seed}:{key}")``."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[:16]


@dataclass
class EntryTable:
    """Columns of scan entries, in listing order. Build with :meth:`from_entries` / :meth:`concat`."""

    names: bytes                     # UTF-8 of every name, concatenated
    name_end: np.ndarray             # [N] int64, end offset of name i in ``names``
    keys: np.ndarray                 # [N, 32] uint8 raw sha256 (zeros where rejected)
    order: np.ndarray                # [N, 2] uint64 (big-endian halves of order_key; zeros where rejected)
    seed: int | None                 # the seed ``order`` was computed with
    kind: np.ndarray                 # [N] uint8 index into _KINDS
    url: np.ndarray                  # [N] int32 index into ``urls``
    ref_a: np.ndarray                # [N] int64 (tar offset / row group)
    ref_b: np.ndarray                # [N] int64 (tar size / row in the group)
    size: np.ndarray                 # [N] int64 input bytes
    fmt: np.ndarray                  # [N] uint8 index into _FORMATS
    reject: np.ndarray               # [N] int16: -1 = none, else index into ``reasons``
    label: np.ndarray                # [N] int32: -1 = none, else index into ``label_values``
    layout: np.ndarray               # [N] int32: -1 = none, else index into ``layouts``
    urls: list[Any] = field(default_factory=list)          # str, or a tuple of str for kind "m"
    reasons: list[str] = field(default_factory=list)
    label_values: list[Any] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    details: dict[int, str] = field(default_factory=dict)  # row -> reject detail

    def __len__(self) -> int:
        return len(self.name_end)

    # ---- building ------------------------------------------------------------------------------

    @staticmethod
    def from_entries(entries: Sequence[Any], seed: int | None = None) -> "EntryTable":
        """Columns of ``entries`` (Entry objects); ``seed``: compute ``order`` now (else :meth:`with_seed`)."""
        urls, reasons, labels, layouts = _Codes(), _Codes(), _Codes(), _Codes()
        n = len(entries)
        enc = [e.name.encode() for e in entries]
        keys = np.zeros((n, 32), np.uint8)
        cols = {c: np.zeros(n, np.int64 if c in ("ref_a", "ref_b", "size") else np.int32)
                for c in ("url", "ref_a", "ref_b", "size", "label", "layout")}
        kind, fmt, reject = np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.full(n, -1, np.int16)
        details = {}
        for i, e in enumerate(entries):
            kind[i] = _KINDS.index(e.ref[0])
            cols["url"][i] = urls.code(e.ref[1])
            if len(e.ref) > 2:
                cols["ref_a"][i], cols["ref_b"][i] = e.ref[2], e.ref[3]
            if e.key is not None:
                keys[i] = np.frombuffer(bytes.fromhex(e.key), np.uint8)
            cols["size"][i] = e.size
            fmt[i] = _FORMATS.index(e.fmt)
            if e.reject:
                reject[i] = reasons.code(e.reject)
                if e.detail:
                    details[i] = e.detail
            cols["label"][i] = -1 if e.label is None else labels.code(e.label)
            cols["layout"][i] = -1 if e.layout is None else layouts.code(e.layout)
        table = EntryTable(b"".join(enc), np.cumsum([len(b) for b in enc], dtype=np.int64), keys,
                           np.zeros((n, 2), np.uint64), None, kind, cols["url"], cols["ref_a"], cols["ref_b"],
                           cols["size"], fmt, reject, cols["label"], cols["layout"], urls.values, reasons.values,
                           labels.values, layouts.values, details)
        return table.with_seed(seed) if seed is not None else table

    def with_seed(self, seed: int) -> "EntryTable":
        """``order`` computed for ``seed`` (itself when it already is)."""
        if self.seed == seed:
            return self
        order = np.zeros((len(self), 2), np.uint64)
        for i in np.flatnonzero(self.reject < 0):
            order[i] = np.frombuffer(order_key(seed, self.keys[i].tobytes().hex()), ">u8")
        self.order, self.seed = order, seed
        return self

    def drop_order(self) -> None:
        """Release ``order`` (16 bytes per input) once the plan is made; :meth:`with_seed` recomputes it."""
        self.order, self.seed = np.zeros((0, 2), np.uint64), None

    @staticmethod
    def concat(tables: list["EntryTable"]) -> "EntryTable":
        """One table of ``tables`` in order. Consumes them: each one's columns are released as they are
        copied, so the driver peaks at about one table's worth above the result."""
        if not tables:
            return EntryTable.from_entries([])
        seeds = {t.seed for t in tables}
        seed = seeds.pop() if len(seeds) == 1 else None  # None: orders of different seeds, left to with_seed
        urls, reasons, labels, layouts = _Codes(), _Codes(), _Codes(), _Codes()
        remap = {"url": [], "reject": [], "label": [], "layout": []}
        details, base = {}, 0
        for t in tables:
            remap["url"].append(np.array([urls.code(u) for u in t.urls], np.int32))
            remap["reject"].append(np.array([reasons.code(r) for r in t.reasons], np.int16))
            remap["label"].append(np.array([labels.code(v) for v in t.label_values], np.int32))
            remap["layout"].append(np.array([layouts.code(v) for v in t.layouts], np.int32))
            details.update({base + i: d for i, d in t.details.items()})
            base += len(t)
        out: dict[str, Any] = {}
        lengths = [len(t) for t in tables]
        ends = []
        for t, start in zip(tables, np.cumsum([0] + [len(t.names) for t in tables[:-1]])):
            ends.append(t.name_end + start)
            t.name_end = None  # type: ignore[assignment]
        out["name_end"] = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        out["names"] = b"".join(t.names for t in tables)
        for col in ("keys", "order", "kind", "ref_a", "ref_b", "size", "fmt", "url", "reject", "label", "layout"):
            parts, dtype = [], getattr(tables[0], col).dtype
            for i, t in enumerate(tables):
                part = getattr(t, col)
                if col in remap:
                    part = _remap(part, remap[col][i], col == "url")
                parts.append(part.astype(dtype, copy=False))
                setattr(t, col, None)
            out[col] = np.concatenate(parts)
        assert len(out["kind"]) == sum(lengths)
        if seed is None:
            out["order"] = np.zeros((len(out["kind"]), 2), np.uint64)
        return EntryTable(seed=seed, urls=urls.values, reasons=reasons.values, label_values=labels.values,
                          layouts=layouts.values, details=details, **out)

    # ---- reading one row back ------------------------------------------------------------------

    def name(self, i: int) -> str:
        start = int(self.name_end[i - 1]) if i else 0
        return self.names[start:int(self.name_end[i])].decode()

    def key(self, i: int) -> str | None:
        return None if self.reject[i] >= 0 else self.keys[i].tobytes().hex()

    def ref(self, i: int) -> tuple:
        kind = _KINDS[self.kind[i]]
        url = self.urls[self.url[i]]
        return (kind, url) if kind in ("f", "m") else (kind, url, int(self.ref_a[i]), int(self.ref_b[i]))

    def label_of(self, i: int) -> Any:
        return None if self.label[i] < 0 else self.label_values[self.label[i]]

    def layout_of(self, i: int) -> Layout | None:
        return None if self.layout[i] < 0 else self.layouts[self.layout[i]]

    def reject_of(self, i: int) -> tuple[str, str] | None:
        return None if self.reject[i] < 0 else (self.reasons[self.reject[i]], self.details.get(i, ""))

    def item(self, i: int) -> tuple[str, str, tuple, Any]:
        """(key, name, ref, label): one :class:`~dataprep._writer.ShardPlan` item."""
        return self.key(i), self.name(i), self.ref(i), self.label_of(i)

    def fmt_of(self, i: int) -> str | None:
        return _FORMATS[self.fmt[i]]

    def nbytes(self) -> int:
        """Bytes held by the columns (the per-table value lists excluded)."""
        arrays = (self.name_end, self.keys, self.order, self.kind, self.url, self.ref_a, self.ref_b, self.size,
                  self.fmt, self.reject, self.label, self.layout)
        return len(self.names) + sum(a.nbytes for a in arrays)


def _remap(part: np.ndarray, codes: np.ndarray, always: bool) -> np.ndarray:
    """A table's codes -> the merged table's (``-1`` = none stays, unless every row has one)."""
    if always or not len(codes):
        return codes[part] if len(part) and len(codes) else part
    return np.where(part >= 0, codes[np.maximum(part, 0)], part)


class _Codes:
    """Values -> small integer codes, first seen first (``1`` and ``"1"`` stay distinct)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._index: dict[Any, int] = {}

    def code(self, value: Any) -> int:
        k = (type(value), value)
        if k not in self._index:
            self._index[k] = len(self.values)
            self.values.append(value)
        return self._index[k]

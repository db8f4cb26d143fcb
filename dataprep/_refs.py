"""Reading one sample back inside a shard task: tar members by byte range, Parquet rows from their row
group (cached per worker, :class:`_RowGroupCache`), files whole. Refs are made by the scan
(:mod:`dataprep._sources`, which names their forms)."""

from __future__ import annotations

import os
import threading
from typing import Any

from ._sources import _image_bytes, _parquet_columns, read_url, store_for

ROW_GROUP_CACHE_ENV = "VITFORGE_PREP_ROW_GROUP_CACHE_BYTES"
_ROW_GROUP_CACHE_DEFAULT = 1 << 30


class _RowGroupCache:
    """Decoded Parquet row groups kept across the shard tasks of one worker process and one prep
    output (:meth:`scope`), up to ``$VITFORGE_PREP_ROW_GROUP_CACHE_BYTES`` (default 1 GiB; 0: off).

    The plan orders samples by hash, so every shard draws rows from every Parquet file of the source;
    without it each shard task reads each row group it touches whole (bench/RESULTS.md "scale"). Every
    shard walks the groups in the same order, so a group is admitted only while there is room (least
    recently used eviction would evict each group just before its next use): a source larger than the
    budget has that fraction of its groups served from memory. Keys carry the file's size and
    modification stamp, so a file rewritten in place is read afresh."""

    def __init__(self) -> None:
        self._groups: dict[tuple, list[bytes | None]] = {}
        self._bytes = 0
        self._scope: str | None = None
        self._lock = threading.Lock()

    def scope(self, name: str) -> None:
        """Start serving ``name`` (a prep output URL): groups cached for another one are dropped."""
        with self._lock:
            if name != self._scope:
                self._groups, self._bytes, self._scope = {}, 0, name

    @staticmethod
    def budget() -> int:
        value = os.environ.get(ROW_GROUP_CACHE_ENV, "").strip()
        return int(value) if value else _ROW_GROUP_CACHE_DEFAULT

    def get(self, key: tuple) -> list[bytes | None] | None:
        with self._lock:
            return self._groups.get(key)

    def put(self, key: tuple, rows: list[bytes | None]) -> None:
        size = sum(len(r) for r in rows if r) + 64 * len(rows)
        with self._lock:
            if key not in self._groups and self._bytes + size <= self.budget():
                self._groups[key] = rows
                self._bytes += size


_ROW_GROUPS = _RowGroupCache()


def row_group_cache() -> _RowGroupCache:
    """This worker process's :class:`_RowGroupCache`."""
    return _ROW_GROUPS


class RefReader:
    """Reads refs back inside one shard task; keeps tar handles it has opened, and Parquet row groups
    in the worker's :class:`_RowGroupCache`."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}
        self._stamps: dict[str, tuple] = {}
        self._last: tuple[tuple | None, list[bytes | None]] = (None, [])

    def read_parts(self, ref: tuple) -> list[bytes]:
        """The bytes of a sample: one part, or one per channel for a ``("m", urls)`` ref."""
        return [read_url(url) for url in ref[1]] if ref[0] == "m" else [self.read(ref)]

    def read(self, ref: tuple) -> bytes:
        kind = ref[0]
        if kind == "f":
            return read_url(ref[1])
        if kind == "t":
            f = self._open(ref[1])
            f.seek(ref[2])
            return f.read(ref[3])
        return self._row_group(ref[1], ref[2])[ref[3]] or b""

    def _open(self, url: str):
        if url not in self._files:
            store, path = store_for(url)
            self._files[url] = store.open_read(path)
        return self._files[url]

    def _stamp(self, url: str) -> tuple:
        """(size, modification stamp) of the file at ``url``: part of its row groups' cache key."""
        if url not in self._stamps:
            store, path = store_for(url)
            info = store.fs.info(path)
            self._stamps[url] = (info.get("size"), str(info.get("ETag") or info.get("mtime") or
                                                        info.get("LastModified") or info.get("created") or ""))
        return self._stamps[url]

    def _row_group(self, url: str, rg: int) -> list[bytes | None]:
        key = (url, rg, *self._stamp(url))
        if self._last[0] == key:  # refs come sorted: the group just read, even one too big to cache
            return self._last[1]
        rows = _ROW_GROUPS.get(key)
        if rows is None:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self._open(url))
            image_col, _ = _parquet_columns(pf.schema_arrow, url)
            rows = _image_bytes(pf.read_row_group(rg, columns=[image_col]).column(0).to_pylist())
            _ROW_GROUPS.put(key, rows)
        self._last = (key, rows)
        return rows

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._last = (None, [])

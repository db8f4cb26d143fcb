"""A training stage's per-step records: written as numbered append-only chunks, read back as one stream.

Store layout (``<stage_url>/``, names from :mod:`jobs.layout`)::

    metrics/00000000.jsonl     chunk 0: one JSON record per line, ``step`` increasing
    metrics/00000001.jsonl     chunk 1: the next lines, published once, never rewritten
    metrics.jsonl              the single file of runs written before chunks (read, never written)

Contracts
---------
* The writer (:class:`MetricsLog`, rank 0) keeps only the lines it has not published yet; each
  publish uploads them as the next chunk, so memory is bounded by one chunk and the bytes uploaded
  over a stage are the bytes of its lines (O(steps)), not the whole history at every publish.
* A checkpoint carries the lines not yet known to be in a chunk (at most the lines since the last
  publish); a resume hands them back to :meth:`MetricsLog.restore` and the writer continues after
  the highest chunk number in the store.
* **A chunk supersedes everything from its first step on.** A run killed after its last commit leaves
  a tail of records for steps it never committed; the resumed attempt replays those steps, and its
  first chunk starts at or before them, so :func:`read_metrics` drops the old tail and every step
  appears once, in order. Until a resume replays them the uncommitted records stay readable (they
  are what the killed attempt measured).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from cluster.storage import Store
from jobs.layout import METRICS_DIR_NAME, METRICS_NAME, metrics_chunk_index, metrics_chunk_name

log = logging.getLogger(__name__)

CHUNK_LINES = 1000   # a publish is forced after this many unpublished lines (bounds the writer's memory)


# ---- reading ----------------------------------------------------------------------------------------


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The records of JSON-lines ``text``; a line that does not parse is skipped (a cut final line)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def chunk_indices(store: Store) -> list[int]:
    """The chunk numbers under ``<stage>/metrics/``, in order."""
    found = (metrics_chunk_index(name) for name in store.ls(METRICS_DIR_NAME))
    return sorted(i for i in found if i is not None)


def merge(parts: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate chunks in order; a chunk whose first step is at or before the last one kept replaces
    the records from that step on (a resumed attempt's replay supersedes the tail it replays)."""
    records: list[dict[str, Any]] = []
    for part in parts:
        if part and records:
            first = part[0].get("step", 0)
            while records and records[-1].get("step", 0) >= first:
                records.pop()
        records.extend(part)
    return records


def _legacy(store: Store, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """The records of an older run's single ``metrics.jsonl`` (its last ``tail_bytes`` only, if given)."""
    try:
        size = store.size(METRICS_NAME)
    except FileNotFoundError:
        return []
    with store.open_read(METRICS_NAME) as f:
        if tail_bytes is not None and size > tail_bytes:
            f.seek(size - tail_bytes)
        text = f.read().decode(errors="replace")
    if tail_bytes is not None and size > tail_bytes:
        text = text.split("\n", 1)[-1]  # drop the partial first line
    return parse_lines(text)


def read_metrics(store: Store, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """Every record of the stage at ``store`` (its URL is the stage directory), one per step, in order.

    ``tail_bytes``: read only the newest chunks, enough to cover that many bytes (at least one chunk),
    for views that need the last records only (``vitforge status``).
    """
    indices = chunk_indices(store)
    if tail_bytes is None:
        return merge([_legacy(store), *(_chunk(store, i) for i in indices)])
    parts, size = [], 0
    for i in reversed(indices):
        data = _chunk_bytes(store, i)
        parts.append(parse_lines(data.decode()))
        size += len(data)
        if size >= tail_bytes:
            return merge(reversed(parts))
    return merge([_legacy(store, tail_bytes - size), *reversed(parts)])


def _chunk_bytes(store: Store, index: int) -> bytes:
    try:
        return store.get_bytes(metrics_chunk_name(index))
    except FileNotFoundError:  # deleted between the listing and the read: nothing to add
        return b""


def _chunk(store: Store, index: int) -> list[dict[str, Any]]:
    return parse_lines(_chunk_bytes(store, index).decode())


# ---- writing ----------------------------------------------------------------------------------------


class MetricsLog:
    """Rank 0's per-step records: buffered until :meth:`publish`, then uploaded as the next chunk.

    ``enabled=False`` (every other rank) records nothing. Only the unpublished lines are held
    (at most ``chunk_lines`` plus those of a failed upload, which the next publish retries).
    """

    def __init__(self, store: Store, enabled: bool, chunk_lines: int = CHUNK_LINES) -> None:
        self.store, self.enabled, self.chunk_lines = store, enabled, chunk_lines
        self.tail: list[str] = []          # lines not yet handed to an upload
        self._inflight: list[str] = []     # lines of the upload running now (or of the last failed one)
        self._next: int | None = None      # the next chunk's number (after the store's highest, found once)
        self._upload: threading.Thread | None = None

    def restore(self, text: str, upto_step: int) -> None:
        """Resume: ``text`` is a checkpoint's unpublished lines; those after ``upto_step`` are dropped."""
        self.tail = [ln for ln in text.splitlines() if ln and json.loads(ln)["step"] <= upto_step]

    def add(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.tail.append(json.dumps(record, sort_keys=True))
        if len(self.tail) >= self.chunk_lines:
            self.publish(sync=False)

    def held_lines(self) -> int:
        """How many lines the writer holds in memory (the unpublished tail and an upload in flight)."""
        return len(self.tail) + len(self._inflight)

    def unpublished_text(self) -> str:
        """The lines not yet known to be in a chunk (waits for an upload in flight): what a checkpoint keeps."""
        self._join()
        return "".join(ln + "\n" for ln in (*self._inflight, *self.tail))

    def publish(self, sync: bool = False) -> None:
        """Upload the unpublished lines as the next chunk (in the background unless ``sync``; a sync
        publish raises its upload's error, a background one logs it and the next publish retries)."""
        if not self.enabled:
            return
        self._join()
        if not (self._inflight or self.tail):
            return
        self._inflight, self.tail = [*self._inflight, *self.tail], []
        if sync:
            self._put(raise_errors=True)
            return
        self._upload = threading.Thread(target=self._put, daemon=True, name="metrics-upload")
        self._upload.start()

    def _join(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None

    def _put(self, raise_errors: bool = False) -> None:
        try:
            if self._next is None:  # once per attempt: continue after the highest chunk in the store
                self._next = (chunk_indices(self.store) or [-1])[-1] + 1
            name = metrics_chunk_name(self._next)
            self.store.check_fence(name, "write")  # a writer that lost the run's lease publishes nothing
            self.store.put_bytes(name, "".join(ln + "\n" for ln in self._inflight).encode())
        except Exception as exc:  # kept in _inflight: the next publish retries under the same number
            if raise_errors:
                raise
            log.warning("could not upload metrics chunk %s of %s: %s", self._next, self.store.url_of(METRICS_DIR_NAME),
                        exc)
            return
        self._inflight, self._next = [], self._next + 1

"""Reading WebDataset tar shards: streamed (with read-ahead) or through a size-limited local cache.

A shard is read sequentially once per reader, keeping only the samples the reader needs and
stopping after the last one. Samples are grouped WebDataset-style: members sharing a key (the
path up to the first dot of the file name) form one sample; the sample's index in the shard
is the order in which its key first appears, which is what the manifest counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import posixpath
import re
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Iterable

from cluster.storage import Store, StorageNotFoundError, classify
from cluster.lease import pid_alive
from dataprep._bounds import HashingReader, member_cap
from dataprep._tar import TarMembers

log = logging.getLogger(__name__)

# the members (and source files) that hold a sample: images, and [C, H, W] arrays (.npy, format: npy)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "npy")


class ShardError(RuntimeError):
    """A shard or a sample in it could not be read. The message names the shard (and key)."""


class MissingShardError(ShardError, FileNotFoundError):
    """A shard the manifest lists does not exist in the store."""


@dataclass
class RawSample:
    """One sample's undecoded bytes. ``error`` is set (and ``image`` is None) when it is unusable."""

    shard: str
    index: int
    key: str | None
    image: bytes | None = None
    ext: str = ""
    label: int = -1
    error: str | None = None
    mask: bytes | None = None  # <key>.mask.png, when the shards carry segmentation masks


def _split_name(name: str) -> tuple[str, str]:
    base = posixpath.basename(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(posixpath.dirname(name), stem), ext.lower()


def unsafe_member_name(name: str) -> bool:
    """Whether a tar member name is absolute or climbs with ``..`` (never trusted, even as a key)."""
    return name.startswith("/") or ".." in name.split("/")


def _make_sample(shard: str, index: int, key: str, members: dict[str, bytes]) -> RawSample:
    sample = RawSample(shard, index, key)
    if "_refused" in members:
        sample.error = members["_refused"].decode()
        return sample
    if unsafe_member_name(key):
        sample.error = "unsafe member name (absolute or containing '..'): refused"
        return sample
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        sample.error = f"no image member (has {sorted(members) or 'nothing'})"
        return sample
    sample.image, sample.ext = members[ext], ext
    sample.mask = members.get("mask.png")
    if "cls" in members:
        try:
            sample.label = int(members["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            sample.error = f"label {members['cls'][:20]!r} is not an integer"
    return sample


def parse_shard(fileobj: IO[bytes], shard: str, needed: set[int], expected: int,
                max_member: int | None = None) -> dict[int, RawSample]:
    """The needed samples of one tar, by index. Unreadable ones come back with ``error`` set.

    Reading stops after the largest needed index. A truncated or garbled tar marks the sample
    being read and every needed sample after it (up to ``expected``) as errors. A member whose
    header claims more than ``max_member`` bytes is refused without reading it (its sample errs).
    """
    out: dict[int, RawSample] = {}
    last = max(needed) if needed else -1
    index, key, members = -1, None, {}
    failure: str | None = None
    try:
        tar = TarMembers(fileobj)
        for name, size, is_file in tar:
            if not is_file:
                continue
            mkey, ext = _split_name(name)
            if mkey != key:
                if index in needed and key is not None:
                    out[index] = _make_sample(shard, index, key, members)
                index, key, members = index + 1, mkey, {}
                if index > last:
                    break
            if index in needed and max_member is not None and size > max_member:
                members.setdefault("_refused", f"member {name!r} claims {size} bytes, more than the cap of "
                                               f"{max_member} (the shard's size, or VITFORGE_MAX_MEMBER_BYTES): "
                                               "refused unread".encode())
                continue
            if index in needed:
                members[ext] = tar.data()
        else:
            if index in needed and key is not None:
                out[index] = _make_sample(shard, index, key, members)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) or classify(exc) == "transient":
            raise  # a network fault is not a bad shard: the caller retries the read
        failure = f"shard is truncated or corrupt after {max(index, 0)} complete samples ({type(exc).__name__}: {exc})"
        if index in needed:  # a refused member's own reason first: skipping past it is what failed
            out[index] = _make_sample(shard, index, key, members) if "_refused" in members else \
                RawSample(shard, index, key, error=failure)
    for i in needed:
        if i not in out:
            reason = failure or f"shard has fewer samples than the manifest's {expected} (ends after {index + 1})"
            out[i] = RawSample(shard, i, None, error=reason)
    return out


class ShardCache:
    """Whole shards on local disk, evicted least-recently-used to stay under ``limit_bytes``.

    Safe to share between processes (DataLoader workers, ranks on one node). A download first
    *reserves* its size (a placeholder file whose name carries the size) under a directory-wide
    lock, evicting old shards to make room, so finished shards plus downloads in flight never
    exceed the limit; one shard's concurrent downloads are serialised by its own lock file.
    Readers open a file under the directory lock and keep it open, so eviction (an unlink)
    never pulls bytes from under a reader.
    """

    _RESERVED = ".resv-"

    def __init__(self, directory: str, limit_bytes: int | None = None) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes
        os.makedirs(directory, exist_ok=True)

    def _path(self, name: str, sha256: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        return os.path.join(self.directory, f"{sha256[:16] or 'nosha'}-{safe}")

    @contextlib.contextmanager
    def _locked(self, path: str):
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _dir_lock(self):
        return self._locked(os.path.join(self.directory, ".cache.lock"))

    def open(self, store: Store, name: str, sha256: str, size: int) -> IO[bytes] | None:
        """An open local copy of shard ``name``, downloading it if needed; None if it cannot fit now."""
        path = self._path(name, sha256)
        with self._locked(path + ".lock"):
            handle = self._open_cached(path, size)
            if handle is not None:
                return handle
            reservation = self._reserve(path, size)
            if reservation is None:
                return None
            try:
                try:
                    store.get_file(name, reservation)
                except (FileNotFoundError, StorageNotFoundError):
                    raise MissingShardError(f"shard {store.url_of(name)} is listed in the manifest but "
                                            "does not exist; re-run the prep stage or fix the manifest") from None
                with self._dir_lock():
                    os.replace(reservation, path)
                    return open(path, "rb")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(reservation)

    def _open_cached(self, path: str, size: int) -> IO[bytes] | None:
        with self._dir_lock():
            if os.path.exists(path) and os.path.getsize(path) == size:
                os.utime(path)  # most recently used
                return open(path, "rb")
        return None

    def _reserve(self, path: str, size: int) -> str | None:
        """Make room for ``size`` bytes and claim it with a placeholder; None if it cannot fit."""
        if self.limit_bytes is not None and size > self.limit_bytes:
            return None
        with self._dir_lock():
            if self.limit_bytes is not None and not self._evict_for(size):
                return None
            reservation = f"{path}{self._RESERVED}{size}-{os.getpid()}-{threading.get_ident()}"
            open(reservation, "wb").close()
        return reservation

    def _evict_for(self, size: int) -> bool:
        """Delete least-recently-used shards until ``size`` more bytes fit. Call under the dir lock."""
        finished, reserved = [], 0
        for entry in os.listdir(self.directory):
            full = os.path.join(self.directory, entry)
            if ".part-" in entry or entry.endswith(".lock"):
                continue  # a download's temp file: its reservation already counts it
            if self._RESERVED in entry:
                with contextlib.suppress(ValueError, IndexError):
                    size_s, pid_s = entry.split(self._RESERVED, 1)[1].split("-")[:2]
                    if not pid_alive(int(pid_s)):  # a download killed with -9: its claim is void
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(full)
                        log.info("shard cache: reclaimed the reservation of dead process %s (%s)", pid_s, entry)
                        continue
                    reserved += int(size_s)
            else:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(full)
                    finished.append((st.st_mtime, full, st.st_size))
        total = reserved + sum(f[2] for f in finished)
        for _, full, nbytes in sorted(finished):
            if total + size <= self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)
            total -= nbytes
        return total + size <= self.limit_bytes

    def usage(self) -> int:
        """Bytes of finished shards in the cache."""
        return sum(os.path.getsize(os.path.join(self.directory, e)) for e in os.listdir(self.directory)
                   if not e.endswith(".lock") and ".part-" not in e and self._RESERVED not in e)


@dataclass(frozen=True)
class ShardRef:
    name: str
    samples: int
    bytes: int
    sha256: str


class ShardSource:
    """Opens shards of one manifest directory: from the cache when there is one, else streamed."""

    def __init__(self, root_url: str, storage_options: dict | None, cache: ShardCache | None,
                 block_size: int = 8 << 20, verify: bool = True, max_member_bytes: int | None = None) -> None:
        self.root_url, self.storage_options, self.cache, self.block_size = root_url, storage_options, cache, block_size
        self.verify, self.max_member_bytes = verify, max_member_bytes  # sha256 against the manifest; member cap
        self.mismatched: set[str] = set()
        self._store: Store | None = None
        self._pid = -1
        self.bytes_read = 0

    @property
    def store(self) -> Store:
        if self._store is None or self._pid != os.getpid():  # a fresh client per process (fork safety)
            self._store, self._pid = Store(self.root_url, self.storage_options), os.getpid()
        return self._store

    def read(self, shard: ShardRef, needed: set[int]) -> dict[int, RawSample]:
        """The needed samples of ``shard``; transient network faults re-read it (outage window)."""
        policy = self.store.retry
        deadline, backoff = time.monotonic() + policy.outage_window_s, policy.first_backoff_s
        while True:
            try:
                return self._read_once(shard, needed)
            except Exception as exc:  # only transient faults are retried; everything else propagates
                if classify(exc) != "transient" or time.monotonic() + backoff > deadline:
                    raise
                log.warning("reading shard %s failed (%s), retrying in %.1fs", shard.name, type(exc).__name__, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, policy.max_backoff_s)

    def _read_once(self, shard: ShardRef, needed: set[int]) -> dict[int, RawSample]:
        handle = self.cache.open(self.store, shard.name, shard.sha256, shard.bytes) if self.cache else None
        if handle is None:
            try:
                handle = self.store.open_read(shard.name, block_size=self.block_size)
            except (FileNotFoundError, StorageNotFoundError):
                raise MissingShardError(f"shard {self.store.url_of(shard.name)} is listed in the manifest but does "
                                        "not exist; re-run the prep stage or fix the manifest") from None
        with handle:
            counted = HashingReader(handle)
            out = parse_shard(counted, shard.name, needed, shard.samples, member_cap(shard.bytes, self.max_member_bytes))
            actual = counted.finish_hash() if self.verify and shard.sha256 else None
            self.bytes_read += counted.count
        if actual is not None and actual != shard.sha256:
            # nothing of a shard that is not the one prep wrote is served: every needed sample errs
            reason = (f"shard {self.store.url_of(shard.name)} does not match the manifest's sha256 (expected "
                      f"{shard.sha256[:16]}..., read {actual[:16]}...): changed after prep; re-run the prep stage")
            self.mismatched.add(shard.name)
            return {i: RawSample(shard.name, i, s.key, error=reason) for i, s in out.items()}
        return out


class SampleFetcher:
    """Serves one reader's samples in the order it will ask for them, reading shards ahead.

    ``plan`` is the full list of (shard index, sample index in shard) the reader will take, in
    order. Shards are loaded in order of first need, ``readahead`` at a time in background
    threads; a shard's bytes are dropped as soon as its last needed sample was taken.
    """

    def __init__(self, source: ShardSource, shards: list[ShardRef], plan: Iterable[tuple[int, int]],
                 readahead: int = 2) -> None:
        self.source, self.shards = source, shards
        self._needed: dict[int, set[int]] = {}
        self._uses: dict[int, int] = {}
        order: list[int] = []
        for s, i in plan:
            if s not in self._needed:
                self._needed[s] = set()
                order.append(s)
            self._needed[s].add(i)
            self._uses[s] = self._uses.get(s, 0) + 1
        self._queue = order
        self._next = 0
        self._loaded: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, readahead), thread_name_prefix="shard-read")
        self._readahead = max(1, readahead)
        self._touched: set[int] = set()

    def _submit_next(self) -> None:
        s = self._queue[self._next]
        self._next += 1
        self._loaded[s] = self._pool.submit(self.source.read, self.shards[s], self._needed[s])

    def _fill(self) -> None:
        """Keep ``readahead`` shards loading beyond the ones already being taken from."""
        while self._next < len(self._queue) and len(self._loaded.keys() - self._touched) < self._readahead:
            self._submit_next()

    def take(self, shard: int, index: int) -> RawSample:
        while shard not in self._loaded and self._next < len(self._queue):
            self._submit_next()
        if shard not in self._loaded:  # asked outside the announced plan: load just this sample
            self._loaded[shard] = self._pool.submit(self.source.read, self.shards[shard], {index})
            self._uses[shard] = 1
        self._touched.add(shard)
        self._fill()
        samples = self._loaded[shard].result()
        self._uses[shard] -= 1
        if self._uses[shard] <= 0:
            del self._loaded[shard]
            self._touched.discard(shard)
            self._fill()
        return samples[index]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

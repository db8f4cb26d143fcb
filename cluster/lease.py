"""One writer per run root: a lease object with a heartbeat and a generation that fences a stale writer.

``<run_root>/LEASE.json`` holds ``{owner, host, pid, started_at, heartbeat_at, generation, released}``.

* :meth:`Lease.acquire` creates it, or takes over one whose heartbeat is older than the stale bound
  (``VITFORGE_LEASE_STALE_S``, default 300 s, above the 120 s storage outage window so a writer
  waiting out an outage is not declared dead), that its holder released, or whose holder is a dead
  process of this same host (a ``kill -9``'d driver rerun at once on its machine). A takeover writes
  ``generation + 1``. A live lease raises :class:`LeaseHeldError` naming the holder and the age of
  its heartbeat (``vitforge run`` / ``submit`` exit 2).
* While held, a daemon thread renews ``heartbeat_at`` every ``stale_s / 10`` (at least 0.2 s).
* **Fencing.** Every process of the run (the driver and each gang worker) registers the generation it
  works for with :func:`install_fence`; :func:`cluster.storage.commit`, :func:`~cluster.storage.write_latest`,
  :meth:`~cluster.storage.Store.delete` and STATUS writes call :meth:`Store.check_fence`, which reads
  the lease and raises :class:`LeaseLostError` when it names another generation or owner. A zombie
  (a writer frozen past the bound, then resumed) therefore commits and deletes nothing after a takeover.

Which mechanism makes the lease a compare-and-swap, per store:

* **S3** (checked against SeaweedFS 4.x and the AWS API): ``PutObject`` with ``If-None-Match: *``
  creates it only if absent, ``If-Match: <etag>`` updates it only if nobody wrote it since we read
  it; a lost race is ``412 PreconditionFailed`` (``409 ConditionalRequestConflict`` on AWS).
* **Local paths / file://**: creation with ``O_CREAT|O_EXCL``; updates are read-compare-write under
  an exclusive ``flock`` on ``LEASE.json.lock``. This is atomic between processes of one host
  (and on local disks); on NFS, ``flock`` may not be honoured across hosts.
* **Other fsspec stores** (no conditional write): the lease is written unconditionally and read
  back; two writers starting within one round trip may both believe they hold it. Fencing still
  stops a writer as soon as it reads a newer generation.

What fencing cannot give: a check and the write it guards are two requests, so a writer frozen
*between* the two (a window of one GET) can still land that one write after a takeover. Checkpoint
commits additionally record the generation in ``COMMITTED``.
Heartbeat ages compare the holder's wall clock with the reader's: hosts must agree on the time to
well within the bound (S3 itself refuses requests more than 15 minutes off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ._retry import _error_code
from .storage import Store, StorageError, register_fence

log = logging.getLogger(__name__)

LEASE = "LEASE.json"
STALE_ENV = "VITFORGE_LEASE_STALE_S"
DEFAULT_STALE_S = 300.0
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class LeaseHeldError(RuntimeError):
    """Another live writer holds the run root's lease (the CLI exits 2)."""


class LeaseLostError(StorageError):
    """This writer's lease was taken over: it must not commit, update ``latest``, delete or write STATUS."""


def stale_after_s() -> float:
    """The stale bound: ``$VITFORGE_LEASE_STALE_S`` or 300 s."""
    raw = os.environ.get(STALE_ENV, "").strip()
    if not raw:
        return DEFAULT_STALE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALE_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{STALE_ENV}={raw!r} must be > 0 seconds")
    return value


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    generation: int
    released: bool = False

    @classmethod
    def parse(cls, data: bytes, where: str) -> "LeaseRecord":
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"lease {where} is corrupt ({exc}); if no run is writing this run root, delete "
                               f"it and run again") from None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    def holder(self) -> str:
        return f"{self.owner} (pid {self.pid} on {self.host}, generation {self.generation})"


# ---- compare-and-swap per store ------------------------------------------------------------------


class _Cas:
    """Read / create-if-absent / replace-if-unchanged of one small object. ``tag`` identifies a version."""

    def __init__(self, store: Store, rel: str) -> None:
        self.store, self.rel = store, rel

    def read(self) -> tuple[bytes, str] | None:
        if self.store.protocol == "s3":
            return self._s3_read()
        if self.store.protocol == "file":
            with contextlib.suppress(FileNotFoundError):
                with open(self.store.path(self.rel), "rb") as f:
                    data = f.read()
                return data, str(hash(data))
            return None
        with contextlib.suppress(FileNotFoundError):
            data = self.store.get_bytes(self.rel)
            return data, str(hash(data))
        return None

    def swap(self, expect_tag: str | None, data: bytes) -> bool:
        """Write ``data`` if the object is still at ``expect_tag`` (absent when None); False if it moved."""
        if self.store.protocol == "s3":
            return self._s3_swap(expect_tag, data)
        if self.store.protocol == "file":
            return self._file_swap(expect_tag, data)
        current = self.read()
        if (current[1] if current else None) != expect_tag:
            return False
        self.store.put_bytes(self.rel, data)
        after = self.read()
        return after is not None and after[0] == data

    # S3: conditional PutObject
    def _s3_read(self) -> tuple[bytes, str] | None:
        bucket, _, key = self.store.path(self.rel).partition("/")

        def get() -> tuple[bytes, str] | None:
            from fsspec.asyn import sync

            async def _get() -> tuple[bytes, str]:  # body and ETag of one GET (s3fs runs its own event loop)
                out = await self.store.fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with out["Body"] as stream:
                    return await stream.read(), str(out["ETag"])

            try:
                return sync(self.store.fs.loop, _get)
            except FileNotFoundError:
                return None

        return self.store._call("read", self.rel, get)

    def _s3_swap(self, expect_tag: str | None, data: bytes) -> bool:
        bucket, _, key = self.store.path(self.rel).partition("/")
        cond = {"IfNoneMatch": "*"} if expect_tag is None else {"IfMatch": expect_tag}

        def put() -> bool:
            try:
                self.store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
                return True
            except Exception as exc:
                if _is_conflict(exc):
                    # a retry of a put the server did carry out also lands here: it is ours if it holds our bytes
                    current = self._s3_read()
                    return current is not None and current[0] == data
                raise

        return self.store._call("write", self.rel, put)

    # local disk: O_EXCL create, flock-guarded replace
    def _file_swap(self, expect_tag: str | None, data: bytes) -> bool:
        import fcntl

        path = self.store.path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if expect_tag is None:
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    return True
                current = self.read()
                if current is None or current[1] != expect_tag:
                    return False
                tmp = f"{path}.part-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a reused pid counts as alive: the safe side). Also for
    node-local files that name their writer's pid (the shard cache's reservations)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_conflict(exc: BaseException) -> bool:
    cur: BaseException | None = exc
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code, status = _error_code(cur)
        if code in _CONFLICT_CODES or status in (409, 412):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# ---- the lease -------------------------------------------------------------------------------------


class Lease:
    """The lease of one run root. ``with Lease(store).held(): ...`` acquires, heartbeats and releases."""

    def __init__(self, store: Store, stale_s: float | None = None, owner: str | None = None) -> None:
        self.store = store
        self.stale_s = stale_after_s() if stale_s is None else stale_s
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._cas = _Cas(store, LEASE)
        self.record: LeaseRecord | None = None
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    @property
    def url(self) -> str:
        return self.store.url_of(LEASE)

    @property
    def generation(self) -> int:
        return self.record.generation if self.record else 0

    def read(self) -> LeaseRecord | None:
        current = self._cas.read()
        return LeaseRecord.parse(current[0], self.url) if current else None

    def check_free(self) -> None:
        """Raise :class:`LeaseHeldError` if a live writer holds the lease (a read; nothing is written)."""
        old = self.read()
        if old is not None and not old.released and old.owner != self.owner:
            self._refuse_if_live(old)

    def _refuse_if_live(self, old: LeaseRecord) -> None:
        age = time.time() - old.heartbeat_at
        if old.host == socket.gethostname() and not pid_alive(old.pid):
            log.warning("the lease holder of %s, pid %d on this host, is dead (heartbeat %.0f s old): taking over",
                        self.store.url, old.pid, age)
            return
        if age < self.stale_s:
            raise LeaseHeldError(
                f"run root {self.store.url} is being written by {old.holder()}; its last heartbeat was "
                f"{age:.0f} s ago (a lease is stale after {self.stale_s:.0f} s, {STALE_ENV}). Wait for "
                f"that run to end, or stop it; a dead holder's lease is taken over once it is stale.")

    def acquire(self) -> LeaseRecord:
        """Create the lease or take over a stale or released one; :class:`LeaseHeldError` if it is live."""
        for _ in range(5):  # only lost races loop
            current = self._cas.read()
            old = LeaseRecord.parse(current[0], self.url) if current else None
            if old is not None and not old.released and old.owner != self.owner:
                self._refuse_if_live(old)
            now = time.time()
            record = LeaseRecord(owner=self.owner, host=socket.gethostname(), pid=os.getpid(), started_at=now,
                                 heartbeat_at=now, generation=(old.generation if old else 0) + 1)
            data = record.encode()
            if self._cas.swap(current[1] if current else None, data) and self._adopt(record, data):
                if old is not None and not old.released:
                    log.warning("took over the stale lease of %s (heartbeat %.0f s old); generation %d fences it",
                                self.store.url, now - old.heartbeat_at, record.generation)
                return record
        raise LeaseHeldError(f"run root {self.store.url}: another writer keeps changing the lease {self.url}")

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and :attr:`lost` set) when the lease was taken over."""
        assert self.record is not None, "acquire() first"
        record = LeaseRecord(**{**asdict(self.record), "heartbeat_at": time.time()})
        data = record.encode()
        if self._cas.swap(self._tag, data) and self._adopt(record, data):
            return True
        self.lost.set()
        holder = self.read()
        log.error("lost the lease of %s to %s: this run stops writing", self.store.url,
                  holder.holder() if holder else "nobody (deleted)")
        return False

    def _adopt(self, record: LeaseRecord, data: bytes) -> bool:
        """After a successful swap: take the stored version's tag as ours, but only if it still holds what
        we wrote. The swap and this read are two requests; a writer frozen between them (SIGSTOP, a long
        GC pause) would otherwise adopt the tag of whoever took the lease meanwhile and overwrite it."""
        current = self._cas.read()
        if current is None or current[0] != data:
            return False
        self.record, self._tag = record, current[1]
        return True

    def release(self) -> None:
        """Mark the lease released (kept, so the generation only ever grows); a lost lease is left alone."""
        self._stop_heartbeat()
        if self.record is None or self.lost.is_set():
            return
        record = LeaseRecord(**{**asdict(self.record), "heartbeat_at": time.time(), "released": True})
        try:
            if not self._cas.swap(self._tag, record.encode()):
                log.warning("lease of %s was taken over before release", self.store.url)
        except StorageError as exc:  # a dead store must not hide the run's own outcome
            log.warning("could not release the lease of %s (%s); it goes stale after %.0f s", self.store.url,
                        exc, self.stale_s)

    def start_heartbeat(self) -> None:
        interval = max(0.2, self.stale_s / 10)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        return
                except Exception as exc:  # keep beating: a transient outage outlasting the retries
                    log.warning("lease heartbeat of %s failed: %s", self.store.url, exc)

        self._thread = threading.Thread(target=beat, name="vitforge-lease", daemon=True)
        self._thread.start()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def fence(self) -> dict[str, Any]:
        """What a worker needs to fence itself: pass to :func:`install_fence` (JSON-able)."""
        return {"url": self.store.url, "owner": self.owner, "generation": self.generation}

    @contextlib.contextmanager
    def held(self):
        """Acquire, heartbeat, install the fence in this process; release on exit."""
        self.acquire()
        uninstall = install_fence(self.fence(), storage_options=self.store._storage_options)
        self.start_heartbeat()
        try:
            yield self
        finally:
            self.release()
            uninstall()


_INSTALLED: dict[str, dict[str, Any]] = {}  # root path -> fence installed in this process


def fence_for(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The fence this process installed for the run root ``url`` (to hand to workers), or None."""
    return _INSTALLED.get(Store(url, storage_options).path())


def install_fence(fence: dict[str, Any] | None, storage_options: dict[str, Any] | None = None):
    """Register, in this process, that writes under ``fence['url']`` belong to its owner and generation.

    Returns a function that removes the registration. ``None`` installs nothing (no lease in use).
    """
    if not fence:
        return lambda: None
    store = Store(fence["url"], storage_options)
    cas = _Cas(store, LEASE)

    def check(what: str) -> None:
        current = cas.read()
        record = LeaseRecord.parse(current[0], store.url_of(LEASE)) if current else None
        if record is None or record.owner != fence["owner"] or record.generation != fence["generation"]:
            holder = record.holder() if record else "nobody (the lease is gone)"
            raise LeaseLostError(f"refusing to {what}: this writer (generation {fence['generation']}) lost the "
                                 f"lease of {store.url} to {holder}")

    _INSTALLED[store.path()] = dict(fence)
    unregister = register_fence(store.path(), check)

    def uninstall() -> None:
        unregister()
        if _INSTALLED.get(store.path()) == fence:
            _INSTALLED.pop(store.path(), None)

    return uninstall

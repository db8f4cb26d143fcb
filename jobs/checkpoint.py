"""Checkpoint *storage*: stream every rank's checkpoint files to object storage and commit them.

Policy (when to save, how many to keep) is :class:`CheckpointPolicy` with its
:class:`~jobs._ckpt_policy.CheckpointSchedule` (``jobs/_ckpt_policy.py``: pure, no I/O); storage and
the commit protocol are :class:`CheckpointManager`, which holds a schedule (:attr:`CheckpointManager.schedule`)
and applies the policy's retention. The training engine owns the loop and calls::

    ckpt = CheckpointManager(f"{run}/stages/{stage}", policy, rank=r, world_size=W)
    if ckpt.due(step, time_flag):      # time_flag: rank 0's schedule.time_due(), agreed in the step's all-reduce
        ckpt.save(step, lambda d: engine.save_checkpoint(d), meta={"step": step, ...})
    ...
    ckpt.close()                       # flushes the last upload, raises its error if any

Uploads behind (``save`` blocks for its local write only)
---------------------------------------------------------
One upload runs at a time, in step order; staged checkpoints wait behind it, at most ``keep_last``
of them. A save that comes while an upload is in flight stages its files and returns; when
``keep_last`` checkpoints are already waiting, the oldest waiting one is *superseded*: its staging
copy is removed, it is never uploaded or committed (logged, and listed in
:attr:`CheckpointManager.superseded`), and with several ranks a ``rank-N.superseded`` marker tells
rank 0 to give that step up instead of waiting for its markers. A superseded checkpoint therefore
has ``keep_last`` newer ones behind it, so retention would have deleted it once they committed:
uploads falling behind never cost a checkpoint the policy keeps. Local disk holds at most
``keep_last + 1`` checkpoints per rank (the one uploading and the ones waiting); the final
:meth:`close` uploads and commits every waiting one, and the store only ever gains complete,
committed checkpoints in step order: a kill -9 at any point leaves the newest committed one to
resume from.

Store layout (``<stage_url>/checkpoints/``)::

    step-00001200/<files written by write_fn on each rank>
    step-00001200/ranks/rank-00003.done    # rank 3's marker: session, file names + sizes + sha256, its meta
    step-00001200/COMMITTED                # written by rank 0 last, once all W markers are verified
    latest                                 # names the newest committed step; written after COMMITTED

Contracts
---------
* A checkpoint *exists* only when its ``COMMITTED`` marker exists; ``latest`` is advisory and is
  checked against ``COMMITTED``. Retention deletes older checkpoints only after a newer commit,
  and deletes a ``COMMITTED`` marker before the files it guards.
* Each rank stages into its *own* local directory and uploads only what its ``write_fn`` wrote,
  so ranks on different nodes never need a shared disk. Two ranks writing the same file name is
  refused at commit time (the object store would keep only one of them).
* Markers carry a session id agreed by all ranks at construction, so markers left by a killed
  earlier attempt at the same step never count towards this attempt's commit.
* The background thread uses only the object store, never ``torch.distributed``.
* Every file's sha256 is computed while it uploads and recorded in its rank's marker and in
  ``COMMITTED``; :meth:`CheckpointManager.restore` checks each file as it downloads and falls back
  to the previous committed checkpoint when one does not match (checkpoints written before
  checksums were recorded are checked by size).
* Checkpoint files are loaded by the engine's ``read_fn``; the engine unpickles them with
  ``weights_only=True`` and an allow-list (:mod:`jobs._safe_load`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cluster.housekeeping import tolerate
from cluster.lease import pid_alive
from jobs._ckpt_policy import CheckpointPolicy, CheckpointSchedule
from jobs._ckpt_verify import problems
from cluster.storage import CHECKSUM, COMMITTED, CorruptRecordError, RetryPolicy, Store, commit, is_committed, write_latest
from jobs._ckpt_state import (CheckpointError, CheckpointMismatchError, capture_rng_state, check_compatible,
                              code_version, json_digest, restore_rng_state)
from jobs._ckpt_restore import (RANKS, CheckpointInfo, CheckpointNotFoundError, CheckpointReader, CheckpointStagingError,
                                _is_disk_full, _marker, _step_of, latest_committed)
from jobs.layout import CHECKPOINT_PREFIX as PREFIX  # noqa: F401  (the step-directory prefix, re-exported)
from jobs.layout import CHECKPOINTS_NAME, checkpoint_name

__all__ = [
    "CheckpointPolicy", "CheckpointManager", "CheckpointInfo", "CheckpointError", "CheckpointMismatchError",
    "CheckpointStagingError", "CheckpointCommitError", "CheckpointNotFoundError", "capture_rng_state",
    "restore_rng_state", "check_compatible", "json_digest", "code_version", "latest_committed",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
FORMAT = 1


class _Superseded(Exception):
    """A rank gave this step up for a newer one (uploads fell behind): rank 0 does not commit it."""


class CheckpointCommitError(CheckpointError):
    """The ranks' files could not be confirmed, so the checkpoint was not committed."""


@dataclass
class _SaveJob:
    step: int
    name: str
    local_dir: str
    files: dict[str, int]
    meta: dict[str, Any]
    sync: bool = False
    superseded: bool = False
    error: BaseException | None = field(default=None, repr=False)


def step_name(step: int) -> str:
    return checkpoint_name(step)


def _poll(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Call ``check`` with backoff until it returns non-None; CheckpointCommitError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() + delay > deadline:
            raise CheckpointCommitError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _private_staging_dir() -> str:
    """A fresh ``$TMPDIR/vitforge-ckpt-<pid>-*``, after removing those of processes that no longer run
    (a worker killed with -9 cannot clean up its staged checkpoint, which may be gigabytes)."""
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        parts = entry.split("-")
        if entry.startswith("vitforge-ckpt-") and len(parts) > 3 and parts[2].isdigit() and not pid_alive(int(parts[2])):
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"vitforge-ckpt-{os.getpid()}-")


def _agree_session(world_size: int) -> str:
    """A fresh id shared by all ranks: rank 0 draws it and broadcasts it (main thread, at construction)."""
    token = uuid.uuid4().hex
    if world_size == 1:
        return token
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CheckpointError(
            f"CheckpointManager with world_size={world_size} needs torch.distributed initialised before it is "
            "constructed (to agree on a session id), or an explicit session_id= shared by all ranks"
        )
    box = [token]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a collective: every rank must call it)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class CheckpointManager(CheckpointReader):
    """Streams checkpoints of one training stage to ``<stage_url>/checkpoints/`` and commits them.

    Every rank constructs one (same ``stage_url`` and ``policy``) and calls :meth:`save` at the same
    steps. With ``world_size > 1`` and no ``session_id`` the constructor is a collective
    (``torch.distributed`` must be initialised). Not thread-safe: call it from the training thread.
    """

    def __init__(self, stage_url: str, policy: CheckpointPolicy, *, rank: int = 0, world_size: int = 1,
                 local_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None, commit_timeout_s: float = 1800.0,
                 session_id: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.policy, self.rank, self.world_size = policy, rank, world_size
        self.commit_timeout_s = commit_timeout_s
        self.store = Store(stage_url, storage_options=storage_options, retry=retry).child(CHECKPOINTS_NAME)
        self.session = session_id or _agree_session(world_size)
        self._own_local = local_dir is None
        self._base, self._local = local_dir, None
        self._thread: threading.Thread | None = None   # the upload worker (runs the queue, then ends)
        self._lock = threading.Lock()
        self._queued: deque[_SaveJob] = deque()        # staged, waiting behind the upload in flight (oldest first)
        self._errors: list[BaseException] = []         # of finished jobs, raised by the next call
        self.superseded: list[int] = []                # steps given up for a newer one, never uploaded
        self.schedule = CheckpointSchedule(policy)  # when the next save is due (jobs/_ckpt_policy.py)
        self.restored: CheckpointInfo | None = None

    @property
    def local_dir(self) -> str:
        """This rank's private staging directory (created on first use)."""
        if self._local is None:
            self._base = self._base or _private_staging_dir()
            self._local = os.path.join(self._base, f"rank-{self.rank:05d}")
            os.makedirs(self._local, exist_ok=True)
        return self._local

    @property
    def url(self) -> str:
        """URL of the ``checkpoints/`` directory."""
        return self.store.url

    # ---- policy (jobs/_ckpt_policy.py) -------------------------------------------------------
    def due(self, step: int, time_flag: bool | None = None) -> bool:
        """:meth:`CheckpointSchedule.due` of :attr:`schedule`. With ``every_minutes`` and several ranks, rank 0's
        clock decides: pass ``time_flag`` (rank 0's :meth:`time_due`, already agreed on by every rank, as the
        engine does in its per-step all-reduce), or this call broadcasts it (a collective every rank must
        then call at every step)."""
        if time_flag is None and self.policy.timed and self.world_size > 1 and step != self.schedule.last_step:
            time_flag = _broadcast_flag(self.schedule.time_due())
        return self.schedule.due(step, time_flag)

    def time_due(self) -> bool:
        """This process's clock only: ``every_minutes`` have passed since the last save (or start/restore)."""
        return self.schedule.time_due()

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int, write_fn: Callable[[str], Any], meta: Mapping[str, Any] | None = None,
             sync: bool = False) -> None:
        """Write this rank's checkpoint files with ``write_fn(local_dir)`` and upload them.

        Every rank calls it at the same step; ``meta`` is this rank's JSON-able state (rank 0's
        also goes into ``COMMITTED``). Returns once the local write is done; the upload runs in a
        background thread. An upload still in flight is *not* waited for: this checkpoint queues
        behind it, superseding the oldest waiting one when ``keep_last`` already wait (module
        docstring, "Uploads behind").
        ``sync=True``: every earlier upload, then this one, uploaded and committed before returning.
        The error of an earlier upload, if any, is raised here.
        """
        self._raise_pending()
        meta = dict(meta or {})
        try:
            json.dumps(meta, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint meta must be JSON-able ({exc}); put tensors in files via write_fn") from None
        if sync:
            self.wait()
        else:
            self._supersede_queued(step)
        job = self._stage(step, write_fn, meta)
        job.sync = sync
        self.schedule.saved(step)
        if sync:
            self._run_job(job)
            self._collect(job)
            self._raise_pending()
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._busy:
                self._queued.append(job)
                return
        if self._thread is not None:
            self._thread.join()  # it has finished its last job and is leaving
        self._busy = True
        self._thread = threading.Thread(target=self._worker, args=(job,), name=f"ckpt-upload-{job.name}", daemon=True)
        self._thread.start()

    _busy = False  # the worker has a job or will look at the queue once more

    def _worker(self, job: _SaveJob | None) -> None:
        """Upload ``job``, then whatever is queued behind it, until nothing is."""
        while job is not None:
            self._run_job(job)
            self._collect(job)
            with self._lock:
                job = self._queued.popleft() if self._queued else None
                if job is None:
                    self._busy = False

    def _collect(self, job: _SaveJob) -> None:
        if job.error is not None:
            with self._lock:
                self._errors.append(job.error)

    def _supersede_queued(self, step: int) -> None:
        """Give up the oldest checkpoint waiting behind the upload in flight when ``keep_last`` wait, for
        the one of ``step`` (retention would delete it once the newer ones commit)."""
        with self._lock:
            job = self._queued.popleft() if len(self._queued) >= self.policy.keep_last else None
        if job is None:
            return
        job.superseded = True
        shutil.rmtree(job.local_dir, ignore_errors=True)
        self.superseded.append(job.step)
        log.warning("checkpoint %s superseded by step %d before its upload started (uploads are slower than the "
                    "checkpoint interval); it is not uploaded", job.name, step)
        if self.world_size > 1:  # rank 0 must not wait for this rank's marker of that step
            tolerate("superseded marker", self.store.put_json, f"{job.name}/{RANKS}/{_marker(self.rank, 'superseded')}",
                     {"session": self.session, "rank": self.rank, "by_step": step})

    def _stage(self, step: int, write_fn: Callable[[str], Any], meta: dict[str, Any]) -> _SaveJob:
        name = step_name(step)
        local = os.path.join(self.local_dir, name)
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.makedirs(local)
            write_fn(local)
            files = self._scan(local)
        except BaseException as exc:
            shutil.rmtree(local, ignore_errors=True)
            if _is_disk_full(exc, self.local_dir):
                reason = getattr(exc, "strerror", None) or exc
                raise CheckpointStagingError(
                    f"local staging disk is full: writing checkpoint {name} (rank {self.rank}) to {local} failed "
                    f"({reason}). Nothing was uploaded or committed. Free space there, or pass local_dir= "
                    "on a disk with room for one checkpoint per rank on this node."
                ) from exc
            raise
        return _SaveJob(step=step, name=name, local_dir=local, files=files, meta=meta)

    def _scan(self, local: str) -> dict[str, int]:
        files: dict[str, int] = {}
        for dirpath, _, names in os.walk(local):
            for n in names:
                path = os.path.join(dirpath, n)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                if rel == COMMITTED or rel.split("/", 1)[0] == RANKS:
                    raise CheckpointError(f"write_fn wrote {rel!r}, a name reserved for the commit protocol")
                files[rel] = os.path.getsize(path)
        if not files and self.rank == 0:
            log.warning("checkpoint write_fn wrote no files on rank 0 into %s", local)
        return dict(sorted(files.items()))

    def _run_job(self, job: _SaveJob) -> None:
        """Upload, then (rank 0) commit. Errors are kept in ``job.error`` for the next call to raise."""
        try:
            self._upload(job)
            if self.rank == 0:
                self._commit(job)
            elif job.sync:
                self._await_commit(job)
        except _Superseded as exc:
            log.warning("%s not committed: %s", job.name, exc)
        except BaseException as exc:  # kept and re-raised in the training thread; never dropped
            job.error = exc
            self._mark_failed(job, exc)
        finally:
            shutil.rmtree(job.local_dir, ignore_errors=True)

    def _upload(self, job: _SaveJob) -> None:
        digests = {rel: self.store.put_file(os.path.join(job.local_dir, *rel.split("/")), f"{job.name}/{rel}",
                                            checksum=True) for rel in job.files}  # hashed as they are uploaded
        marker = {"format": FORMAT, "session": self.session, "rank": self.rank, "step": job.step,
                  "files": job.files, CHECKSUM: digests, "meta": job.meta}
        self.store.put_json(f"{job.name}/{RANKS}/{_marker(self.rank)}", marker)
        log.debug("rank %d uploaded %d file(s) of %s", self.rank, len(job.files), job.name)

    def _mark_failed(self, job: _SaveJob, exc: BaseException) -> None:
        """Tell rank 0 (best effort) so it stops waiting for this rank's marker."""
        try:
            self.store.put_json(f"{job.name}/{RANKS}/{_marker(self.rank, 'failed')}",
                                {"session": self.session, "rank": self.rank, "error": f"{type(exc).__name__}: {exc}"})
        except Exception:  # the store is what failed: the error itself is still raised on the next call
            log.warning("could not record the failure of %s for rank %d", job.name, self.rank)

    # ---- committing (rank 0, background thread) ----------------------------------------------
    def _read_markers(self, name: str, done: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Add this session's ``.done`` markers under ``name/ranks`` to ``done`` (those already there are not
        read again); return this session's ``.failed`` markers, and raise :class:`_Superseded` for a
        ``.superseded`` one. One listing per call."""
        failed = {}
        for entry in self.store.ls(f"{name}/{RANKS}"):
            stem, _, kind = entry.rpartition(".")
            try:
                rank = int(stem.removeprefix("rank-"))
            except ValueError:
                continue
            if kind not in ("done", "failed", "superseded") or (kind == "done" and rank in done):
                continue
            try:
                data = self.store.get_json(f"{name}/{RANKS}/{entry}")
            except FileNotFoundError:
                continue
            if data.get("session") == self.session and kind == "superseded":
                raise _Superseded(f"rank {rank} gave it up for step {data.get('by_step')}")
            if data.get("session") == self.session:
                (done if kind == "done" else failed)[rank] = data
        return failed

    def _all_markers(self, name: str, done: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]] | None:
        failed = self._read_markers(name, done)
        if failed:
            r, data = min(failed.items())
            raise CheckpointCommitError(f"rank {r} failed to upload its part of {name}: {data.get('error')}")
        return done if len(done) == self.world_size else None

    def _verify(self, name: str, markers: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The union of all ranks' files (size, writer, checksum), each checked to exist in the store with
        its recorded size."""
        files: dict[str, dict[str, Any]] = {}
        for r in sorted(markers):
            for rel, size in markers[r]["files"].items():
                if rel in files:
                    raise CheckpointCommitError(
                        f"ranks {files[rel]['rank']} and {r} both wrote {rel!r} in {name}; the store keeps only one. "
                        "Make write_fn write rank-distinct file names (or shared files on rank 0 only)."
                    )
                files[rel] = {"size": int(size), "rank": r}
                if digest := markers[r].get(CHECKSUM, {}).get(rel):
                    files[rel][CHECKSUM] = digest
        if bad := problems(self.store, name, files):
            raise CheckpointCommitError(f"{self.store.url_of(name)} after every rank's upload: {'; '.join(bad[:5])}")
        return dict(sorted(files.items()))

    def _commit(self, job: _SaveJob) -> None:
        done: dict[int, dict[str, Any]] = {}
        markers = _poll(lambda: self._all_markers(job.name, done), self.commit_timeout_s,
                        f"all {self.world_size} ranks' markers of {self.store.url_of(job.name)}")
        files = self._verify(job.name, markers)
        record = {"format": FORMAT, "step": job.step, "world_size": self.world_size, "session": self.session,
                  "code_version": job.meta.get("code_version") or code_version(),
                  "config_digest": job.meta.get("config_digest"), "files": files, "meta": job.meta}
        commit(self.store, job.name, record)
        write_latest(self.store, "", job.name)
        log.info("committed checkpoint %s (%d files)", self.store.url_of(job.name), len(files))
        self._retain(job.step)

    def _await_commit(self, job: _SaveJob) -> None:
        def committed() -> bool | None:
            if is_committed(self.store, job.name):
                return True
            failed = self._read_markers(job.name, dict.fromkeys(range(self.world_size), {}))  # skip .done reads
            if failed:
                raise CheckpointCommitError(f"{job.name} was not committed: rank {min(failed)} failed")
            return None

        _poll(committed, self.commit_timeout_s, f"rank 0 to commit {self.store.url_of(job.name)}")

    def _retain(self, newest: int) -> None:
        """Delete what :meth:`CheckpointPolicy.to_delete` says after ``newest`` committed: un-commit first, so
        a half-deleted dir is never visible; a failed delete is a warning (housekeeping)."""
        steps = [(s, n) for n in self.store.ls("") if (s := _step_of(n)) is not None]
        for n in self.policy.to_delete(steps, newest, lambda n: is_committed(self.store, n), self._verifies):
            if tolerate("retention delete", self.store.delete, f"{n}/{COMMITTED}") and \
                    tolerate("retention delete", self.store.delete, n, recursive=True):
                log.debug("retention removed %s", n)

    def _verifies(self, name: str) -> bool:
        """Whether committed checkpoint ``name`` lists only files present with their recorded sizes."""
        try:
            bad = problems(self.store, name, self.info(name).files)
        except (CorruptRecordError, KeyError, TypeError, ValueError) as exc:
            bad = [f"COMMITTED unreadable ({exc})"]
        if bad:
            log.warning("retention keeps an older checkpoint: %s does not verify (%s)", name, "; ".join(bad[:3]))
        return not bad

    # ---- flushing ----------------------------------------------------------------------------
    @property
    def upload_in_flight(self) -> bool:
        """Whether a background upload (and, on rank 0, its commit) is still running."""
        return self._thread is not None and self._thread.is_alive()

    def _raise_pending(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            for extra in errors[1:]:
                log.error("a further checkpoint upload failed: %s: %s", type(extra).__name__, extra)
            raise errors[0]

    def wait(self) -> None:
        """Block until the upload in flight and those queued behind it (if any) are done; raise the
        first error if one failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def close(self) -> None:
        """:meth:`wait`, then remove the local staging directory if this manager created it."""
        try:
            self.wait()
        finally:
            if self._own_local and self._base:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = self._local = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Reading a stage's checkpoints: what a committed one holds, finding the newest that verifies, and
restoring one (every file checked against its ``COMMITTED`` checksum, falling back to an older
checkpoint when one fails). :class:`jobs.checkpoint.CheckpointManager` reads through
:class:`CheckpointReader`; :func:`latest_committed` reads without a manager.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.storage import CHECKSUM, COMMITTED, Store, committed_dirs, is_committed, read_latest
from jobs._ckpt_state import CheckpointError, check_compatible
from jobs._ckpt_verify import CheckpointChecksumError, CheckpointVerificationError, check_digest, confined_files, \
    newest_verified
from jobs.layout import CHECKPOINT_PREFIX as PREFIX
from jobs.layout import CHECKPOINTS_NAME

log = logging.getLogger("jobs.checkpoint")

RANKS = "ranks"
_FULL_BYTES = 1 << 20   # less free space than this after a failed write counts as "disk full"


class CheckpointStagingError(CheckpointError):
    """Writing or reading the local staging copy failed (e.g. the disk is full). Nothing was committed."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint exists where one was asked for."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as read from its ``COMMITTED`` record."""

    step: int
    name: str                       # step-XXXXXXXX
    url: str                        # full URL of the step directory
    world_size: int
    files: dict[str, dict[str, Any]]  # relative name -> {"size": bytes, "rank": writer, "sha256": hex}
    meta: dict[str, Any]            # rank 0's meta as passed to save()
    committed_at: float = 0.0


def _step_of(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def _marker(rank: int, kind: str = "done") -> str:
    return f"rank-{rank:05d}.{kind}"


def _is_disk_full(exc: BaseException | None, local_dir: str) -> bool:
    """Whether ``exc`` (or one it came from) is ENOSPC/EDQUOT, or ``local_dir``'s disk is now full.

    The free-space check catches writers that lose errno (``torch.save``'s C++ writer raises
    "iostream error" on a full disk).
    """
    cur, seen = exc, 0
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    try:
        return shutil.disk_usage(local_dir).free < _FULL_BYTES
    except OSError:
        return False


def _read_info(store: Store, name: str) -> CheckpointInfo:
    try:
        rec = store.get_json(f"{name}/{COMMITTED}")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{store.url_of(name)} is not a committed checkpoint") from None
    return CheckpointInfo(step=int(rec["step"]), name=name, url=store.url_of(name), world_size=int(rec["world_size"]),
                          files=confined_files(rec["files"], store.url_of(name)), meta=rec.get("meta", {}), committed_at=float(rec.get("committed_at", 0.0)))


def latest_committed(stage_url: str, storage_options: dict[str, Any] | None = None) -> CheckpointInfo | None:
    """The newest committed checkpoint of the stage at ``stage_url``, or None, read without a manager
    (no collective, no staging directory): for a driver, or a rank deciding before its gang is set up."""
    store = Store(stage_url, storage_options=storage_options).child(CHECKPOINTS_NAME)
    return newest_verified(store, read_latest(store, "", PREFIX), lambda: committed_dirs(store, "", PREFIX),
                           lambda n: _read_info(store, n))


class CheckpointReader:
    """The reading half of :class:`jobs.checkpoint.CheckpointManager` (its ``store``, ``url``, ``rank``,
    ``world_size``, ``local_dir`` and ``schedule``)."""

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose files verify (see jobs/_ckpt_verify.py), or None.
        Half-written directories are never returned."""
        return newest_verified(self.store, read_latest(self.store, "", PREFIX),
                               lambda: committed_dirs(self.store, "", PREFIX), self.info)

    def info(self, name: str) -> CheckpointInfo:
        """The committed checkpoint ``name`` (``step-XXXXXXXX``)."""
        return _read_info(self.store, name)

    def committed(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        names = sorted((s, n) for n in self.store.ls("") if (s := _step_of(n)) is not None)
        return [self.info(n) for _, n in names if is_committed(self.store, n)]

    def restore(self, read_fn: Callable[[str], Any], info: CheckpointInfo | None = None,
                expect: Mapping[str, Any] | None = None, own_files_only: bool = False) -> dict[str, Any]:
        """Download a committed checkpoint (default: the latest) and call ``read_fn(local_dir)``.

        Every file of the checkpoint is downloaded, unless ``own_files_only``: then only the files
        this rank and rank 0 wrote (enough for DeepSpeed ZeRO 1-3 without elastic checkpoints at an
        unchanged world size, and W times less traffic).
        Each file is checked against the checksum ``COMMITTED`` records as it downloads, before
        ``read_fn`` sees anything; a checkpoint that fails is logged naming the file and both hashes,
        and the previous committed checkpoint that verifies is restored instead (written by as many
        ranks; else :class:`CheckpointVerificationError`). :attr:`restored` is the one restored.
        ``expect``: keys that must equal rank 0's saved meta (e.g. ``config_digest``), else
        :class:`CheckpointMismatchError` before anything is downloaded. Returns this rank's saved
        meta (rank 0's when this rank did not exist in the saved run). Loading a checkpoint's
        pickles is up to ``read_fn`` (the engine's goes through :mod:`jobs._safe_load`).
        """
        info = info or self.latest()
        if info is None:
            raise CheckpointNotFoundError(f"no committed checkpoint under {self.url}")
        failed: list[str] = []
        while True:
            try:
                meta = self._restore_one(read_fn, info, expect, own_files_only)
                self.restored = info
                return meta
            except CheckpointChecksumError as exc:
                log.warning("checkpoint %s failed verification: %s", info.url, exc)
                failed.append(f"{info.name}: {exc}")
                info = self._fallback(info, own_files_only, failed)

    def _fallback(self, bad: CheckpointInfo, own_files_only: bool, failed: list[str]) -> CheckpointInfo:
        """The newest committed checkpoint older than ``bad`` whose files verify by size, or
        :class:`CheckpointVerificationError` (permanent) naming what failed."""
        older = sorted((n for n in committed_dirs(self.store, "", PREFIX) if n < bad.name), reverse=True)
        why = " | ".join(failed)
        if own_files_only:  # ranks checked different files: falling back alone could split the gang
            raise CheckpointVerificationError(f"{why}. Restored with own_files_only, so ranks cannot agree on a "
                                              "fallback; restore every file (own_files_only=False)")
        if not older:
            raise CheckpointVerificationError(f"no committed checkpoint under {self.url} verifies: {why}. Restore "
                                              "the files, or clear the stage (--restart-from) to start over")
        prev = newest_verified(self.store, older[0], lambda: older, self.info)
        if prev.world_size != bad.world_size:
            raise CheckpointVerificationError(f"{why}; the previous committed {prev.name} was written by "
                                              f"{prev.world_size} ranks, not {bad.world_size}: rerun to resume from it")
        log.warning("resuming from %s instead of %s, which failed verification", prev.name, bad.name)
        return prev

    def _restore_one(self, read_fn: Callable[[str], Any], info: CheckpointInfo, expect: Mapping[str, Any] | None,
                     own_files_only: bool) -> dict[str, Any]:
        if expect:
            check_compatible(info.meta, expect, where=f"checkpoint {info.url}")
        meta = self._rank_meta(info)
        if own_files_only and info.world_size != self.world_size:
            log.warning("%s was written by %d ranks, this gang has %d: downloading every file",
                        info.name, info.world_size, self.world_size)
            own_files_only = False
        local = os.path.join(self.local_dir, f"restore-{info.name}")
        shutil.rmtree(local, ignore_errors=True)
        try:
            for rel, rec in info.files.items():
                if own_files_only and rec["rank"] not in (0, self.rank):
                    continue
                actual = self.store.get_file(f"{info.name}/{rel}", os.path.join(local, *rel.split("/")),
                                             checksum=CHECKSUM in rec)
                check_digest(f"{info.url}/{rel}", rec, actual)
            read_fn(local)
        except Exception as exc:
            if _is_disk_full(exc, self.local_dir):
                raise CheckpointStagingError(f"local staging disk is full while downloading {info.url} to {local}; "
                                             "free space or pass local_dir= on a bigger disk") from exc
            raise
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self.schedule.saved(info.step)
        return meta

    def _rank_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        if self.rank == 0 or self.rank >= info.world_size:
            if self.rank:
                log.warning("rank %d did not exist in %s (world size %d): returning rank 0's meta",
                            self.rank, info.name, info.world_size)
            return dict(info.meta)
        return dict(self.store.get_json(f"{info.name}/{RANKS}/{_marker(self.rank)}")["meta"])

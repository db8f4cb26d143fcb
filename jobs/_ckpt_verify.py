"""Checks on what a ``COMMITTED`` record names before a restore trusts it.

:func:`confined_files`: the files a checkpoint lists must be relative paths inside its own
directory (no absolute path, no ``..``); others are dropped with a warning, so a planted record
can make a restore neither read another stage's files nor copy from outside the store.

:func:`newest_verified`: a restore takes the newest committed checkpoint whose every listed file
exists with the size ``COMMITTED`` records (a listing and one HEAD per file, no download); one
that fails is logged with what was wrong and the previous committed checkpoint is used.

:func:`check_digest`: the sha256 ``COMMITTED`` records for a file, against the digest of the bytes
a restore downloaded (hashed as they arrived); a mismatch is :class:`CheckpointChecksumError`
naming the file and both hashes, and the restore falls back (``CheckpointManager.restore``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from cluster.storage import CHECKSUM, CorruptRecordError, confined_rel

log = logging.getLogger(__name__)


def confined_files(files: dict[str, Any], where: str) -> dict[str, Any]:
    """``files`` without the entries whose names leave the checkpoint directory ``where``."""
    bad = [rel for rel in files if not confined_rel(str(rel))]
    for rel in bad:
        log.warning("ignoring %r listed in %s/COMMITTED: not a relative name inside the checkpoint directory",
                    str(rel)[:200], where)
    return {rel: rec for rel, rec in files.items() if rel not in bad}


class CheckpointVerificationError(RuntimeError):
    """Every committed checkpoint of a stage failed verification (a restart cannot clear it)."""

    permanent = True


class CheckpointChecksumError(RuntimeError):
    """A downloaded checkpoint file does not hash to what its ``COMMITTED`` record says."""


def check_digest(url: str, rec: dict[str, Any], actual: str | None) -> None:
    """Raise :class:`CheckpointChecksumError` when ``actual`` is not the checksum ``rec`` records
    (records without one, from before checksums were kept, pass)."""
    expected = rec.get(CHECKSUM)
    if expected is not None and actual != expected:
        raise CheckpointChecksumError(f"{url}: {CHECKSUM} of the downloaded bytes is {actual}, COMMITTED records "
                                      f"{expected} ({rec.get('size')} bytes): the file changed after its commit")


def problems(store: Any, name: str, files: dict[str, Any]) -> list[str]:
    """What is wrong with the files checkpoint ``name`` lists: missing, or not the size COMMITTED records."""
    out = []
    for rel, rec in files.items():
        try:
            actual = store.size(f"{name}/{rel}")
        except FileNotFoundError:
            out.append(f"{rel} is missing")
            continue
        if actual != rec.get("size"):
            out.append(f"{rel} has {actual} bytes, COMMITTED records {rec.get('size')}")
    return out


def newest_verified(store: Any, newest: str | None, committed: Callable[[], list[str]],
                    read_info: Callable[[str], Any]) -> Any:
    """The info of ``newest`` if its files verify, else of the newest older committed checkpoint that does.

    A checkpoint that fails is logged with what was wrong and skipped. None when nothing is committed;
    :class:`CheckpointVerificationError` when checkpoints are committed but none verifies (restarting from
    step 0 silently would lose the run).
    """
    if newest is None:
        return None
    candidates = [newest, *sorted((n for n in committed() if n < newest), reverse=True)]
    failures = []
    for name in candidates:
        try:
            info = read_info(name)
        except (CorruptRecordError, KeyError, TypeError, ValueError) as exc:
            failures.append(f"{name}: COMMITTED unreadable ({exc})")
            log.warning("skipping checkpoint %s: its COMMITTED record is unreadable (%s)", store.url_of(name), exc)
            continue
        bad = problems(store, name, info.files)
        if not bad:
            if name != newest:
                log.warning("resuming from %s instead of the newest committed %s, which failed verification",
                            name, newest)
            return info
        failures.append(f"{name}: {'; '.join(bad[:3])}")
        log.warning("skipping checkpoint %s: %s", store.url_of(name), "; ".join(bad[:5]))
    raise CheckpointVerificationError(f"no committed checkpoint under {store.url} verifies: {' | '.join(failures)}. "
                                      "Restore the missing files, or clear the stage (--restart-from) to start over")

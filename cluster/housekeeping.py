"""Housekeeping that never fails a run: deleting old checkpoints, stop markers, temp files.

``tolerate("retention delete", store.delete, name, recursive=True)`` runs the call; an object that
is already gone is fine, and a storage or OS error (no delete permission, a store that refuses)
is logged as a warning and counted instead of raised. A writer that lost its run's lease
(:class:`cluster.lease.LeaseLostError`) is the exception: fencing must stop it, so that is raised.
:func:`failures` gives the counts, which the stage's STATUS records (``housekeeping_failures``).
:func:`check_delete` is the run-start pre-flight for the delete permission housekeeping needs.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import Counter
from typing import Any, Callable

from .lease import LeaseLostError
from .storage import StorageAuthError, StorageError, Store

log = logging.getLogger(__name__)

_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()


def tolerate(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run ``fn(*args, **kwargs)``; True if it succeeded (or the thing was already gone), False if it failed."""
    try:
        fn(*args, **kwargs)
        return True
    except FileNotFoundError:
        return True
    except LeaseLostError:
        raise
    except (StorageError, OSError) as exc:
        with _LOCK:
            _COUNTS[what] += 1
        log.warning("%s failed (%s); carrying on (housekeeping never fails a run)", what, exc)
        return False


def failures() -> dict[str, int]:
    """Housekeeping failures in this process so far, by kind."""
    with _LOCK:
        return dict(_COUNTS)


ALLOW_NO_DELETE_ENV = "VITFORGE_ALLOW_NO_DELETE"
PROBE = "_probe-delete-"


class DeletePermissionError(StorageAuthError):
    """The run root's store lets this identity write but not delete (checked at run start)."""


def check_delete(store: Store) -> bool:
    """Write and delete a probe object under ``store``'s root, so a missing delete permission is found at
    run start, not hours later at the first retention. True if deletes work. Without them:
    :class:`DeletePermissionError` naming the bucket, prefix and permission, or (``$VITFORGE_ALLOW_NO_DELETE=1``)
    a warning, and checkpoints, stop markers and temp objects are then kept (counted housekeeping failures)."""
    rel = f"{PROBE}{uuid.uuid4().hex}"  # at the root: no directory is left behind on local disks
    store.put_bytes(rel, b"delete-permission probe\n")
    try:
        store.delete(rel)
    except StorageAuthError as exc:
        msg = (f"this identity may write but not delete under {store.url} (bucket {store.bucket!r}, prefix "
               f"{store.path(rel)!r}): a probe object could not be deleted ({exc}). Retention of old checkpoints "
               f"and stop-marker clean-up need s3:DeleteObject on that prefix: grant it, or set "
               f"{ALLOW_NO_DELETE_ENV}=1 to run anyway and keep every checkpoint")
        if os.environ.get(ALLOW_NO_DELETE_ENV, "").strip() not in ("", "0"):
            log.warning("%s", msg)
            return False
        raise DeletePermissionError(msg) from None
    return True

"""Housekeeping that never fails a run: deleting old checkpoints, stop markers, temp files.

``tolerate("retention delete", store.delete, name, recursive=True)`` runs the call; an object that
is already gone is fine, and a storage or OS error (no delete permission, a store that refuses)
is logged as a warning and counted instead of raised. A writer that lost its run's lease
(:class:`cluster.lease.LeaseLostError`) is the exception: fencing must stop it, so that is raised.
:func:`failures` gives the counts, which the stage's STATUS records (``housekeeping_failures``).
The delete permission housekeeping needs is probed at run start with the others (:mod:`cluster.access`).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable

from .lease import LeaseLostError
from .storage import StorageError

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

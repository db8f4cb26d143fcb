"""The run-start credential pre-flight: which of read, list, write and delete this identity has under
the run root, all probed at once and reported in one message.

``check_access(store, needs)`` writes a probe object ``_probe-access-<id>`` at the store's root,
reads it back, lists the root and deletes the probe (a read or delete that has no probe to work on
targets a key that does not exist: S3 answers 404 / 204 when the permission is there, 403 when it
is not). ``needs`` maps each permission to what needs it (stage names, in words); the message names
every permission, whether this identity has it, and who needs the missing ones::

    storage pre-flight for s3://bucket/runs/r (credentials: environment variables ...):
      read   (s3:GetObject)    yes
      list   (s3:ListBucket)   yes
      write  (s3:PutObject)    NO   needed by: data, pretrain, probe
      delete (s3:DeleteObject) NO   needed by: pretrain, probe (checkpoint retention, stop markers)

A missing ``delete`` alone can be waived (``$VITFORGE_ALLOW_NO_DELETE=1``): a warning, and
checkpoints, stop markers and temp objects are then kept (counted housekeeping failures).
Errors that are not about permission (a missing bucket, an unreachable endpoint, clock skew) are
raised as they are.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._retry import credential_source
from .storage import StorageAuthError, Store

log = logging.getLogger(__name__)

ALLOW_NO_DELETE_ENV = "VITFORGE_ALLOW_NO_DELETE"
PROBE = "_probe-access-"
PERMISSIONS = {"read": "s3:GetObject", "list": "s3:ListBucket", "write": "s3:PutObject",
               "delete": "s3:DeleteObject"}


class AccessPreflightError(StorageAuthError):
    """This identity lacks a permission the run needs under its run root (checked at run start)."""


class DeletePermissionError(AccessPreflightError):
    """The identity may do everything the run needs but delete."""


def probe_access(store: Store) -> dict[str, str | None]:
    """Each permission -> None if this identity has it under ``store``, else the store's refusal (in words)."""
    rel = f"{PROBE}{uuid.uuid4().hex}"  # at the root: no directory is left behind on local disks
    result = {"write": _refusal(lambda: store.put_bytes(rel, b"access probe\n"))}
    target = rel if result["write"] is None else f"{rel}-absent"
    result["read"] = _refusal(lambda: store.get_bytes(target))
    result["list"] = _refusal(lambda: store.ls(""))
    result["delete"] = _refusal(lambda: store.delete(target))
    return {name: result[name] for name in PERMISSIONS}


def _refusal(call: Callable[[], Any]) -> str | None:
    try:
        call()
    except FileNotFoundError:  # allowed to look: the object is just not there
        return None
    except StorageAuthError as exc:
        return str(exc).split(" while ", 1)[0].splitlines()[0][:120]  # "permission denied (AccessDenied)"
    return None


def check_access(store: Store, needs: Mapping[str, Sequence[str]],
                 options: dict[str, Any] | None = None) -> dict[str, bool]:
    """Probe every permission; raise :class:`AccessPreflightError` naming all of them when one in ``needs``
    is missing (:class:`DeletePermissionError`, or a warning under ``$VITFORGE_ALLOW_NO_DELETE=1``,
    when only delete is). Returns permission -> has it."""
    refused = probe_access(store)
    missing = [p for p in PERMISSIONS if refused[p] is not None and needs.get(p)]
    if missing:
        msg = _message(store, refused, needs, missing, options)
        if missing == ["delete"]:
            if os.environ.get(ALLOW_NO_DELETE_ENV, "").strip() not in ("", "0"):
                log.warning("%s", msg)
            else:
                raise DeletePermissionError(msg)
        else:
            raise AccessPreflightError(msg)
    return {p: refused[p] is None for p in PERMISSIONS}


def _message(store: Store, refused: Mapping[str, str | None], needs: Mapping[str, Sequence[str]],
             missing: list[str], options: dict[str, Any] | None) -> str:
    rows = []
    for perm, action in PERMISSIONS.items():
        has = "yes" if refused[perm] is None else "NO "
        who = f"  needed by: {', '.join(needs[perm])}" if needs.get(perm) else "  (not needed)"
        why = f"  [{refused[perm]}]" if refused[perm] is not None and needs.get(perm) else ""
        rows.append(f"  {perm:<6} ({action}){' ' * (16 - len(action))}{has}{who}{why}")
    grant = ", ".join(PERMISSIONS[p] for p in missing)
    waive = (f", or set {ALLOW_NO_DELETE_ENV}=1 to run anyway and keep every checkpoint" if missing == ["delete"]
             else "")
    return (f"storage pre-flight for {store.url} (credentials: {credential_source(options)}):\n" + "\n".join(rows)
            + f"\nThis identity lacks {', '.join(missing)}: grant {grant} on bucket {store.bucket!r}, prefix "
            f"{store.path('')!r} (the probe object was {PROBE}<id> there){waive}")

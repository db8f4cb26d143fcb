"""Checks on what a ``COMMITTED`` record names before a restore trusts it.

:func:`confined_files`: the files a checkpoint lists must be relative paths inside its own
directory (no absolute path, no ``..``); others are dropped with a warning, so a planted record
can make a restore neither read another stage's files nor copy from outside the store.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.storage import confined_rel

log = logging.getLogger(__name__)


def confined_files(files: dict[str, Any], where: str) -> dict[str, Any]:
    """``files`` without the entries whose names leave the checkpoint directory ``where``."""
    bad = [rel for rel in files if not confined_rel(str(rel))]
    for rel in bad:
        log.warning("ignoring %r listed in %s/COMMITTED: not a relative name inside the checkpoint directory",
                    str(rel)[:200], where)
    return {rel: rec for rel, rec in files.items() if rel not in bad}

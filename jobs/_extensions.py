"""A training stage extended to more epochs or steps resumes checkpoints written under its old digest.

The driver records each extension in the stage's ``STATUS.json`` (``extensions``: ``from_digest`` ->
``to_digest``, see ``pipeline/_changes.py``); a resuming worker accepts a checkpoint whose
``config_digest`` is the stage's digest or one an extension chain leads to it from.
"""

from __future__ import annotations

from typing import Any

from jobs.layout import StageStatus


def accepted_digests(status: dict[str, Any], digest: str) -> frozenset[str]:
    """``digest`` and every earlier digest of the stage that an extension chain leads to it from."""
    found = {digest}
    grew = True
    while grew:
        grew = False
        for ext in status.get("extensions") or []:
            if ext.get("to_digest") in found and ext.get("from_digest") not in found:
                found.add(ext["from_digest"])
                grew = True
    return frozenset(found)


def resume_expect(expect: dict[str, Any], stage_url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``expect`` (checkpoint meta a resume must match) with ``config_digest`` widened to the accepted digests."""
    digests = accepted_digests(StageStatus(stage_url, storage_options).read(), expect["config_digest"])
    return {**expect, "config_digest": digests} if len(digests) > 1 else expect

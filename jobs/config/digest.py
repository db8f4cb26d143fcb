"""The digest of a config: sha256 of its canonical JSON (what STATUS and checkpoints record)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace): a config digest."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


"""What ``vitforge status`` reads from a training stage's heartbeat (``jobs/_live.py``).

A ``running`` stage shows the heartbeat's step, loss and images/s when it is newer than the last
checkpoint, so the table moves between checkpoints. A ``running`` stage whose heartbeat is older
than :func:`jobs._live.stale_after_s` (or that never wrote one and whose STATUS has not changed
for :data:`NO_BEAT_STALE_S`) is shown as ``stale``: its gang is gone (a killed driver, a lost
cluster) and ``vitforge run`` again continues it from its last checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from jobs._live import stale_after_s

NO_BEAT_STALE_S = 900.0  # set-up of a big model may take minutes before the first heartbeat


def apply_heartbeat(view: Any, status: dict[str, Any], beat: dict[str, Any] | None, now: float | None = None) -> None:
    """Update a :class:`pipeline.runstore.StageView` of a training stage from its heartbeat."""
    now = time.time() if now is None else now
    if view.state != "running":
        return
    if beat and float(beat.get("time", 0)) >= float(status.get("started_at") or 0):
        view.heartbeat_age_s = max(0.0, now - float(beat["time"]))
        if beat.get("step") is not None and (view.step is None or beat["step"] >= view.step):
            view.step = beat["step"]
            view.total_steps = beat.get("total_steps") or view.total_steps
            view.last_loss = beat.get("loss", view.last_loss)
            view.images_per_s = beat.get("images_per_s") or view.images_per_s
        if view.heartbeat_age_s > stale_after_s():
            view.state = "stale"
            view.duration_s = max(0.0, float(beat["time"]) - float(status.get("started_at") or beat["time"]))
    else:
        last = max(float(status.get(k) or 0) for k in ("started_at", "updated_at"))
        if last and now - last > NO_BEAT_STALE_S:
            view.state = "stale"
            view.heartbeat_age_s = now - last

"""Rank 0's live view of a training stage: ``<stage>/HEARTBEAT.json`` and the trackers.

The heartbeat is rewritten every ``VITFORGE_HEARTBEAT_S`` seconds (default 10) by a background
thread, so it moves during long steps and between checkpoints::

    {"step": 120, "total_steps": 800, "epoch": 3, "loss": 0.61, "lr": 0.0012, "grad_norm": 0.8,
     "images_per_s": 312.0, "eta_s": 220.0, "time": <unix time>, "attempt_started": <unix time>,
     "state": "training" | "done" | "preempted", "host": "...", "pid": 1234}

It is the cross-node channel of live progress: the driver (``pipeline/_progress.py``) prints a
line from it, ``vitforge status`` shows a stage whose heartbeat is older than
:func:`stale_after_s` as ``stale``. Writing it never stops training (a failed write is retried at
the next beat).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from cluster.storage import Store
from jobs._trackers import Trackers

log = logging.getLogger(__name__)

HEARTBEAT = "HEARTBEAT.json"
HEARTBEAT_ENV = "VITFORGE_HEARTBEAT_S"


def heartbeat_every_s() -> float:
    return float(os.environ.get(HEARTBEAT_ENV, 10.0))


def stale_after_s() -> float:
    """A ``running`` stage whose heartbeat is older than this is shown as ``stale`` (6 beats, >= 60 s)."""
    return max(60.0, 6 * heartbeat_every_s())


class StageLive:
    """Heartbeat + trackers of one attempt of a training stage; rank 0 creates it, :meth:`close` ends it."""

    def __init__(self, store: Store, total_steps: int, start_step: int, trackers: Trackers | None = None,
                 every_s: float | None = None) -> None:
        self.store, self.total, self.start_step, self.trackers = store, total_steps, start_step, trackers
        self.started = time.time()
        self._latest: dict[str, Any] = {}
        self._images = self._seconds = 0.0  # since the last beat, for a smoothed images/s
        self._rate: float | None = None
        self._lock = threading.Lock()
        self._stop, self._wake = threading.Event(), threading.Event()
        self._every = heartbeat_every_s() if every_s is None else every_s
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
        self._thread.start()

    def on_step(self, record: dict[str, Any]) -> None:
        """Every step's metrics record (rank 0)."""
        with self._lock:
            first = not self._latest
            self._latest = record
            if record.get("images_per_s") and record.get("step_time_s"):
                self._images += record["images_per_s"] * record["step_time_s"]
                self._seconds += record["step_time_s"]
        if self.trackers is not None:
            self.trackers.log(record)
        if first:
            self._wake.set()  # the first step is news: show it at once

    def checkpointed(self) -> None:
        """A checkpoint was taken: make the trackers' record of every step so far durable."""
        if self.trackers is not None:
            self.trackers.sync()

    def heartbeat(self, state: str = "training") -> dict[str, Any]:
        with self._lock:
            rec = dict(self._latest)
            if self._seconds > 0:
                self._rate, self._images, self._seconds = self._images / self._seconds, 0.0, 0.0
        step = int(rec.get("step", self.start_step))
        done_here, elapsed = step - self.start_step, time.time() - self.started
        eta = (self.total - step) * elapsed / done_here if done_here > 0 else None
        return {"step": step, "total_steps": self.total, "epoch": rec.get("epoch"), "loss": rec.get("loss"),
                "lr": rec.get("lr"), "grad_norm": rec.get("grad_norm"), "images_per_s": self._rate,
                **{k: v for k, v in rec.items() if k.startswith("val_")},
                "eta_s": eta, "time": time.time(), "attempt_started": self.started, "state": state,
                "host": socket.gethostname(), "pid": os.getpid()}

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._every)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._write("training")
            if self.trackers is not None:
                self.trackers.sync()

    def _write(self, state: str) -> None:
        try:
            self.store.put_json(HEARTBEAT, self.heartbeat(state))
        except Exception as exc:  # the store being briefly away must not stop training
            log.debug("heartbeat write failed: %s", exc)

    def close(self, state: str) -> None:
        """Stop beating; write the final heartbeat (``done`` / ``preempted``) and close the trackers."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._write(state)
        if self.trackers is not None:
            self.trackers.close()


def open_live(store: Store, cfg: Any, stage_url: str, total_steps: int, step: int,
              resumed_from: int | None) -> StageLive:
    """Rank 0's :class:`StageLive` for a stage config (its ``trackers`` opened, the run named by the run root)."""
    run = stage_url.rstrip("/").rsplit("/", 3)[-3] if stage_url.count("/") >= 3 else cfg.name
    trackers = Trackers(list(cfg.trackers), store, cfg.name, run, resumed_from, cfg.model_dump(mode="json"))
    return StageLive(store, total_steps, step, trackers)

"""Ctrl-C and SIGTERM while a training gang runs: a preemption, and a second Ctrl-C aborts.

The first SIGINT or SIGTERM writes the stage's ``PREEMPT`` marker: rank 0 sees it within a poll,
every rank finishes its step, checkpoints synchronously, rank 0 writes STATUS ``preempted`` and the
driver exits 75 with the command that continues. A second SIGINT within :data:`ABORT_WINDOW_S`
raises :class:`StopAborted` at once (the caller records it in STATUS and exits 130); the work since
the last committed checkpoint is lost, nothing else.

Ray Train's ``fit()`` would install its own SIGINT handler (abort without a checkpoint): the gang
runs ``fit()`` off the main thread (``cluster/gang.py``), where Ray leaves signals alone.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

from cluster.storage import Store
from jobs.engine import PREEMPT_MARKER

log = logging.getLogger(__name__)

ABORT_WINDOW_S = 5.0  # a second Ctrl-C within this many seconds of the first aborts at once


class StopAborted(KeyboardInterrupt):
    """A second Ctrl-C while a gang was checkpointing to stop: abort without waiting."""


class forward_stop_signals:
    """While a gang runs, SIGTERM/SIGINT write the stage's PREEMPT marker instead of killing us."""

    def __init__(self, store: Store, stage: str) -> None:
        self.store, self.stage, self.saved = store, stage, {}
        self.first: float | None = None

    def _handler(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if signum == signal.SIGINT and self.first is not None and now - self.first <= ABORT_WINDOW_S:
            raise StopAborted(f"second Ctrl-C: stage {self.stage!r} aborted without a final checkpoint")
        if self.first is None:
            threading.Thread(target=self.store.put_bytes, args=(PREEMPT_MARKER, b"stop\n"), daemon=True).start()
        self.first = now
        log.warning("%s: asking the gang of stage %s to checkpoint and stop", name, self.stage)
        print(f"\n{name}: stage {self.stage} is checkpointing and stopping (exit 75; the same command resumes). "
              f"Press Ctrl-C again within {ABORT_WINDOW_S:.0f} s to abort at once.", file=sys.stderr, flush=True)

    def __enter__(self) -> "forward_stop_signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

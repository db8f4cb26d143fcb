"""What the training loop watches and reports: preemption requests and per-step metrics (the
writer of the metrics chunks is :class:`jobs.metrics.MetricsLog`).

Public names are re-exported by :mod:`jobs.engine`; import them from there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch

from cluster.storage import Store
from jobs._engine_config import PREEMPT_MARKER

log = logging.getLogger(__name__)


# ---- preemption -----------------------------------------------------------------------------------


class PreemptionWatch:
    """Sets :attr:`requested` on SIGTERM/SIGINT (when we own the main thread) or when rank 0 sees
    ``<stage>/PREEMPT`` (written by a driver that was told to stop). Ranks agree in :func:`train`."""

    def __init__(self, store: Store | None, poll_s: float = 2.0) -> None:
        self.requested = threading.Event()
        self._saved: dict[int, Any] = {}
        self._stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._on_signal)
                if getattr(self._saved[sig], "received", False):  # a stop recorded while starting (pipeline/launch.py)
                    log.warning("received %s while starting: finishing the first step, then checkpointing and "
                                "exiting", signal.Signals(sig).name)
                    self.requested.set()
        self._thread = None
        if store is not None:
            self._thread = threading.Thread(target=self._poll, args=(store, poll_s), daemon=True,
                                            name="preempt-watch")
            self._thread.start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.warning("received %s: finishing this step, then checkpointing and exiting", signal.Signals(signum).name)
        self.requested.set()

    def _poll(self, store: Store, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                if store.exists(PREEMPT_MARKER):
                    log.warning("preemption requested through %s", store.url_of(PREEMPT_MARKER))
                    self.requested.set()
                    return
            except Exception as exc:  # the store being briefly away must not kill training
                log.debug("preempt marker check failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


# ---- metrics --------------------------------------------------------------------------------------


PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops() -> float | None:
    """Dense bf16 peak of this GPU (``VITFORGE_PEAK_TFLOPS`` overrides); None on CPU or unknown GPUs."""
    if os.environ.get("VITFORGE_PEAK_TFLOPS"):
        return float(os.environ["VITFORGE_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)

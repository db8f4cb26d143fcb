"""What the training loop watches and reports: preemption requests and per-step metrics.

Public names are re-exported by :mod:`jobs.engine`; import them from there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import torch

from cluster.storage import Store
from jobs._engine_config import PREEMPT_MARKER
from jobs.layout import METRICS_NAME

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


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: kept in memory, shipped inside checkpoints and to the stage dir."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.store, self.enabled, self.lines = store, enabled, []
        self._upload: threading.Thread | None = None

    def restore(self, text: str, upto_step: int) -> None:
        self.lines = [ln for ln in text.splitlines() if ln and json.loads(ln)["step"] <= upto_step]

    def add(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.lines.append(json.dumps(record, sort_keys=True))

    def text(self) -> str:
        return "".join(ln + "\n" for ln in self.lines)

    def publish(self, sync: bool = False) -> None:
        """Upload ``metrics.jsonl`` to the stage directory (in the background unless ``sync``)."""
        if not self.enabled:
            return
        if self._upload is not None:
            self._upload.join()
        data = self.text().encode()
        if sync:
            self.store.put_bytes(METRICS_NAME, data)
            return
        self._upload = threading.Thread(target=self._put, args=(data,), daemon=True, name="metrics-upload")
        self._upload.start()

    def _put(self, data: bytes) -> None:
        try:
            self.store.put_bytes(METRICS_NAME, data)
        except Exception as exc:  # metrics are also inside every checkpoint; the next publish retries
            log.warning("could not upload metrics.jsonl: %s", exc)

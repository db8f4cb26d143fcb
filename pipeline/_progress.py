"""Live progress of a training stage on the driver, from rank 0's heartbeat in the store.

While a gang runs, the driver polls ``<stage>/HEARTBEAT.json`` (written by rank 0 every
``VITFORGE_HEARTBEAT_S`` seconds, ``jobs/_live.py``) and prints one line per new heartbeat, whether
or not stdout is a terminal (logs, ``ray job logs``, CI)::

    [pretrain] step 120/800 (15%)  loss 0.6123  lr 1.20e-03  grad 0.83  312 img/s  eta 3:40

On a terminal a rich progress bar sits below the lines. The store is the channel because it is
what every node of a cluster already shares with the driver (a worker on another node writes it,
a driver anywhere reads it); the same file feeds ``vitforge status``.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

from cluster.storage import Store
from jobs._live import HEARTBEAT

log = logging.getLogger(__name__)

POLL_S = 2.0


def progress_line(stage: str, beat: dict[str, Any]) -> str:
    """One heartbeat as a line: step/total, loss, lr, grad norm, images/s, val metrics, ETA."""
    step, total = beat.get("step"), beat.get("total_steps")
    parts = [f"[{stage}] step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "")]
    for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3g}"),
                     ("images_per_s", "{:,.0f} img/s"), ("val_top1", "val top-1 {:.1%}"), ("val_loss", "val loss {:.4f}")):
        if isinstance(beat.get(key), (int, float)):
            parts.append(fmt.format(beat[key]))
    if beat.get("state") not in (None, "training"):
        parts.append(str(beat["state"]))
    elif isinstance(beat.get("eta_s"), (int, float)):
        parts.append(f"eta {_clock(beat['eta_s'])}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class live_progress:
    """Context manager: print ``stage``'s heartbeats while the block (the gang) runs."""

    def __init__(self, store: Store, stage: str, out: TextIO | None = None, rich: bool | None = None,
                 poll_s: float = POLL_S) -> None:
        self.store, self.stage, self.out, self.poll_s = store, stage, out or sys.stdout, poll_s
        self.rich = self.out.isatty() if rich is None else rich
        self._stop = threading.Event()
        self._seen: Any = None
        self._shown: Any = None
        self._bar: Any = None

    def __enter__(self) -> "live_progress":
        self._seen = self._read_time()  # a heartbeat left by an earlier attempt is not news
        if self.rich:
            self._bar = _RichBar(self.stage)
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"progress-{self.stage}")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()

    def _read(self) -> dict[str, Any] | None:
        try:
            return dict(self.store.get_json(HEARTBEAT))
        except Exception:  # not written yet, or the store briefly away: the next poll tries again
            return None

    def _read_time(self) -> Any:
        beat = self._read()
        return beat.get("time") if beat else None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            beat = self._read()
            if not beat or beat.get("time") == self._seen:
                continue
            self._seen = beat.get("time")
            news = (beat.get("step"), beat.get("state"))
            if news != self._shown:  # a beat of a slow step repeats the last line: skip it
                self._shown = news
                self.show(beat)

    def show(self, beat: dict[str, Any]) -> None:
        line = progress_line(self.stage, beat)
        if self._bar is not None:
            self._bar.update(beat, line)
        else:
            print(line, file=self.out, flush=True)


class _RichBar:
    """A rich progress bar for a terminal; lines print above it."""

    def __init__(self, stage: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
        self.task = self.progress.add_task(stage, total=None, info="starting")
        self.progress.start()

    def update(self, beat: dict[str, Any], line: str) -> None:
        info = f"loss {beat['loss']:.4f}" if isinstance(beat.get("loss"), (int, float)) else ""
        self.progress.update(self.task, completed=beat.get("step") or 0, total=beat.get("total_steps"), info=info)
        self.progress.console.print(line)

    def close(self) -> None:
        self.progress.stop()

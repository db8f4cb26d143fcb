"""Fault injection for tests: a step callback that SIGKILLs one worker once, right after a given step.

Not part of the training loop: a stage job's test-only ``fault`` (:class:`FaultHooks`) becomes this
callback in :func:`jobs.stage.run_worker`, which hands it to :func:`jobs.engine.train` as an
``on_step`` callback. Tests set it with ``RunSpec.stage_job(..., fault={...})`` or
``run_spec(..., fault={...})``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # annotations only: FaultHooks (a StageJob field) stays importable without torch
    from jobs._engine_config import StepEnd

log = logging.getLogger(__name__)

COMMIT_WAIT_S = 120.0  # how long the victim waits for its last save to commit before it dies


class FaultHooks(BaseModel):
    """Fault injection for tests: SIGKILL rank ``kill_rank`` once, right after step ``kill_at_step``."""

    model_config = ConfigDict(extra="forbid")

    kill_at_step: int | None = Field(default=None, ge=0)
    kill_rank: int | None = Field(default=None, ge=0)

    def callbacks(self) -> list[Callable[[StepEnd], None]]:
        """The step callbacks these hooks ask for (none when ``kill_at_step`` is unset)."""
        return [self._kill] if self.kill_at_step is not None else []

    def _kill(self, end: StepEnd) -> None:
        """SIGKILL this worker after step ``kill_at_step`` of a fresh attempt (not of the resumed one), once
        its last save is committed, so the rerun has that checkpoint to resume from."""
        if end.step != self.kill_at_step or end.rank != (self.kill_rank or 0) or end.resumed_from is not None:
            return
        end.checkpoints.wait()
        deadline = time.monotonic() + COMMIT_WAIT_S
        while end.saved_step and time.monotonic() < deadline:
            latest = end.checkpoints.latest()
            if latest is not None and latest.step >= end.saved_step:
                break
            time.sleep(0.2)
        log.warning("fault injection: SIGKILL rank %d after step %d", end.rank, end.step)
        os.kill(os.getpid(), signal.SIGKILL)

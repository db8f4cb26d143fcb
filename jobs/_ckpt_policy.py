"""Checkpoint *policy*: when a checkpoint is due and which committed ones to keep. No I/O, no collectives.

:class:`CheckpointPolicy` is a stage's ``checkpoint:`` mapping; its decisions are pure functions
of their arguments. :class:`CheckpointSchedule` adds the one thing a policy needs to remember, the
last save (step and clock time), with the clock injected so tests can drive it.

Storage (stage, upload, commit, restore) is :class:`jobs.checkpoint.CheckpointManager`; it holds a
schedule, tells it of every save and restore, and asks :meth:`CheckpointPolicy.to_delete` which
step directories retention removes. With ``every_minutes`` every rank must agree on whether the
time has come: rank 0's clock decides. The engine folds rank 0's :meth:`CheckpointSchedule.time_due`
into its one per-step all-reduce and passes the agreed flag to :meth:`CheckpointSchedule.due`, so a
step costs one collective with or without ``every_minutes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CheckpointPolicy", "CheckpointSchedule"]


class CheckpointPolicy(BaseModel):
    """When to checkpoint and how many committed checkpoints to keep (a stage's ``checkpoint:``)."""

    model_config = ConfigDict(extra="forbid")

    every_steps: int | None = Field(default=None, ge=1, description="save when step % every_steps == 0")
    every_minutes: float | None = Field(default=None, gt=0, description="save when this long since the last save")
    keep_last: int = Field(default=2, ge=1, description="committed checkpoints kept; older ones are deleted")

    @model_validator(mode="after")
    def _some_trigger(self) -> "CheckpointPolicy":
        if self.every_steps is None and self.every_minutes is None:
            raise ValueError("checkpoint: give every_steps and/or every_minutes")
        return self

    @property
    def timed(self) -> bool:
        """Whether a clock takes part (``every_minutes``): then the ranks must agree on the time."""
        return self.every_minutes is not None

    def due_by_steps(self, step: int) -> bool:
        """``step`` is a positive multiple of ``every_steps``."""
        return self.every_steps is not None and step > 0 and step % self.every_steps == 0

    def due_by_time(self, seconds_since_save: float) -> bool:
        """``every_minutes`` have passed since the last save (or start / restore)."""
        return self.every_minutes is not None and seconds_since_save >= self.every_minutes * 60

    def to_delete(self, steps: Iterable[tuple[int, str]], newest: int, committed: Callable[[str], bool],
                  verifies: Callable[[str], bool]) -> list[str]:
        """Retention after ``newest`` committed: the step directories (``(step, name)`` of every one there) to
        delete, in the order to delete them.

        Kept: the newest ``keep_last`` committed checkpoints up to ``newest``, and beyond them the newest
        one that ``verifies`` (a fallback a restore can use) when none of those does; ``newest`` itself.
        Every other directory up to ``newest`` (committed, or a stale uncommitted one) goes; directories
        newer than ``newest`` may be uploads in progress and stay. ``committed`` / ``verifies`` are asked
        newest first, ``verifies`` only until one says yes.
        """
        out: list[str] = []
        kept, verified = 0, False
        for s, name in sorted(((s, n) for s, n in steps if s <= newest), reverse=True):
            if committed(name) and (kept < self.keep_last or not verified):
                kept += 1
                verified = verified or verifies(name)
            elif s != newest:
                out.append(name)
        return out


class CheckpointSchedule:
    """A :class:`CheckpointPolicy` and the last save: whether a checkpoint is due after a step.

    ``clock`` (seconds, monotonic) is read only by :meth:`time_due` and :meth:`saved`. Nothing here
    talks to other ranks: a caller with several ranks agrees on :meth:`time_due` (rank 0's) first.
    """

    def __init__(self, policy: CheckpointPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.clock = policy, clock
        self.last_step: int | None = None
        self.last_time = clock()

    def time_due(self) -> bool:
        """This process's clock only: ``every_minutes`` have passed since the last save."""
        return self.policy.due_by_time(self.clock() - self.last_time)

    def due(self, step: int, time_flag: bool | None = None) -> bool:
        """Whether to checkpoint after ``step``: by steps, or (``every_minutes``) when ``time_flag`` says the
        time has come (default: this process's :meth:`time_due`). Never twice at the same step."""
        if step == self.last_step:
            return False
        if not self.policy.timed:
            return self.policy.due_by_steps(step)
        return self.policy.due_by_steps(step) or (self.time_due() if time_flag is None else bool(time_flag))

    def saved(self, step: int) -> None:
        """A checkpoint of ``step`` was written (or restored): the time counts from now."""
        self.last_step, self.last_time = step, self.clock()

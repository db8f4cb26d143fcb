"""A training rank (``python tests/_traced_mae.py --job JOB``, under torchrun) whose MAE method records
the sample ids of every micro-batch it trains on, so a test can check what was consumed.

The real MAE method and engine run unchanged; :class:`TracedMAEMethod` only appends
``{"step": s, "ids": [...]}`` to ``$VITFORGE_TEST_TRACE/rank<r>.jsonl`` before each micro-step
(``s`` counts completed steps, so metrics step ``s + 1``), and with ``VITFORGE_TEST_PREEMPT_AT=s``
sends its own process SIGTERM as step ``s + 1`` begins: the engine finishes that step, checkpoints
it and exits preempted, a deterministic stop for a resumed run (``fault`` kills only first attempts).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from jobs.mae import MAEConfig, MAEMethod

__all__ = ["MAEConfig", "TracedMAEMethod"]


class TracedMAEMethod(MAEMethod):
    def step(self, model: Any, batch: dict[str, Any], step: int):
        trace = os.environ.get("VITFORGE_TEST_TRACE")
        if trace:
            with open(os.path.join(trace, f"rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "ids": batch["index"].tolist()}) + "\n")
        stop = os.environ.get("VITFORGE_TEST_PREEMPT_AT")
        if stop is not None and int(stop) == step and self.rank == 0 and not getattr(self, "_stopped", False):
            self._stopped = True
            os.kill(os.getpid(), signal.SIGTERM)  # the engine's handler: finish this step, checkpoint, stop
        return super().step(model, batch, step)


if __name__ == "__main__":
    from pipeline import launch
    from jobs.method import register

    register(TracedMAEMethod, replace=True)  # kind "mae" runs the traced variant in this process
    sys.exit(launch.main(sys.argv[1:]))

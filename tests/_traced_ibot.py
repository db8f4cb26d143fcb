"""A training rank (``python tests/_traced_ibot.py --job JOB``, under torchrun) whose iBOT method records
the sample ids of every micro-batch it trains on in ``$VITFORGE_TEST_TRACE/rank<r>.jsonl``
(``{"step": s, "ids": [...]}``, ``s`` counting completed steps); the method and engine are unchanged."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from jobs.ibot import IBOTMethod


class TracedIBOTMethod(IBOTMethod):
    def step(self, model: Any, batch: dict[str, Any], step: int):
        record = {"step": step, "ids": batch["index"].tolist()}
        with open(os.path.join(os.environ["VITFORGE_TEST_TRACE"], f"rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return super().step(model, batch, step)


if __name__ == "__main__":
    from jobs.method import register
    from pipeline import launch

    register(TracedIBOTMethod, replace=True)  # kind "ibot" runs the traced variant in this process
    sys.exit(launch.main(sys.argv[1:]))

"""Test worker: one-rank fine-tune that saves real DeepSpeed checkpoints in a given precision / offload
setting (``save``), or resumes from them through the engine's weights-only restore (``resume``).

    python tests/_ckpt_kinds_worker.py '{"precision": "bf16", "zero_stage": 2}' WORK save|resume

``save`` prints ``GLOBALS <json>``: every non-tensor global the checkpoint files hold.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_util import TINY_MODEL, write_digit_shards  # noqa: E402
from jobs.finetune import run_finetune  # noqa: E402


def main(variant: dict, work: str, phase: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    shards, stage = os.path.join(work, "shards"), os.path.join(work, "stage")
    if phase == "save":
        write_digit_shards(shards, images=40, per_shard=20)
    cfg = {"name": "ft", "data": shards, "num_classes": 10, "max_steps": 2, "batch_size": 4, "loader_workers": 0,
           "trackers": [], "model": TINY_MODEL, "checkpoint": {"every_steps": 1, "keep_last": 2}, **variant}
    run_finetune(cfg, data_url=shards, stage_url=stage)  # resume: restores step 2, then has nothing left to do
    if phase == "save":
        found: set[str] = set()
        for f in glob.glob(os.path.join(stage, "checkpoints", "step-*", "**", "*"), recursive=True):
            if f.endswith((".pt", ".pkl")):  # what torch.save wrote (DeepSpeed states, accelerate's RNG)
                found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        print("GLOBALS " + json.dumps(sorted(found)))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3])

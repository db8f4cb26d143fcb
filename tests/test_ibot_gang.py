"""iBOT end to end on 2 CPU workers (gloo, DeepSpeed ZeRO-3, checkpoints on SeaweedFS S3): a SIGKILLed
worker resumes to the same per-step losses, and a 2-worker checkpoint resumed on 1 worker trains on
every sample of each epoch exactly once (the masks are per sample, so they follow the samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _shards_util import write_shards
from _train_util import (ROOT, TINY_MODEL, assert_same_losses, finish, losses, metrics, status, torchrun,
                         write_job, write_spec)

STEPS, PER_EPOCH, SAMPLES = 8, 4, 64  # global batch 16: 4 steps an epoch
STAGE = {
    "name": "pretrain", "kind": "ibot", "model": TINY_MODEL,
    "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, "patch_out_dim": 48, "local_crops": 2,
    "max_steps": STEPS, "batch_size": 8, "zero_stage": 3, "loader_workers": 0,
    "checkpoint": {"every_steps": 2, "keep_last": 2}, "koleo_weight": 0.1,
    "optim": {"base_lr": 5.0e-3, "warmup_steps": 2}, "teacher_momentum": 0.9,
    "warmup_teacher_temp_epochs": 0.5, "freeze_last_layer_epochs": 0.5,
}


@pytest.fixture(scope="module")
def data(s3) -> str:
    url = f"s3://{s3.bucket}/ibot-shards-{os.getpid()}"
    write_shards(url, [8] * 8)
    return url


def _traced(job: str, nproc: int, trace: str) -> tuple[int, str]:
    os.makedirs(trace, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(ROOT, "tests", "_traced_ibot.py"), "--job", job]
    return finish(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "VITFORGE_TEST_TRACE": trace},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True), timeout=600)


def _served(trace: str, ranks: int) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for rank in range(ranks):
        with open(os.path.join(trace, f"rank{rank}.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                steps.setdefault(rec["step"], []).extend(rec["ids"])
    return steps


@pytest.mark.slow
@pytest.mark.faults
def test_ibot_killed_worker_resumes_to_the_same_losses_and_on_one_worker_serves_every_sample_once(data, s3, tmp_path):
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    rc, out = finish(torchrun(write_spec(tmp_path, storage, "ref", {**STAGE, "data": data})))
    assert rc == 0, out[-4000:]
    ref = metrics(storage, "ref")
    assert all(r["patch_loss"] > 0 and r["cls_loss"] > 0 and "koleo" in r for r in ref)

    spec = write_spec(tmp_path, storage, "kill", {**STAGE, "data": data})
    rc, out = finish(torchrun(job=write_job(spec, "pretrain", fault={"kill_rank": 1, "kill_at_step": 5})))
    assert rc != 0 and status(storage, "kill")["state"] == "running", out[-3000:]
    rc, out = finish(torchrun(spec))
    assert rc == 0, out[-4000:]
    st = status(storage, "kill")
    assert st["state"] == "done" and st["resumed_from"] == 4
    assert_same_losses(losses(storage, "kill"), [r["loss"] for r in ref], STEPS)

    spec = write_spec(tmp_path, storage, "shrink", {**STAGE, "data": data})
    rc, out = _traced(write_job(spec, "pretrain", fault={"kill_rank": 0, "kill_at_step": 5}), 2,
                      str(tmp_path / "trace-1"))
    assert rc != 0, out[-3000:]
    rc, out = _traced(write_job(spec, "pretrain"), 1, str(tmp_path / "trace-2"))
    assert rc == 0 and "on 1 workers" in out, out[-4000:]
    first, second = _served(str(tmp_path / "trace-1"), 2), _served(str(tmp_path / "trace-2"), 1)
    consumed = [first[s] for s in range(4)] + [second[s] for s in range(4, STEPS)]
    for epoch in range(STEPS // PER_EPOCH):
        served = [i for s in range(epoch * PER_EPOCH, (epoch + 1) * PER_EPOCH) for i in consumed[s]]
        assert sorted(served) == list(range(SAMPLES)), f"epoch {epoch}: samples missing or repeated"
    got = losses(storage, "shrink")
    assert_same_losses(got[:4], [r["loss"] for r in ref[:4]], 4)
    assert len(got) == STEPS and status(storage, "shrink")["world_size"] == 1

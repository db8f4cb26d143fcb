"""CheckpointManager across processes: a real 2-rank DeepSpeed ZeRO-2 gang on gloo, and kill -9.

Gang members are spawned with torch.multiprocessing; kill -9 victims run this file as a script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.localstore import free_ports
from cluster.storage import Store
from jobs.checkpoint import CheckpointManager, CheckpointPolicy, capture_rng_state, restore_rng_state

WORLD = 2


def _init_gang(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")


def _ds_gang(rank: int, port: int, url: str, out_dir: str) -> None:
    """A DeepSpeed ZeRO-2 toy model: checkpoint every 2 steps through engine.save_checkpoint, run 2 steps
    past the last one, restore it in a fresh manager, run the same 2 steps again; record both."""
    _init_gang(rank, port)
    import deepspeed

    from jobs._engine_config import _skip_deepspeed_shm_op
    _skip_deepspeed_shm_op()  # as the engine does on CPU: no minutes-long C++ build on a fresh machine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
                                      config=config)
    torch.manual_seed(rank)                      # each rank draws its own random streams

    def train(step: int) -> float:
        g = torch.Generator().manual_seed(10 * step + rank)
        loss = engine(torch.randn(2, 8, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        return loss.item()

    policy = CheckpointPolicy(every_steps=2, keep_last=2)
    ckpt = CheckpointManager(url, policy, rank=rank, world_size=WORLD)
    timed = CheckpointManager(url, CheckpointPolicy(every_minutes=60), rank=rank, world_size=WORLD)
    if rank == 1:
        timed.schedule.last_time -= 7200  # rank 1's clock alone says "due"; rank 0's decides
    timed_due = timed.due(1)
    for step in range(1, 7):
        train(step)
        if ckpt.due(step):
            meta = {"step": step, "rank": rank, "rng": capture_rng_state(), "loader": {"pos": step * (rank + 1)}}
            ckpt.save(step, lambda d: engine.save_checkpoint(d, tag="ds"), meta)
            ckpt.wait()  # each one committed: a save that outran a slow upload could supersede step 4
            saved_draw = torch.rand(4).tolist()
    first = [train(step) for step in (7, 8)]
    ckpt.close()
    dist.barrier()  # rank 0's close() returned only after committing step 6

    meta = CheckpointManager(url, policy, rank=rank, world_size=WORLD).restore(
        lambda d: engine.load_checkpoint(d, tag="ds"), own_files_only=True)
    restore_rng_state(meta["rng"])
    result = {"first": first, "again": [train(step) for step in (7, 8)],
              "meta": {k: meta[k] for k in ("step", "rank", "loader")},
              "draw_after_restore": torch.rand(4).tolist(), "draw_after_save": saved_draw, "timed_due": timed_due}
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (torch's compile workers take seconds to stop)


@pytest.fixture(scope="module")
def ds_gang(s3, tmp_path_factory):
    """One real 2-rank DeepSpeed ZeRO-2 gang on gloo; its store URL and each rank's record."""
    url = f"s3://{s3.bucket}/ds-gang-{uuid.uuid4().hex[:8]}/stages/pretrain"
    out = tmp_path_factory.mktemp("ds-gang")
    mp.spawn(_ds_gang, args=(free_ports(1)[0], url, str(out)), nprocs=WORLD, join=True)
    return url, [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.faults
def test_deepspeed_zero2_resume_from_object_storage_repeats_the_same_losses(ds_gang):
    _, ranks = ds_gang
    for rank, rec in enumerate(ranks):
        assert rec["again"] == rec["first"], f"rank {rank} continued differently after restore"


@pytest.mark.faults
def test_each_rank_restores_its_own_meta_and_rng_streams(ds_gang):
    _, ranks = ds_gang
    for rank, rec in enumerate(ranks):
        assert rec["meta"] == {"step": 6, "rank": rank, "loader": {"pos": 6 * (rank + 1)}}
        assert rec["draw_after_restore"] == rec["draw_after_save"]
    assert ranks[0]["draw_after_save"] != ranks[1]["draw_after_save"]


def test_time_based_due_follows_rank_0s_clock_on_every_rank(ds_gang):
    _, ranks = ds_gang
    assert [rec["timed_due"] for rec in ranks] == [False, False]


@pytest.mark.faults
def test_gang_commits_only_checkpoints_holding_every_ranks_files(ds_gang):
    url, _ = ds_gang
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=2))
    committed = ckpt.committed()
    assert [c.step for c in committed] == [4, 6] and ckpt.latest().step == 6
    for info in committed:
        assert info.world_size == WORLD
        writers = {rel: rec["rank"] for rel, rec in info.files.items()}
        assert writers["ds/mp_rank_00_model_states.pt"] == 0
        assert [writers[f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in range(WORLD)] == [0, 1]
        for rel, rec in info.files.items():
            assert ckpt.store.size(f"{info.name}/{rel}") == rec["size"]
    leftover = ckpt.store.fs.find(ckpt.store.path("step-00000002"), detail=True)
    assert [p for p, d in leftover.items() if d["type"] == "file"] == [], "retention deleted step 2's objects"


# ---- kill -9 -----------------------------------------------------------------------------------


def _victim(url: str, world_size: int) -> None:
    """Commit step 1, then on "go" start an async save of step 2 and wait forever to be killed."""
    policy = CheckpointPolicy(every_steps=1)
    first = CheckpointManager(url, policy)
    first.save(1, lambda d: torch.save({"w": torch.ones(64)}, os.path.join(d, "model.pt")), {"step": 1}, sync=True)
    print("committed 1", flush=True)
    sys.stdin.readline()
    ckpt = CheckpointManager(url, policy, rank=0, world_size=world_size, session_id="victim")
    ckpt.save(2, lambda d: torch.save({"w": torch.full((64,), 2.0)}, os.path.join(d, "model.pt")), {"step": 2})
    print("saved 2", flush=True)
    sys.stdin.readline()


def _spawn_victim(url: str, world_size: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, url, str(world_size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "committed 1"
    return proc


def _assert_step_1_survives(url: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1))
    assert [c.step for c in ckpt.committed()] == [1] and ckpt.latest().step == 1
    out: dict = {}
    meta = ckpt.restore(lambda d: out.update(torch.load(os.path.join(d, "model.pt"), weights_only=True)))
    assert meta["step"] == 1 and torch.equal(out["w"], torch.ones(64))


@pytest.mark.faults
def test_kill_9_during_upload_leaves_previous_checkpoint_latest(s3_server, monkeypatch):
    server = s3_server()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{server.bucket}/run/stages/pretrain"
    proc = _spawn_victim(url, 1, server.env())
    server.freeze()
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "saved 2"  # save() returned; its upload cannot get through
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        server.thaw()
    _assert_step_1_survives(url, server.env())


@pytest.mark.faults
def test_kill_9_between_last_upload_and_commit_leaves_previous_checkpoint_latest(s3, s3_url):
    url = s3_url + "/stages/pretrain"
    proc = _spawn_victim(url, 2, s3.env())  # rank 0 of 2: uploads everything, then waits for rank 1's marker
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "saved 2"
    store = Store(url).child("checkpoints")
    deadline = time.monotonic() + 30
    while not store.exists("step-00000002/ranks/rank-00000.done"):  # rank 0's last upload
        assert time.monotonic() < deadline, "rank 0 never finished uploading"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.exists("step-00000002/model.pt") and not store.exists("step-00000002/COMMITTED")
    _assert_step_1_survives(url, s3.env())


if __name__ == "__main__":
    _victim(sys.argv[1], int(sys.argv[2]))

"""CheckpointManager across processes: real 2-rank gloo gangs (plain torch and DeepSpeed ZeRO-2) and kill -9.

Gang members are spawned with torch.multiprocessing; kill -9 victims run this file as a script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def _rank_state(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"exp_avg": torch.randn(32, generator=g), "exp_avg_sq": torch.rand(32, generator=g)}


def _torch_gang(rank: int, port: int, url: str) -> None:
    """Save every 2 steps (async), then restore the latest in a fresh manager on the same gang."""
    _init_gang(rank, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)                # replicated, as data parallelism has it
    torch.manual_seed(rank)                      # but each rank draws its own random streams
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=2, keep_last=2), rank=rank, world_size=WORLD)

    def write(d: str) -> None:
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        os.makedirs(os.path.join(d, "optim"), exist_ok=True)
        torch.save(_rank_state(rank, step), os.path.join(d, "optim", f"rank-{rank:05d}.pt"))

    for step in range(1, 7):
        with torch.no_grad():
            model.weight.add_(0.1)
        if ckpt.due(step):
            ckpt.save(step, write, {"step": step, "rank": rank, "rng": capture_rng_state(), "loader": {"pos": step * rank}})
            saved_draw = torch.rand(4)
    ckpt.close()
    dist.barrier()  # rank 0's commit of step 6 is done once its close() returned; others wait for it here

    loaded: dict = {}

    def read(d: str) -> None:
        loaded["model"] = torch.load(os.path.join(d, "model.pt"), weights_only=True)
        loaded["optim"] = torch.load(os.path.join(d, "optim", f"rank-{rank:05d}.pt"), weights_only=True)

    fresh = CheckpointManager(url, CheckpointPolicy(every_steps=2), rank=rank, world_size=WORLD)
    meta = fresh.restore(read)
    assert (meta["step"], meta["rank"], meta["loader"]) == (6, rank, {"pos": 6 * rank})
    torch.testing.assert_close(loaded["model"], model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(loaded["optim"], _rank_state(rank, 6), rtol=0, atol=0)
    restore_rng_state(meta["rng"])
    assert torch.equal(torch.rand(4), saved_draw), "each rank gets back its own RNG streams"
    fresh.close()
    dist.destroy_process_group()


def test_two_rank_gang_commits_only_checkpoints_holding_both_ranks_files(s3_url):
    url = s3_url + "/stages/pretrain"
    mp.spawn(_torch_gang, args=(free_ports(1)[0], url), nprocs=WORLD, join=True)
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=2))
    committed = ckpt.committed()
    assert [c.step for c in committed] == [4, 6]
    for info in committed:
        assert info.world_size == WORLD
        assert {rel: rec["rank"] for rel, rec in info.files.items()} == {
            "model.pt": 0, "optim/rank-00000.pt": 0, "optim/rank-00001.pt": 1}
        for rel in info.files:
            assert ckpt.store.exists(f"{info.name}/{rel}")
    leftover = ckpt.store.fs.find(ckpt.store.path("step-00000002"), detail=True)
    assert [p for p, d in leftover.items() if d["type"] == "file"] == [], "retention deleted step 2's objects"


# ---- DeepSpeed ZeRO-2 --------------------------------------------------------------------------


def _ds_gang(rank: int, port: int, url: str, out_path: str) -> None:
    """Train 3 steps, checkpoint through engine.save_checkpoint, train 2 more; restore; train the same 2 again."""
    _init_gang(rank, port)
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
                                      config=config)

    def train(step: int) -> float:
        g = torch.Generator().manual_seed(10 * step + rank)
        loss = engine(torch.randn(2, 8, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        return loss.item()

    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=3), rank=rank, world_size=WORLD)
    for step in (1, 2, 3):
        train(step)
    ckpt.save(3, lambda d: engine.save_checkpoint(d, tag="ds"), {"step": 3})
    first = [train(step) for step in (4, 5)]
    ckpt.close()
    dist.barrier()

    meta = CheckpointManager(url, CheckpointPolicy(every_steps=3), rank=rank, world_size=WORLD).restore(
        lambda d: engine.load_checkpoint(d, tag="ds"))
    again = [train(step) for step in (meta["step"] + 1, meta["step"] + 2)]
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"first": first, "again": again}, f)
    dist.destroy_process_group()


def test_deepspeed_zero2_checkpoint_round_trips_through_object_storage(s3_url, tmp_path):
    url = s3_url + "/stages/pretrain"
    mp.spawn(_ds_gang, args=(free_ports(1)[0], url, str(tmp_path / "losses")), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        losses = json.loads((tmp_path / f"losses.{rank}").read_text())
        assert losses["again"] == losses["first"], f"rank {rank} continued differently after restore"
    info = CheckpointManager(url, CheckpointPolicy(every_steps=3)).latest()
    writers = {rel: rec["rank"] for rel, rec in info.files.items()}
    assert writers["ds/mp_rank_00_model_states.pt"] == 0
    assert {writers[f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in range(WORLD)} == {0, 1}


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

"""CheckpointManager in one process: commit protocol, async uploads, errors, retention, staging faults.

Storage is a real SeaweedFS (session server, or a private one a test freezes or kills) or a local dir.
"""

from __future__ import annotations

import errno
import os
import random
import threading

import numpy as np
import pydantic
import pytest
import torch

from cluster.storage import RetryPolicy, Store, StorageAuthError, StorageError
from jobs.checkpoint import (CheckpointCommitError, CheckpointManager, CheckpointMismatchError, CheckpointPolicy,
                             CheckpointStagingError, capture_rng_state, restore_rng_state)

FAST = RetryPolicy(outage_window_s=1.0, first_backoff_s=0.1, max_backoff_s=0.2)


def tensors_for(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}


def writer(step: int, log: list | None = None):
    def write(d: str) -> None:
        if log is not None:
            log.append(("write", step))
        torch.save(tensors_for(step), os.path.join(d, "model.pt"))
        os.makedirs(os.path.join(d, "optim"))
        torch.save({"exp_avg": tensors_for(step + 1000)["w"]}, os.path.join(d, "optim", "rank-0.pt"))
    return write


def load_into(out: dict):
    def read(d: str) -> None:
        out["model"] = torch.load(os.path.join(d, "model.pt"), weights_only=True)
        out["optim"] = torch.load(os.path.join(d, "optim", "rank-0.pt"), weights_only=True)
    return read


def private_opts(server, identity=None) -> dict:
    ident = identity or server.admin
    return {"key": ident.access_key, "secret": ident.secret_key, "client_kwargs": {"endpoint_url": server.endpoint}}


@pytest.fixture(params=["file", "s3"])
def stage_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/run/stages/pretrain"
    return request.getfixturevalue("s3_url") + "/stages/pretrain"


def test_save_commit_latest_restore_round_trip(stage_url, tmp_path):
    policy = CheckpointPolicy(every_steps=5, keep_last=2)
    with CheckpointManager(stage_url, policy, local_dir=str(tmp_path / "stage")) as ckpt:
        assert ckpt.latest() is None
        for step in range(1, 16):
            if ckpt.due(step):
                ckpt.save(step, writer(step), {"step": step, "loader": {"epoch": 0, "pos": step * 4}})
    info = CheckpointManager(stage_url, policy).latest()
    assert (info.step, info.world_size, info.meta["loader"]) == (15, 1, {"epoch": 0, "pos": 60})
    assert set(info.files) == {"model.pt", "optim/rank-0.pt"} and info.files["model.pt"]["rank"] == 0

    out: dict = {}
    meta = CheckpointManager(stage_url, policy).restore(load_into(out))
    assert meta["step"] == 15
    torch.testing.assert_close(out["model"], tensors_for(15), rtol=0, atol=0)
    torch.testing.assert_close(out["optim"]["exp_avg"], tensors_for(1015)["w"], rtol=0, atol=0)
    assert not os.listdir(tmp_path / "stage" / "rank-00000"), "local staging copies are removed after upload"


@pytest.mark.faults
def test_save_returns_while_upload_is_blocked_and_commits_after_thaw(s3_server, tmp_path):
    server = s3_server()
    url = f"s3://{server.bucket}/run/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1), storage_options=private_opts(server))
    ckpt.save(1, writer(1), {"step": 1}, sync=True)
    server.freeze()
    try:
        ckpt.save(2, writer(2), {"step": 2})       # returns although no request can be answered
        assert ckpt.upload_in_flight
    finally:
        server.thaw()
    ckpt.wait()
    assert ckpt.latest().step == 2
    ckpt.close()


def test_a_save_blocks_for_its_local_write_only_and_the_oldest_of_keep_last_waiting_is_superseded(s3_server,
                                                                                                    tmp_path):
    """With the store frozen mid-upload, saves 3, 4 and 5 return while step 2 is provably still uploading;
    3 and 4 wait (keep_last = 2 may wait), 5 supersedes 3 (never uploaded, its staging copy gone): a
    checkpoint that retention would delete anyway once 4 and 5 commit. close() commits 2, 4, then 5."""
    server = s3_server()
    url = f"s3://{server.bucket}/run/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1, keep_last=2), storage_options=private_opts(server),
                             local_dir=str(tmp_path / "stage"))
    events: list = []
    put_file = ckpt.store.put_file

    def observed_put(local: str, rel: str, **kw):  # observe, then do the real upload
        digest = put_file(local, rel, **kw)
        events.append(("put", rel.split("/")[0]))
        return digest

    def staged() -> list[str]:
        return sorted(os.listdir(tmp_path / "stage" / "rank-00000"))

    ckpt.store.put_file = observed_put
    ckpt.save(1, writer(1, events), {"step": 1}, sync=True)
    server.freeze()
    try:
        ckpt.save(2, writer(2, events), {"step": 2})
        ckpt.save(3, writer(3, events), {"step": 3})   # returns: queued behind step 2's upload
        ckpt.save(4, writer(4, events), {"step": 4})   # queued too: two may wait
        assert ckpt.upload_in_flight and ("put", "step-00000002") not in events, "step 2 is still uploading"
        assert staged() == ["step-00000002", "step-00000003", "step-00000004"] and ckpt.superseded == []
        ckpt.save(5, writer(5, events), {"step": 5})   # supersedes 3, the oldest waiting
        assert ckpt.upload_in_flight and ("put", "step-00000002") not in events
        assert staged() == ["step-00000002", "step-00000004", "step-00000005"]
        assert ckpt.superseded == [3]
    finally:
        server.thaw()
    ckpt.close()
    assert [e for e in events if e[0] == "write"] == [("write", s) for s in (1, 2, 3, 4, 5)]
    puts = [e[1] for e in events if e[0] == "put"]
    assert "step-00000003" not in puts
    last = {n: max(i for i, p in enumerate(puts) if p == n) for n in set(puts)}
    assert last["step-00000002"] < puts.index("step-00000004") and last["step-00000004"] < puts.index("step-00000005")
    assert [c.step for c in ckpt.committed()] == [4, 5] and ckpt.latest().step == 5  # keep_last 2


def test_a_rank_that_superseded_a_step_releases_rank_0_from_committing_it(tmp_path):
    """Rank 1 gave step 2 up (its uploads fell behind) while rank 0 uploaded it: rank 0 does not wait for
    rank 1's marker of step 2, commits nothing for it, and commits step 3 normally."""
    url = f"file://{tmp_path}/run/stages/pretrain"
    policy = CheckpointPolicy(every_steps=1)
    r0 = CheckpointManager(url, policy, rank=0, world_size=2, session_id="s", commit_timeout_s=60)
    r1 = CheckpointManager(url, policy, rank=1, world_size=2, session_id="s", commit_timeout_s=60)
    r1.store.put_json("step-00000002/ranks/rank-00001.superseded", {"session": "s", "rank": 1, "by_step": 3})
    r0.save(2, writer(2), {"step": 2})
    r0.wait()
    assert r0.latest() is None
    r1.save(3, lambda d: open(os.path.join(d, "r1.bin"), "wb").write(b"1"), {"step": 3})
    r0.save(3, writer(3), {"step": 3})
    r0.close()
    r1.close()
    assert [c.step for c in r0.committed()] == [3]


@pytest.mark.faults
def test_upload_error_is_raised_on_the_next_call_not_dropped(s3_server):
    server = s3_server()
    url = f"s3://{server.bucket}/run/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1), storage_options=private_opts(server), retry=FAST)
    ckpt.save(1, writer(1), {"step": 1}, sync=True)
    server.kill()                                   # an outage longer than the retry window
    ckpt.save(2, writer(2), {"step": 2})            # local write succeeds; the upload fails in the background
    ckpt.save(3, writer(3), {"step": 3})            # queued behind it (does not wait for it)
    with pytest.raises(StorageError, match="could not"):
        ckpt.wait()
    ckpt.wait()                                     # raised once, then cleared
    server.start()
    assert ckpt.latest().step == 1
    ckpt.save(4, writer(4), {"step": 4})
    ckpt.close()
    assert ckpt.latest().step == 4


@pytest.mark.faults
def test_permission_error_surfaces_on_wait(s3):
    url = f"s3://{s3.bucket}/readonly-{os.getpid()}/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1), storage_options=private_opts(s3, s3.reader))
    ckpt.save(1, writer(1), {"step": 1})
    with pytest.raises(StorageAuthError, match="permission denied"):
        ckpt.wait()
    ckpt.close()


@pytest.mark.faults
def test_retention_keeps_last_k_and_never_deletes_before_a_newer_commit(tmp_path):
    url = f"file://{tmp_path}/stages/pretrain"
    policy = CheckpointPolicy(every_steps=1, keep_last=2)
    ckpt = CheckpointManager(url, policy)
    for step in (1, 2, 3, 4):
        ckpt.save(step, writer(step), {"step": step})
        ckpt.wait()                                  # each committed (back-to-back saves would supersede)
    ckpt.close()
    assert [c.step for c in ckpt.committed()] == [3, 4]

    # a gang where rank 1 never reports: step 5 stays uncommitted, and nothing older is deleted
    lonely = CheckpointManager(url, policy, rank=0, world_size=2, session_id="s", commit_timeout_s=0.5)
    with pytest.raises(CheckpointCommitError, match="timed out"):
        lonely.save(5, writer(5), {"step": 5}, sync=True)
    lonely.close()
    assert [c.step for c in ckpt.committed()] == [3, 4] and ckpt.latest().step == 4
    assert os.path.isdir(tmp_path / "stages/pretrain/checkpoints/step-00000005")

    ckpt = CheckpointManager(url, policy)
    ckpt.save(6, writer(6), {"step": 6}, sync=True)  # the stale uncommitted step 5 is swept after this commit
    assert sorted(os.listdir(tmp_path / "stages/pretrain/checkpoints")) == ["latest", "step-00000004", "step-00000006"]


@pytest.mark.faults
def test_latest_ignores_uncommitted_dirs_and_distrusts_the_pointer(s3_url):
    ckpt = CheckpointManager(s3_url, CheckpointPolicy(every_steps=1))
    ckpt.save(1, writer(1), {"step": 1}, sync=True)
    store = Store(s3_url).child("checkpoints")
    store.put_bytes("step-00000009/model.pt", b"half a checkpoint")     # files, no COMMITTED
    assert ckpt.latest().step == 1
    store.put_bytes("latest", b"step-00000009\n")                       # pointer at the half-written dir
    assert ckpt.latest().step == 1
    out: dict = {}
    assert ckpt.restore(load_into(out))["step"] == 1
    torch.testing.assert_close(out["model"], tensors_for(1), rtol=0, atol=0)


@pytest.mark.faults
@pytest.mark.parametrize("how", ["dev-full", "raised"])
def test_disk_full_while_staging_raises_clearly_and_commits_nothing(tmp_path, how):
    url = f"file://{tmp_path}/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1), local_dir=str(tmp_path / "stage"))
    ckpt.save(1, writer(1), {"step": 1}, sync=True)

    def full_disk(d: str) -> None:
        writer(2)(d)
        if how == "raised":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(d, "big.pt"))
        os.symlink("/dev/full", os.path.join(d, "big.bin"))  # the kernel answers every write with ENOSPC
        with open(os.path.join(d, "big.bin"), "wb") as f:
            f.write(os.urandom(1 << 16))

    with pytest.raises(CheckpointStagingError, match="disk is full.*Nothing was uploaded or committed"):
        ckpt.save(2, full_disk, {"step": 2})
    ckpt.close()
    assert not os.path.exists(tmp_path / "stages/pretrain/checkpoints/step-00000002")
    assert not os.path.exists(tmp_path / "stage/rank-00000/step-00000002")
    assert ckpt.latest().step == 1


@pytest.mark.faults
def test_restore_refuses_a_checkpoint_of_another_config(tmp_path):
    ckpt = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_steps=1))
    ckpt.save(1, writer(1), {"step": 1, "config_digest": "aaa", "arch": {"depth": 12}}, sync=True)
    with pytest.raises(CheckpointMismatchError, match=r"differing keys: config_digest, arch") as err:
        ckpt.restore(load_into({}), expect={"config_digest": "bbb", "arch": {"depth": 6}, "step": 1})
    assert "depth" in str(err.value) and "step" not in str(err.value).split("differing keys")[1].split("\n")[0]
    assert ckpt.restore(load_into({}), expect={"config_digest": "aaa"})["step"] == 1


def test_rng_state_round_trips_through_json():
    import json

    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_policy_is_strict_and_due_follows_steps(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="every_step"):
        CheckpointPolicy(every_step=5)
    with pytest.raises(pydantic.ValidationError, match="every_steps and/or every_minutes"):
        CheckpointPolicy()
    ckpt = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_steps=3))
    assert [s for s in range(1, 10) if ckpt.due(s)] == [3, 6, 9]
    by_time = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_minutes=1e-9))
    assert by_time.time_due() and by_time.due(1) and not by_time.due(1, time_flag=False)
    both = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_steps=3, every_minutes=60))
    assert not both.time_due() and [s for s in range(1, 7) if both.due(s)] == [3, 6] and both.due(4, time_flag=True)


def test_meta_must_be_json(tmp_path):
    ckpt = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_steps=1))
    with pytest.raises(TypeError, match="JSON-able"):
        ckpt.save(1, writer(1), {"weights": torch.zeros(2)})


@pytest.mark.faults
def test_staging_dirs_of_dead_processes_are_swept(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"vitforge-ckpt-{int(dead.stdout)}-abc" / "rank-00000" / "step-00000003"
    stale.mkdir(parents=True)
    live = tmp_path / f"vitforge-ckpt-{os.getppid()}-abc"
    live.mkdir()
    ckpt = CheckpointManager(f"file://{tmp_path}/s", CheckpointPolicy(every_steps=1))
    ckpt.save(1, writer(1), {"step": 1})
    assert not stale.exists() and live.exists()
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("vitforge-ckpt-")) == [live.name]


def rank_writer(rank: int, step: int, name: str | None = None):
    def write(d: str) -> None:
        torch.save(tensors_for(100 * rank + step), os.path.join(d, name or f"optim-rank-{rank}.pt"))
    return write


def gang_of_two(url: str, session: str, **kwargs) -> list[CheckpointManager]:
    """Both ranks of a 2-rank gang in this process (the commit protocol needs only the store)."""
    return [CheckpointManager(url, CheckpointPolicy(every_steps=1), rank=r, world_size=2, session_id=session, **kwargs)
            for r in (0, 1)]


@pytest.mark.faults
def test_markers_of_an_earlier_attempt_never_count_towards_a_commit(tmp_path):
    url = f"file://{tmp_path}/s"
    _, old1 = gang_of_two(url, "killed-attempt")
    old1.save(2, rank_writer(1, 2), {"step": 2})           # rank 1 of an attempt whose rank 0 died
    old1.wait()
    new0, _ = gang_of_two(url, "attempt-2", commit_timeout_s=0.5)
    with pytest.raises(CheckpointCommitError, match="timed out"):
        new0.save(2, rank_writer(0, 2), {"step": 2}, sync=True)
    assert new0.latest() is None

    r0, r1 = gang_of_two(url, "attempt-3")
    r0.save(2, rank_writer(0, 2), {"step": 2})              # rank 0 commits in the background ...
    r1.save(2, rank_writer(1, 2), {"step": 2}, sync=True)   # ... and sync rank 1 returns once it did
    info = r0.latest()
    assert info.step == 2 and {f: rec["rank"] for f, rec in info.files.items()} == {
        "optim-rank-0.pt": 0, "optim-rank-1.pt": 1}
    r0.close()


def test_two_ranks_writing_the_same_file_name_is_refused(tmp_path):
    r0, r1 = gang_of_two(f"file://{tmp_path}/s", "same-name")
    r1.save(1, rank_writer(1, 1, name="model.pt"), {"step": 1})
    r1.wait()
    with pytest.raises(CheckpointCommitError, match="ranks 0 and 1 both wrote 'model.pt'"):
        r0.save(1, rank_writer(0, 1, name="model.pt"), {"step": 1}, sync=True)
    assert r0.latest() is None


# ---- the policy alone (jobs/_ckpt_policy.py): pure, no store, no clock but the one handed in ----------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schedule_by_steps_is_a_pure_function_of_the_step_and_the_last_save():
    from jobs._ckpt_policy import CheckpointSchedule

    clock = FakeClock()
    sched = CheckpointSchedule(CheckpointPolicy(every_steps=4), clock)
    clock.now += 1e6  # no clock in a steps-only policy
    assert [s for s in range(0, 13) if sched.due(s)] == [4, 8, 12] and not sched.time_due()
    sched.saved(8)
    assert not sched.due(8) and sched.due(12)  # never twice at the same step
    assert not sched.due(5, time_flag=True)  # a time flag means nothing without every_minutes


def test_schedule_by_minutes_counts_from_the_last_save_or_restore():
    from jobs._ckpt_policy import CheckpointSchedule

    clock = FakeClock()
    sched = CheckpointSchedule(CheckpointPolicy(every_minutes=2, every_steps=10), clock)
    clock.now += 119.0
    assert not sched.time_due() and not sched.due(3) and sched.due(10)
    clock.now += 1.0
    assert sched.time_due() and sched.due(3)
    assert not sched.due(3, time_flag=False) and sched.due(4, time_flag=True)  # an agreed flag wins over the clock
    sched.saved(3)
    assert not sched.time_due() and not sched.due(3, time_flag=True) and not sched.due(4)
    clock.now += 120.0
    assert sched.due(4)


def test_retention_keeps_the_newest_and_a_verifying_fallback():
    policy = CheckpointPolicy(every_steps=1, keep_last=2)
    steps = [(s, f"step-{s}") for s in range(1, 8)]
    committed = {f"step-{s}" for s in (1, 2, 3, 5, 6)}.__contains__  # 4: a stale upload; 7: in flight
    asked: list[str] = []

    def verifies(name: str) -> bool:
        asked.append(name)
        return True

    assert policy.to_delete(steps, 6, committed, verifies) == ["step-4", "step-3", "step-2", "step-1"]
    assert asked == ["step-6"]  # verified once, newest first
    bad = {"step-6", "step-5", "step-3"}
    assert policy.to_delete(steps, 6, committed, lambda n: n not in bad) == ["step-4", "step-1"]  # 2 is the fallback
    assert policy.to_delete(steps, 6, lambda n: False, verifies) == ["step-5", "step-4", "step-3", "step-2",
                                                                     "step-1"]  # the newest stays

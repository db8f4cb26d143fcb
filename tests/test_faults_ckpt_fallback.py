"""Fault suite, verified checkpoints with fallback (issue 14 point 2, sizes only), against the real SeaweedFS:
the newest COMMITTED checkpoint with a zero-byte or missing file is skipped with the reason logged and
the previous committed one is restored; when none verifies the error says so (never a silent step 0).
Slow tier: a 2-rank DeepSpeed gang whose newest checkpoint file had bytes flipped (same size) resumes
from the commit before it and its losses equal an uninterrupted run's."""

from __future__ import annotations

import logging
import os

import pytest

from _train_util import TINY_MODEL
from cluster.storage import Store
from jobs._ckpt_verify import CheckpointVerificationError
from jobs.checkpoint import CheckpointManager, CheckpointPolicy, latest_committed

pytestmark = pytest.mark.faults


def _save_steps(url: str, steps) -> None:
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1, keep_last=5))
    for step in steps:
        def write(d: str, step=step) -> None:
            with open(os.path.join(d, "w.bin"), "wb") as f:
                f.write(b"weights of step %d" % step)
        ckpt.save(step, write, {"step": step}, sync=True)
    ckpt.close()


def _restored(url: str) -> bytes:
    got: list[bytes] = []
    CheckpointManager(url, CheckpointPolicy(every_steps=1)).restore(
        lambda d: got.append(open(os.path.join(d, "w.bin"), "rb").read()))
    return got[0]


@pytest.mark.parametrize("damage", ["zero-bytes", "missing"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_previous_one_restored(s3_url, caplog, damage):
    _save_steps(s3_url, [1, 2])
    ckpt = Store(s3_url).child("checkpoints")
    if damage == "zero-bytes":
        ckpt.put_bytes("step-00000002/w.bin", b"")
    else:
        ckpt.delete("step-00000002/w.bin")
    with caplog.at_level(logging.WARNING, logger="jobs._ckpt_verify"):
        assert latest_committed(s3_url).step == 1  # the driver's view (preflight) agrees with the ranks'
        assert _restored(s3_url) == b"weights of step 1"
    assert "skipping checkpoint" in caplog.text and "w.bin" in caplog.text
    assert ("has 0 bytes" if damage == "zero-bytes" else "is missing") in caplog.text


def test_when_no_committed_checkpoint_verifies_the_error_says_so(s3_url):
    _save_steps(s3_url, [1])
    Store(s3_url).child("checkpoints").put_bytes("step-00000001/w.bin", b"")
    with pytest.raises(CheckpointVerificationError, match="no committed checkpoint .* verifies: step-00000001"):
        CheckpointManager(s3_url, CheckpointPolicy(every_steps=1)).latest()


def test_committed_records_each_files_sha256_computed_while_uploading(s3_url, tmp_path):
    import hashlib

    _save_steps(s3_url, [1])
    rec = Store(s3_url).child("checkpoints").get_json("step-00000001/COMMITTED")
    assert rec["files"]["w.bin"]["sha256"] == hashlib.sha256(b"weights of step 1").hexdigest()
    local = f"file://{tmp_path}/run"  # the local-copy path hashes as it copies, too
    _save_steps(local, [3])
    rec = Store(local).child("checkpoints").get_json("step-00000003/COMMITTED")
    assert rec["files"]["w.bin"]["sha256"] == hashlib.sha256(b"weights of step 3").hexdigest()


def test_a_newest_checkpoint_whose_bytes_changed_at_the_same_size_falls_back_naming_file_and_hashes(s3_url, caplog):
    import hashlib

    _save_steps(s3_url, [1, 2])
    ckpt = Store(s3_url).child("checkpoints")
    ckpt.put_bytes("step-00000002/w.bin", b"weights of step X")  # same size: only the checksum can tell
    manager = CheckpointManager(s3_url, CheckpointPolicy(every_steps=1))
    got: list[bytes] = []
    with caplog.at_level(logging.WARNING, logger="jobs.checkpoint"):
        meta = manager.restore(lambda d: got.append(open(os.path.join(d, "w.bin"), "rb").read()))
    assert got == [b"weights of step 1"] and meta["step"] == 1 and manager.restored.step == 1
    assert "step-00000002/w.bin" in caplog.text
    assert hashlib.sha256(b"weights of step X").hexdigest() in caplog.text
    assert hashlib.sha256(b"weights of step 2").hexdigest() in caplog.text


def test_when_every_checkpoint_fails_its_checksum_the_error_is_permanent_and_names_them(s3_url):
    _save_steps(s3_url, [1, 2])
    ckpt = Store(s3_url).child("checkpoints")
    for step in (1, 2):
        ckpt.put_bytes(f"step-0000000{step}/w.bin", b"weights of step X")
    read = []
    with pytest.raises(CheckpointVerificationError, match="step-00000002.*step-00000001") as err:
        CheckpointManager(s3_url, CheckpointPolicy(every_steps=1)).restore(read.append)
    assert err.value.permanent and read == []  # read_fn never saw unverified bytes


def test_retention_keeps_the_newest_verified_checkpoint_when_the_newest_does_not_verify(s3_url, caplog):
    _save_steps(s3_url, [1, 2, 3])
    store = Store(s3_url).child("checkpoints")
    store.delete("step-00000003/w.bin")  # the newest commit lost a file after it committed
    ckpt = CheckpointManager(s3_url, CheckpointPolicy(every_steps=1, keep_last=1))
    with caplog.at_level(logging.WARNING, logger="jobs.checkpoint"):
        ckpt._retain(3)  # what the commit of step 3 runs after writing COMMITTED
    assert [i.step for i in ckpt.committed()] == [2, 3]  # 2 is the fallback; 1 is deleted
    assert "step-00000003 does not verify" in caplog.text
    assert ckpt.latest().step == 2
    ckpt.save(4, lambda d: open(os.path.join(d, "w.bin"), "wb").write(b"weights of step 4"), {"step": 4}, sync=True)
    assert [i.step for i in ckpt.committed()] == [4]  # a verifying newest needs no older fallback


FALLBACK_STEPS = 8
FALLBACK_STAGE = {"name": "pretrain", "kind": "mae", "model": TINY_MODEL,
                  "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4}, "max_steps": FALLBACK_STEPS,
                  "batch_size": 8, "zero_stage": 2, "loader_workers": 0,
                  "checkpoint": {"every_steps": 2, "keep_last": 3}, "optim": {"base_lr": 1.0e-2, "warmup_steps": 2}}


def _flip_largest_file(store: Store, step: int) -> str:
    """Flip bytes in the middle of the largest file of committed checkpoint ``step`` (same size)."""
    files = store.child("checkpoints").get_json(f"step-{step:08d}/COMMITTED")["files"]
    name = max(files, key=lambda n: files[n]["size"])
    rel = f"checkpoints/step-{step:08d}/{name}"
    data = bytearray(store.get_bytes(rel))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    store.put_bytes(rel, bytes(data))
    assert store.size(rel) == files[name]["size"]
    return name


@pytest.mark.slow  # three 2-rank DeepSpeed runs (~4 min on 2 cores)
def test_a_gang_resumes_through_the_hash_fallback_and_matches_an_uninterrupted_run(s3, tmp_path):
    from _train_util import finish, losses, status, torchrun, write_digit_shards, write_job, write_spec

    data = write_digit_shards(f"s3://{s3.bucket}/{tmp_path.name}-shards")
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    ref = write_spec(tmp_path, storage, "ref", {**FALLBACK_STAGE, "data": data})
    rc, out = finish(torchrun(ref), timeout=900)
    assert rc == 0, out[-3000:]
    want = losses(storage, "ref")

    spec = write_spec(tmp_path, storage, "tamper", {**FALLBACK_STAGE, "data": data})
    rc, out = finish(torchrun(job=write_job(spec, "pretrain", {"kill_rank": 0, "kill_at_step": 5})), timeout=900)
    assert rc != 0  # SIGKILLed after step 5: step-4 is the newest commit, step-2 the one before it
    stage = Store(f"{storage}/tamper/stages/pretrain")
    assert latest_committed(stage.url).step == 4
    tampered = _flip_largest_file(stage, 4)

    rc, out = finish(torchrun(spec), timeout=900)
    assert rc == 0, out[-3000:]
    st = status(storage, "tamper")
    assert st["state"] == "done" and st["resumed_from"] == 2, st  # not 4 (it fails its sha256), not 0
    assert "step-00000004" in out and tampered in out and "sha256" in out  # the skip is logged, naming the file
    got = losses(storage, "tamper")
    assert len(got) == len(want) == FALLBACK_STEPS  # each step once: the replay superseded steps 3..5
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-6, f"step {step}: {a} != {b}"

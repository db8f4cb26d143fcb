"""Fault suite: a real full disk (a 2 MiB tmpfs) under the checkpoint staging directory.

tests/test_checkpoint.py injects ENOSPC (``/dev/full``, a raised OSError); here the kernel runs out
of space for real, with ``torch.save`` as the writer (whose C++ stream loses errno). Skipped where
mounting is not allowed (not root, or no mount namespace rights).
"""

from __future__ import annotations

import gc
import os
import subprocess

import pytest
import torch

from jobs.checkpoint import CheckpointManager, CheckpointPolicy, CheckpointStagingError

pytestmark = pytest.mark.faults


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); ENOSPC injection in test_checkpoint.py")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _tensors(n_floats: int, step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((n_floats,), float(step))}


def test_full_tmpfs_while_staging_commits_nothing_and_a_later_save_that_fits_commits(small_tmpfs, s3_url):
    url = s3_url + "/stages/pretrain"
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1), local_dir=small_tmpfs)
    ckpt.save(1, lambda d: torch.save(_tensors(1024, 1), os.path.join(d, "model.pt")), {"step": 1}, sync=True)

    with pytest.raises(CheckpointStagingError, match="disk is full.*Nothing was uploaded or committed") as err:
        ckpt.save(2, lambda d: torch.save(_tensors(1 << 20, 2), os.path.join(d, "model.pt")), {"step": 2})  # 4 MiB
    del err  # torch's writer (and its open, already unlinked file) lives as long as the traceback
    gc.collect()
    assert ckpt.latest().step == 1
    assert not ckpt.store.exists("step-00000002")
    assert sum(len(files) for _, _, files in os.walk(small_tmpfs)) == 0, "the failed staging copy is removed"

    ckpt.save(3, lambda d: torch.save(_tensors(1024, 3), os.path.join(d, "model.pt")), {"step": 3}, sync=True)
    ckpt.close()
    out = {}
    meta = CheckpointManager(url, CheckpointPolicy(every_steps=1)).restore(
        lambda d: out.update(torch.load(os.path.join(d, "model.pt"), weights_only=True)))
    assert meta["step"] == 3 and torch.equal(out["w"], torch.full((1024,), 3.0))

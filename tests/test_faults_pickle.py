"""Fault suite, issue 14 point 3: loading a checkpoint runs no code. DeepSpeed's and accelerate's own
``torch.load(weights_only=False)`` calls go through weights-only loading with an explicit allow-list
(jobs/_safe_load.py); a planted pickle is refused naming the file, and its payload never runs."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from jobs._safe_load import UnsafeCheckpointError, safe_loading

pytestmark = pytest.mark.faults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this calls os.system: what an attacker plants in a checkpoint file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted(tmp_path) -> tuple[str, str]:
    marker = str(tmp_path / "payload-ran")
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {"w": torch.ones(2)}, "trap": _Payload(marker)}, path)
    return path, marker


def test_the_planted_pickle_runs_code_when_loaded_as_deepspeed_does_outside_safe_loading(tmp_path):
    path, marker = _planted(tmp_path)  # the control: the file really is an exploit
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(path, map_location="cpu")
    assert os.path.exists(marker)


def test_a_planted_pickle_is_refused_through_deepspeeds_loader_naming_the_file_and_never_runs(tmp_path):
    path, marker = _planted(tmp_path)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    with safe_loading(), pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt") as err:
        TorchCheckpointEngine().load(path, map_location="cpu")  # DeepSpeed passes weights_only=False
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert err.value.permanent and not os.path.exists(marker)
    with safe_loading(), pytest.raises(UnsafeCheckpointError):  # accelerate's loader too
        from accelerate.utils.other import load

        load(path, weights_only=False)
    assert not os.path.exists(marker)
    assert torch.load is not None and "safe_loading" not in repr(torch.load)  # restored after the block


@pytest.mark.slow
def test_every_file_of_real_zero_0_to_3_checkpoints_loads_weights_only_with_the_allow_list(tmp_path):
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    os.path.join(ROOT, "tests", "_reshard_worker.py"), "train", str(out)],
                   check=True, env=env, timeout=600, capture_output=True)
    files = glob.glob(str(out / "**" / "*.pt"), recursive=True) + glob.glob(str(out / "**" / "*.pkl"), recursive=True)
    assert len(files) >= 4 * 2
    with safe_loading():
        for f in files:
            assert torch.load(f, map_location="cpu", weights_only=False) is not None


CHECKPOINT_KINDS = {  # what DeepSpeed writes beyond fp32 ZeRO 0-3, on CPU/gloo
    "bf16-zero2-offload": ({"precision": "bf16", "zero_stage": 2, "offload_optimizer": True},
                           "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    "bf16-zero3": ({"precision": "bf16", "zero_stage": 3}, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    "fp16-zero2": ({"precision": "fp32", "zero_stage": 2, "deepspeed": {"fp16": {"enabled": True}}},
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
}


@pytest.mark.slow  # two one-rank DeepSpeed runs per kind (~40 s each on 2 cores)
@pytest.mark.parametrize("kind", list(CHECKPOINT_KINDS))
def test_bf16_fp16_and_offload_checkpoints_resume_weights_only_with_the_allow_list(tmp_path, kind):
    import json

    from jobs._safe_load import allowed_globals

    variant, expected = CHECKPOINT_KINDS[kind]
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}
    worker = [sys.executable, os.path.join(ROOT, "tests", "_ckpt_kinds_worker.py"), json.dumps(variant), str(tmp_path)]
    saved = subprocess.run([*worker, "save"], env=env, timeout=600, capture_output=True, text=True)
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-3000:]
    found = json.loads(saved.stdout.split("GLOBALS ", 1)[1].splitlines()[0])
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    assert expected in found and set(found) <= allowed, found
    resumed = subprocess.run([*worker, "resume"], env=env, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming stage ft from" in resumed.stdout + resumed.stderr  # restored through safe_loading

"""Engine options that change how a step runs but not what it computes: optimizer CPU offload,
activation checkpointing and ``torch.compile``.

2 CPU workers on gloo (torchrun), the tiny MAE on digit shards in the test S3 store. Each option
must (a) really take effect, seen from inside the training step (``tests/_engine_options_worker.py``
records it), and (b) log the per-step losses of the same run with the option off. Tolerances are
the measured differences with room: offload and checkpointing gave bitwise-equal losses on ZeRO-2
and ZeRO-3 (the same fp32 maths in the same order), compile differed by at most 1.8e-7 over 6 steps
(inductor reorders float sums).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests._engine_options_worker import STEPS
from tests._train_util import ROOT, finish, write_digit_shards

EXACT = 1e-6        # offload, checkpointing: measured 0.0
COMPILED = 1e-5     # compile: measured <= 1.8e-7


def run_variants(manifest: str, root: str, out, *variants: str) -> dict:
    """One 2-rank torchrun training every variant in turn; rank 0's records."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "tests", "_engine_options_worker.py"), str(out), manifest, root, *variants]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    rc, log = finish(proc, timeout=900)
    assert rc == 0, log[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def manifest(s3) -> str:
    return write_digit_shards(f"s3://{s3.bucket}/options-shards-{os.getpid()}")


@pytest.fixture(scope="module")
def runs(manifest, s3, tmp_path_factory) -> dict:
    """off, offload, checkpointing on ZeRO-2 and both options together on ZeRO-3, in one torchrun."""
    out = tmp_path_factory.mktemp("options") / "runs.json"
    return run_variants(manifest, f"s3://{s3.bucket}/options-{os.getpid()}", out,
                        "off", "offload", "checkpointing", "offload+checkpointing@3")


def assert_close(got: list[float], want: list[float], tol: float) -> None:
    assert len(got) == len(want) == STEPS, (len(got), len(want))
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= tol, f"step {step}: {a} vs {b} (tolerance {tol})"


def test_every_option_run_finishes_and_the_loss_goes_down(runs):
    for variant, run in runs.items():
        assert run["state"] == "done", variant
        assert run["losses"][-1] < run["losses"][0], (variant, run["losses"])


def test_offload_optimizer_hands_deepspeed_a_cpu_offloaded_zero_optimizer_with_the_same_losses(runs):
    off, on, zero3 = runs["off"]["probe"], runs["offload"]["probe"], runs["offload+checkpointing@3"]["probe"]
    assert off["accelerate_offload_optimizer"] is None
    assert not off["engine_zero_cpu_offload"] and not off["zero_optimizer_offloads"]
    for probe, zero_optimizer in ((on, "DeepSpeedZeroOptimizer"), (zero3, "DeepSpeedZeroOptimizer_Stage3")):
        assert probe["accelerate_offload_optimizer"]["device"] == "cpu"  # the config accelerate handed DeepSpeed
        assert probe["engine_zero_cpu_offload"]
        assert probe["zero_optimizer"] == zero_optimizer and probe["zero_optimizer_offloads"]
        # torch's AdamW steps the offloaded fp32 partitions: no DeepSpeedCPUAdam op to JIT-build
        assert probe["inner_optimizer"] == "FreezableAdamW"  # jobs/_engine_config.py
        assert probe["optimizer_state_devices"] == ["cpu"]
    assert_close(runs["offload"]["losses"], runs["off"]["losses"], EXACT)
    assert_close(runs["offload+checkpointing@3"]["losses"], runs["off"]["losses"], EXACT)


def test_activation_checkpointing_recomputes_every_block_in_backward_with_the_same_losses(runs):
    off, on, zero3 = runs["off"]["probe"], runs["checkpointing"]["probe"], runs["offload+checkpointing@3"]["probe"]
    assert not off["encoder_grad_checkpointing"]
    assert off["block_runs_per_step"] == {"encoder": 1.0, "decoder": 1.0}
    for probe in (on, zero3):
        assert probe["encoder_grad_checkpointing"]
        # forward once, and once more when the backward needs the activations it did not keep
        assert probe["block_runs_per_step"] == {"encoder": 2.0, "decoder": 2.0}
    assert_close(runs["checkpointing"]["losses"], runs["off"]["losses"], EXACT)


def test_offload_optimizer_on_zero_stage_0_is_refused_at_validation_naming_the_fix():
    from pydantic import ValidationError

    from jobs.mae import MAEConfig

    for bad in ({"offload_optimizer": True, "zero_stage": 0},
                {"zero_stage": 0, "deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
                {"offload_optimizer": True, "deepspeed": {"zero_optimization": {"stage": 0}}}):
        with pytest.raises(ValidationError, match="offload_optimizer needs ZeRO stage 1, 2 or 3.*zero_stage"):
            MAEConfig.model_validate({"name": "p", "data": "d", **bad})
    MAEConfig.model_validate({"name": "p", "data": "d", "offload_optimizer": True, "zero_stage": 1})


@pytest.mark.slow
def test_compile_runs_the_compiled_module_with_the_same_losses_within_float_reordering(manifest, s3, tmp_path):
    # slow tier: inductor's first compile of the forward and backward graphs takes minutes on 2 cores
    runs = run_variants(manifest, f"s3://{s3.bucket}/{tmp_path.name}", tmp_path / "runs.json", "off", "compile")
    off, on = runs["off"]["probe"], runs["compile"]["probe"]
    assert not off["engine_is_compiled"] and off["dynamo_unique_graphs"] == 0
    assert on["engine_is_compiled"] and on["dynamo_unique_graphs"] > 0  # the steps ran dynamo-compiled graphs
    assert_close(runs["compile"]["losses"], runs["off"]["losses"], COMPILED)

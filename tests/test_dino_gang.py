"""DINO end to end on 2 CPU workers (gloo, DeepSpeed ZeRO-2 and ZeRO-3, checkpoints on SeaweedFS S3).

One uninterrupted ZeRO-3 torchrun run checkpoints every step: from those checkpoints the test
recomputes, in plain torch, the EMA of the student's full fp32 weights and compares it with the
teacher the workers kept; a run whose worker is SIGKILLed must log the same per-step losses once
resumed (teacher and center come back from the checkpoint). A ZeRO-2 run with register tokens
checks the same EMA and that the export loads in timm with the student's exact features.
"""

from __future__ import annotations

import glob
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests._shards_util import write_shards
from tests._train_util import (TINY_MODEL, assert_same_losses, download_checkpoint, finish, kill_then_resume, losses,
                               metrics, stage_store, status, torchrun, write_job, write_spec, zero_fp32_state_dict)
from jobs.dino import DINOConfig, DINOMethod, DINOSchedule
from jobs.engine import METHOD_STATE

STEPS = 8
PER_EPOCH = 8  # 128 images / (8 per worker x 2 workers)

STAGE = {
    "name": "pretrain", "kind": "dino", "model": TINY_MODEL,
    "head": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32}, "local_crops": 2,
    "max_steps": STEPS, "batch_size": 8, "zero_stage": 3, "loader_workers": 0,
    "checkpoint": {"every_steps": 1, "keep_last": STEPS},
    "optim": {"base_lr": 5.0e-3, "warmup_steps": 2, "weight_decay": 0.04},
    # a fast-moving teacher, temperature warmup and last-layer freeze inside the run, so each one shows
    "teacher_momentum": 0.9, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 0.5, "freeze_last_layer_epochs": 0.5,
}


@pytest.fixture(scope="module")
def manifest(s3) -> str:
    """128 small images in 3 shards on S3 (written directly: these tests are about training, not prep)."""
    url = f"s3://{s3.bucket}/dino-shards-{os.getpid()}"
    write_shards(url, [48, 48, 32])
    return url


def run(tmp_path, s3, name: str, manifest: str, **over) -> tuple[str, dict]:
    """One uninterrupted torchrun run of STAGE (+ ``over``); returns (storage, stage mapping)."""
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    stage = {**STAGE, "data": manifest, **over}
    rc, out = finish(torchrun(write_spec(tmp_path, storage, name, stage)))
    assert rc == 0, out[-4000:]
    assert status(storage, name)["state"] == "done"
    return storage, stage


@pytest.fixture(scope="module")
def zero3(manifest, s3, tmp_path_factory) -> tuple[str, dict]:
    return run(tmp_path_factory.mktemp("zero3"), s3, "zero3", manifest)


def schedule(stage: dict) -> DINOSchedule:
    return DINOSchedule(DINOConfig.model_validate(stage), total=STEPS, per_epoch=PER_EPOCH)


def initial_student(stage: dict) -> dict[str, torch.Tensor]:
    """The student every rank starts from (the engine seeds with cfg.seed before building it)."""
    torch.manual_seed(0)
    return {k: v.detach() for k, v in DINOMethod(DINOConfig.model_validate(stage)).build_model().state_dict().items()}


def assert_teacher_is_ema_of_student(store, stage: dict, tmp_path) -> dict[int, dict[str, torch.Tensor]]:
    """teacher_k = m_k * teacher_(k-1) + (1 - m_k) * student_k for every step, teacher_0 = student_0,
    computed here without ZeRO from the full fp32 student of each checkpoint. Returns the students."""
    sched = schedule(stage)
    expected = {k: v.clone() for k, v in initial_student(stage).items()}
    students = {}
    for step in range(1, STEPS + 1):
        local = download_checkpoint(store, step, tmp_path)
        student = students[step] = zero_fp32_state_dict(local)
        m = sched.momentum(step - 1)
        for k, t in expected.items():
            t.mul_(m).add_(student[k].float(), alpha=1 - m)
        saved = load_file(os.path.join(local, METHOD_STATE))
        teacher = {k[len("teacher."):]: v for k, v in saved.items() if k.startswith("teacher.")}
        assert set(teacher) == set(expected)
        worst = max((teacher[k] - v).abs().max().item() for k, v in expected.items())
        assert worst <= 1e-6, f"step {step}: teacher differs from the EMA of the student by {worst}"
        assert saved["loss.center"].abs().sum() > 0
    return students


def test_zero3_teacher_is_the_ema_of_the_full_student_and_last_layer_is_frozen_first(zero3, tmp_path):
    storage, stage = zero3
    students = assert_teacher_is_ema_of_student(stage_store(storage, "zero3"), stage, tmp_path)
    init = initial_student(stage)

    def last_layer(state):
        return state["head.last_layer.weight_v"].float()

    frozen = int(0.5 * PER_EPOCH)
    assert torch.equal(last_layer(students[frozen]), last_layer(init))  # no update at all: not even weight decay
    assert not torch.allclose(last_layer(students[frozen + 1]), last_layer(init), atol=1e-4)
    assert not torch.equal(students[1]["backbone.blocks.0.attn.qkv.weight"], init["backbone.blocks.0.attn.qkv.weight"])
    rows = metrics(storage, "zero3")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    sched = schedule(stage)
    for r in rows:
        assert r["teacher_temp"] == pytest.approx(sched.teacher_temp(r["step"] - 1))
        assert r["weight_decay"] == pytest.approx(sched.weight_decay(r["step"] - 1))


@pytest.mark.faults
def test_zero3_worker_killed_then_resumed_logs_the_same_losses_as_uninterrupted(zero3, manifest, s3, tmp_path):
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    spec = write_spec(tmp_path, storage, "kill", {**STAGE, "data": manifest,
                                                  "checkpoint": {"every_steps": 2, "keep_last": 2}})
    st = kill_then_resume(spec, storage, "kill", {"kill_rank": 1, "kill_at_step": 5})
    assert st["state"] == "done" and st["resumed_from"] == 4 and st["attempts"] == 2
    assert_same_losses(losses(storage, "kill"), losses(zero3[0], "zero3"), STEPS)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_checkpoint_taken_while_the_last_layer_is_frozen_resumes_on_one_worker(zero3, manifest, s3, tmp_path,
                                                                                 zero_stage):
    """Killed at step 3 of a 4-step freeze, the step-2 checkpoint (the frozen group has no Adam state)
    resumes on 1 worker through DeepSpeed's universal checkpoint: the last layer stays bit-identical
    to its initial weights until the freeze ends, then trains, and every step runs."""
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    spec = write_spec(tmp_path, storage, "shrink", {**STAGE, "data": manifest, "zero_stage": zero_stage,
                                                    "checkpoint": {"every_steps": 2, "keep_last": STEPS}})
    rc, out = finish(torchrun(job=write_job(spec, "pretrain", fault={"kill_rank": 0, "kill_at_step": 3})))
    assert rc != 0 and status(storage, "shrink")["state"] == "running", out[-3000:]
    rc, out = finish(torchrun(spec, nproc=1))
    assert rc == 0 and "on 1 workers" in out, out[-4000:]
    st = status(storage, "shrink")
    assert st["state"] == "done" and st["resumed_from"] == 2 and st["world_size"] == 1
    got = losses(storage, "shrink")
    assert len(got) == STEPS and all(x == x for x in got)  # every step ran, no NaN
    if zero_stage == 3:
        assert_same_losses(got[:2], losses(zero3[0], "zero3")[:2], 2)

    store = stage_store(storage, "shrink")
    init = initial_student({**STAGE, "data": manifest})["head.last_layer.weight_v"].float()
    for step, frozen in ((4, True), (6, False)):
        local = download_checkpoint(store, step, tmp_path)
        weight = zero_fp32_state_dict(local)["head.last_layer.weight_v"].float()
        assert torch.equal(weight, init) == frozen  # frozen on 1 worker too: no update, not even weight decay
        (optim,) = glob.glob(os.path.join(local, "engine", "*", "*optim_states.pt"))
        sd = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flats, state = ((sd["fp32_flat_groups"], sd["optimizer_state_dict"]["state"]) if zero_stage == 3 else
                        (sd["single_partition_of_fp32_groups"], sd["base_optimizer_state"]["state"]))
        stateless = sum("exp_avg" not in state.get(k, {}) for k in range(len(flats)))
        assert stateless == (1 if frozen else 0), f"step {step}: {stateless} groups without Adam state"


def test_zero2_with_registers_teacher_is_the_ema_and_export_loads_in_timm_with_identical_features(manifest, s3,
                                                                                                  tmp_path):
    from jobs.models import ModelConfig, build_encoder

    storage, stage = run(tmp_path, s3, "zero2", manifest, zero_stage=2,
                         model={**TINY_MODEL, "reg_tokens": 2})
    store = stage_store(storage, "zero2")
    students = assert_teacher_is_ema_of_student(store, stage, tmp_path)
    final = {k[len("backbone."):]: v for k, v in students[STEPS].items() if k.startswith("backbone.")}

    export = store.child("export")
    config = export.get_json("config.json")
    export.get_file("model.safetensors", str(tmp_path / "model.safetensors"))
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == set(final) and all(torch.equal(weights[k], final[k].float()) for k in final)
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"))).eval()
    trained = build_encoder(ModelConfig(**stage["model"]), dynamic_img_size=True).eval()  # as DINO trained it
    trained.load_state_dict(final)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.num_prefix_tokens == 3
        assert torch.equal(model.forward_features(x), trained.forward_features(x))
        assert torch.equal(model(x), trained(x))  # the CLS features DINO trained on

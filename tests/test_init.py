"""Starting a stage from an existing encoder (``jobs/init.py``) and PEFT inside it (``jobs/peft.py``):
every kind loads the init exactly (MAE's own init overwrites nothing, DINO's teacher is the loaded
student), another image size or patch size is resampled as timm does, a shape mismatch is refused
before any stage runs; PEFT trains only the named tensors and the export merges LoRA into a plain
timm encoder; the engine records trainable / total parameter counts and the init's hash."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from _train_util import TINY_MODEL
from cluster.storage import Store
from jobs.dino import DINOConfig, DINOMethod
from jobs.distill import DistillConfig, DistillMethod
from jobs.engine import StageContext
from jobs.export import export_encoder
from jobs.finetune import run_finetune
from jobs.init import InitMismatchError
from jobs.metrics import read_metrics
from jobs.mae import MAEConfig, MAEMethod, build_mae
from jobs.peft import param_counts
from pipeline.run import run_spec
from pipeline.spec import parse_spec

TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}
TINY_HEAD = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from _shards_util import write_shards

    dest = str(tmp_path_factory.mktemp("init-shards"))
    write_shards(dest, {"train": [24, 24], "val": [10]}, classes=3)
    return dest


def mae_export(dest: str, model: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """An MAE encoder perturbed away from any fresh init (pos_embed included), exported; returns its weights."""
    torch.manual_seed(seed)
    cfg = MAEConfig(name="src", data="/x", model=model or TINY_MODEL, decoder=TINY_DECODER)
    encoder = build_mae(cfg).encoder
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_encoder(encoder, cfg.model, dest)
    return load_file(f"{dest}/model.safetensors")


def built(method, data_url: str, init_url: str | None = None):
    method.setup(StageContext(stage_url="/unused", data_url=data_url, refs={"init": init_url} if init_url else {}))
    torch.manual_seed(123)  # as the engine: another seed than the source's
    return method.build_model()


def assert_same(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(want)
    for k in want:
        assert torch.equal(state[k], want[k]), k


def test_mae_dino_distill_start_from_the_export_bit_exactly(tmp_path, shards):
    want = mae_export(str(tmp_path / "src"))
    mae_method = MAEMethod(MAEConfig(name="c", data="/x", init="src", model=TINY_MODEL, decoder=TINY_DECODER))
    mae = built(mae_method, shards, str(tmp_path / "src"))
    assert_same(mae.encoder.state_dict(), want)  # pos_embed and patch_embed too: _init_weights ran before
    dino = DINOMethod(DINOConfig(name="d", data="/x", init="src", model=TINY_MODEL, head=TINY_HEAD))
    student = built(dino, shards, str(tmp_path / "src"))
    assert_same(student.backbone.state_dict(), want)
    assert_same(dino.teacher.state_dict(), student.state_dict())  # the EMA teacher starts as the student
    distill = DistillMethod(DistillConfig(name="s", data="/x", init="src", teacher=str(tmp_path / "src"),
                                          model=TINY_MODEL))
    assert_same(built(distill, shards, str(tmp_path / "src")).student.state_dict(), want)
    assert mae_method.init_source.digest == dino.init_source.digest and len(dino.init_source.digest) == 64


def test_plain_timm_weights_file_and_a_32px_export_continued_at_16px(tmp_path, shards):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{k: v for k, v in TINY_MODEL.items() if k != "arch"},
                              num_classes=5)  # a classifier: its head is dropped
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    init = {"arch": "vit_tiny_patch16_224", "weights": str(tmp_path / "w.safetensors"), "num_classes": 5}
    mae = built(MAEMethod(MAEConfig(name="c", data="/x", init=init, model=TINY_MODEL, decoder=TINY_DECODER)), shards)
    assert_same(mae.encoder.state_dict(), {k: v for k, v in model.state_dict().items() if not k.startswith("head.")})

    want = mae_export(str(tmp_path / "src"))  # 32 px, patch 4: an 8x8 grid
    small = {**TINY_MODEL, "img_size": 16}  # a 4x4 grid
    method = MAEMethod(MAEConfig(name="c", data="/x", init="src", model=small, decoder=TINY_DECODER, max_steps=3))
    mae = built(method, shards, str(tmp_path / "src"))
    expect = resample_abs_pos_embed(want["pos_embed"], new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(mae.encoder.pos_embed.detach(), expect)
    assert torch.equal(mae.encoder.blocks[1].attn.qkv.weight.detach(), want["blocks.1.attn.qkv.weight"])
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(3):
        batch = {"image": torch.randn(8, 3, 16, 16), "index": torch.arange(8)}
        loss, _ = method.step(mae, batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))

    patch2 = {**TINY_MODEL, "patch_size": 2}  # patch embedding resampled 4x4 -> 2x2
    mae = built(MAEMethod(MAEConfig(name="c", data="/x", init="src", model=patch2, decoder=TINY_DECODER)),
                shards, str(tmp_path / "src"))
    assert mae.encoder.patch_embed.proj.weight.shape[-2:] == (2, 2)


def test_a_width_mismatched_init_is_refused_before_any_stage_runs_naming_both_shapes(tmp_path):
    stages = [{"name": "data", "kind": "prep", "source": str(tmp_path)},
              {"name": "pretrain", "kind": "mae", "data": "data", "model": TINY_MODEL, "decoder": TINY_DECODER},
              {"name": "more", "kind": "dino", "data": "data", "init": "pretrain",
               "model": {**TINY_MODEL, "embed_dim": 96}}]
    spec = parse_spec({"name": "mismatch", "storage": str(tmp_path / "runs"), "stages": stages})
    with pytest.raises(InitMismatchError) as err:
        run_spec(spec)
    msg = str(err.value)
    assert "stages[2] (more) > init" in msg and "(1, 65, 96)" in msg and "(1, 65, 64)" in msg  # pos_embed
    assert not (tmp_path / "runs").exists()  # nothing written, no gang started

    depth = {**stages[2], "kind": "mae", "model": {**TINY_MODEL, "depth": 3}, "decoder": TINY_DECODER}
    spec = parse_spec({"name": "mismatch", "storage": str(tmp_path / "runs"), "stages": [*stages[:2], depth]})
    with pytest.raises(InitMismatchError, match="blocks.2.attn.qkv.weight: the model has"):
        run_spec(spec)


def test_peft_mae_trains_only_named_tensors_and_exports_merged_plain_timm(tmp_path, shards):
    deep = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "embed_dim": 96, "num_heads": 3}  # 12 blocks
    mae_export(str(tmp_path / "src"), model=deep)
    cfg = MAEConfig(name="c", data="/x", init="src", model=deep, decoder=TINY_DECODER,
                    peft={"lora": {"rank": 8}, "unfreeze_last": 1})
    method = MAEMethod(cfg)
    mae = built(method, shards, str(tmp_path / "src"))
    counts = param_counts(mae)
    assert counts["trainable_params"] / counts["total_params"] <= 0.15
    enc_trainable = {n for n, p in mae.encoder.named_parameters() if p.requires_grad}
    assert enc_trainable and all("lora_" in n or n.startswith("blocks.11.") for n in enc_trainable)
    assert all(p.requires_grad for n, p in mae.named_parameters() if n.startswith("decoder_") and n != "decoder_pos_embed")
    frozen = {n: p.detach().clone() for n, p in mae.encoder.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss, _ = method.step(mae, {"image": torch.randn(8, 3, 32, 32), "index": torch.arange(8)}, step)
        loss.backward()
        assert all(p.grad is None for n, p in mae.encoder.named_parameters() if n in frozen)
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in mae.encoder.named_parameters() if n in frozen)

    method.export(mae, str(tmp_path / "out"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert not any("lora" in k or "base_layer" in k for k in loaded.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (loaded.forward_features(x) - mae.encoder.eval().forward_features(x)).abs().max()
    assert diff < 1e-4


def test_engine_records_parameter_counts_and_the_init_hash(tmp_path, shards):
    mae_export(str(tmp_path / "src"))
    cfg = {"name": "ft", "data": shards, "init": str(tmp_path / "src"), "num_classes": 3, "max_steps": 2,
           "batch_size": 8, "loader_workers": 0, "trackers": [], "peft": {"lora": {"rank": 4}}}
    run_finetune(cfg, data_url=shards, stage_url=str(tmp_path / "stage"))
    first = read_metrics(Store(str(tmp_path / "stage")))[0]
    assert 0 < first["trainable_params"] < first["total_params"]
    config = json.loads((tmp_path / "stage" / "export" / "config.json").read_text())
    assert config["vitforge"]["trainable_params"] == first["trainable_params"]
    from jobs.checkpoint import CheckpointManager, CheckpointPolicy

    info = CheckpointManager(str(tmp_path / "stage"), CheckpointPolicy(every_steps=1)).latest()
    assert len(info.meta["init_digest"]) == 64  # a resume from another init is refused


def test_an_init_files_sha256_is_pinned_into_the_stage_digest_and_changed_weights_are_refused(tmp_path, shards):
    from jobs.init import InitChangedError, init_sha256, pin_init_hashes, read_init
    from jobs.layout import StageStatus
    from pipeline._plan import RunConflictError, plan_run, record_spec

    mae_export(str(tmp_path / "src"))

    def spec(**extra):
        stages = [{"name": "pretrain", "kind": "mae", "data": shards, "model": TINY_MODEL, "decoder": TINY_DECODER},
                  {"name": "more", "kind": "mae", "data": shards, "init": "pretrain", "model": TINY_MODEL,
                   "decoder": TINY_DECODER},
                  {"name": "ft", "kind": "finetune", "data": shards, "init": str(tmp_path / "src"), **extra}]
        return parse_spec({"name": "pin", "storage": str(tmp_path / "runs"), "stages": stages})

    first = spec()
    unpinned = first.stage("ft").digest()
    pin_init_hashes(first)
    digest = init_sha256(str(tmp_path / "src"))
    assert first.stage("ft").init_sha256 == digest and first.stage("ft").digest() != unpinned
    assert first.stage("more").init_sha256 is None  # an earlier stage: its own digest covers it
    record_spec(first)
    StageStatus(first.stage_url("ft")).update(state="preempted", kind="finetune")  # started: changes are checked

    again = spec()
    pin_init_hashes(again)
    assert again.stage("ft").digest() == first.stage("ft").digest()
    plan_run(again)  # the same weights: the same spec

    mae_export(str(tmp_path / "src"), seed=1)  # other weights under the same path
    changed = spec()
    pin_init_hashes(changed)
    with pytest.raises(RunConflictError, match="stages.ft.init_sha256"):
        plan_run(changed)
    with pytest.raises(InitChangedError, match="stages\\[2\\] \\(ft\\) > init_sha256: the spec pins"):
        pin_init_hashes(spec(init_sha256=digest))  # a pinned hash must match the file
    with pytest.raises(InitChangedError, match="weights changed since the run pinned them"):
        read_init(str(tmp_path / "src"), sha256=digest)  # a worker refuses weights other than the pinned ones


PEFT_STEPS = 8  # 64 samples, global batch 16: 4 steps an epoch


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_peft_stage_resumes_to_the_same_losses_on_zero2_and_on_one_worker(s3, tmp_path):
    from _shards_util import write_shards
    from _train_util import assert_same_losses, finish, losses, metrics, status, torchrun, write_job, write_spec

    data = f"s3://{s3.bucket}/peft-shards-{tmp_path.name}"
    write_shards(data, [8] * 8)
    mae_export(str(tmp_path / "src"))
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    stage = {"name": "pretrain", "kind": "mae", "data": data, "init": str(tmp_path / "src"), "model": TINY_MODEL,
             "decoder": TINY_DECODER, "peft": {"lora": {"rank": 4}, "unfreeze_last": 1}, "max_steps": PEFT_STEPS,
             "batch_size": 8, "zero_stage": 2, "loader_workers": 0, "checkpoint": {"every_steps": 2, "keep_last": 2},
             "optim": {"base_lr": 5.0e-3, "warmup_steps": 2}, "trackers": []}
    rc, out = finish(torchrun(write_spec(tmp_path, storage, "ref", stage)))
    assert rc == 0, out[-4000:]
    ref = metrics(storage, "ref")
    assert 0 < ref[0]["trainable_params"] < ref[0]["total_params"]

    spec = write_spec(tmp_path, storage, "kill", stage)
    rc, out = finish(torchrun(job=write_job(spec, "pretrain", fault={"kill_rank": 1, "kill_at_step": 5})))
    assert rc != 0 and status(storage, "kill")["state"] == "running", out[-3000:]
    rc, out = finish(torchrun(spec))
    assert rc == 0, out[-4000:]
    assert status(storage, "kill")["resumed_from"] == 4
    assert_same_losses(losses(storage, "kill"), [r["loss"] for r in ref], PEFT_STEPS)

    spec = write_spec(tmp_path, storage, "shrink", stage)
    rc, out = finish(torchrun(job=write_job(spec, "pretrain", fault={"kill_rank": 0, "kill_at_step": 5})))
    assert rc != 0, out[-3000:]
    rc, out = finish(torchrun(spec, nproc=1))  # the universal-checkpoint path, frozen parameters included
    assert rc == 0 and "on 1 workers" in out, out[-4000:]
    got = losses(storage, "shrink")
    assert len(got) == PEFT_STEPS and status(storage, "shrink")["world_size"] == 1
    assert_same_losses(got[:4], [r["loss"] for r in ref[:4]], 4)
    assert all(0 < loss < 10 for loss in got[4:])
    from jobs.export import load_export_model

    model, config = load_export_model(f"{storage}/shrink/stages/pretrain/export")
    assert not any("lora" in k for k in model.state_dict()) and config["vitforge"]["trainable_params"] > 0

"""Fine-tuning: the three modes' models, exports and recipes in one process, then a 2-worker
DeepSpeed gang per mode (ZeRO-2 and ZeRO-3) from a spec whose stages reference an earlier export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import yaml

from _train_util import TINY_MODEL, finish, metrics, stage_store, status, torchrun
from jobs.engine import StageContext
from jobs.export import export_encoder, load_export_model
from jobs.finetune import (FinetuneConfig, FinetuneMethod, layer_decay_groups, merge_lora_state, mix_batch,
                           soft_targets, step_rng)
from jobs.mae import MAEConfig, build_mae
from pipeline.spec import SpecError, parse_spec

TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}


def write_mae_export(dest: str, seed: int = 0) -> None:
    """A (randomly initialised, perturbed) MAE encoder exported as an earlier stage would."""
    torch.manual_seed(seed)
    cfg = MAEConfig(name="pretrain", data="/x", model=TINY_MODEL, decoder=TINY_DECODER)
    encoder = build_mae(cfg).encoder
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    export_encoder(encoder, cfg.model, dest)


def train_a_few_steps(method: FinetuneMethod, model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW(method.param_groups(model, method.cfg.optim), lr=1e-2)
    for step in range(steps):
        batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 3, (8,))}
        loss, _ = method.step(model, batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["full", "linear", "lora"])
def test_each_mode_trains_and_exports_a_plain_timm_classifier_with_the_same_outputs(tmp_path, mode):
    write_mae_export(str(tmp_path / "mae"))
    cfg = FinetuneConfig(name="ft", data="/x", init="pretrain", mode=mode, num_classes=3)
    method = FinetuneMethod(cfg)
    method.setup(StageContext(stage_url=str(tmp_path / "st"), data_url="/x", refs={"init": str(tmp_path / "mae")}))
    model = method.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "linear":
        assert trainable == {"head.weight", "head.bias"}  # BatchNorm without affine, frozen encoder
    elif mode == "lora":
        assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
        assert any("attn.qkv.lora_A" in n for n in trainable) and any("attn.proj.lora_B" in n for n in trainable)
    train_a_few_steps(method, model)
    if mode == "lora":
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved

    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ours, config = load_export_model(str(tmp_path / "export"))
    assert config["num_classes"] == 3 and not any("lora" in k for k in loaded.state_dict())
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert want.shape == (4, 3)
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)  # BN folding / LoRA merge: fp rounding
        torch.testing.assert_close(ours.eval()(x), want, rtol=1e-4, atol=1e-5)
        batch = {"image": x, "label": torch.tensor([0, 1, 2, 0]), "pad": torch.tensor([False, False, False, True])}
        sums = method.eval_step(model, batch)
    assert sums["count"] == 3 and 0 <= sums["top1"] <= sums["top5"] == 3  # top-5 of 3 classes always hits


def test_lora_merge_is_w_plus_b_a_times_scaling():
    a, b, w = torch.randn(2, 5), torch.randn(4, 2), torch.randn(4, 5)
    state = {"x.base_layer.weight": w, "x.base_layer.bias": torch.ones(4), "x.lora_A.default.weight": a,
             "x.lora_B.default.weight": b, "y.weight": torch.zeros(1)}
    out = merge_lora_state(state, scaling=0.5)
    assert set(out) == {"x.weight", "x.bias", "y.weight"}
    torch.testing.assert_close(out["x.weight"], w + 0.5 * b @ a)


def test_layer_decay_scales_lr_from_head_down_to_embeddings():
    model = timm.create_model("vit_tiny_patch16_224", **{k: v for k, v in TINY_MODEL.items() if k != "arch"},
                              num_classes=3)
    groups = layer_decay_groups(model, 0.05, 0.5, {"pos_embed", "cls_token"})
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[1].attn.qkv.weight)] == 0.5
    assert scale[id(model.blocks[0].attn.qkv.weight)] == 0.25
    assert scale[id(model.patch_embed.proj.weight)] == scale[id(model.cls_token)] == 0.125
    assert wd[id(model.cls_token)] == 0.0 and wd[id(model.blocks[0].attn.qkv.bias)] == 0.0
    assert wd[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_mixup_and_cutmix_keep_target_mass_and_are_a_function_of_the_step():
    cfg = FinetuneConfig(name="ft", data="/x", init="p", mode="full", num_classes=3)
    imgs = torch.randn(6, 3, 32, 32)
    targets = soft_targets(torch.tensor([0, 1, 2, 0, 1, 2]), 3, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and math.isclose(float(targets[0, 0]), 0.9 + 0.1 / 3,
                                                                         rel_tol=1e-6)
    seen_cut = seen_mix = False
    for step in range(20):
        x1, t1 = mix_batch(imgs, targets, cfg, step_rng(0, step, 1))
        x2, t2 = mix_batch(imgs, targets, cfg, step_rng(0, step, 1))
        assert torch.equal(x1, x2) and torch.equal(t1, t2)
        assert torch.allclose(t1.sum(1), torch.ones(6))
        changed = (x1 != imgs).float().mean().item()
        seen_cut |= 0 < changed < 0.999
        seen_mix |= changed > 0.999
    assert seen_cut and seen_mix
    linear = FinetuneConfig(name="ft", data="/x", init="p", mode="linear")
    assert linear.mixup == 0 and linear.drop_path_rate == 0 and linear.label_smoothing == 0
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.layer_decay == 0.75
    assert np.isfinite(step_rng(0, 1, 0).random())


def test_spec_references_resolve_to_exports_and_dangling_ones_name_the_field():
    stages = [{"name": "pretrain", "kind": "mae", "data": "s3://b/shards", "model": TINY_MODEL},
              {"name": "probe", "kind": "finetune", "mode": "linear", "data": "s3://b/shards", "init": "pretrain"},
              {"name": "other", "kind": "finetune", "data": "s3://b/shards", "init": "s3://b/x/export"}]
    spec = parse_spec({"name": "r", "storage": "s3://b/runs", "stages": stages})
    assert spec.stage_job("probe", "ray")["init_url"] == "s3://b/runs/r/stages/pretrain/export"
    assert spec.stage_job("other", "ray")["init_url"] == "s3://b/x/export"
    assert "init_url" not in spec.stage_job("pretrain", "ray")
    with pytest.raises(SpecError, match=r"stages\[1\] \(probe\) > init: 'pretrian' is neither an earlier stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [stages[0], {**stages[1], "init": "pretrian"}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(probe\) > init: 'pretrain' is a later stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [stages[1], stages[0]]})
    prep = {"name": "data", "kind": "prep", "source": "./d"}
    with pytest.raises(SpecError, match=r"stages\[1\] \(probe\) > init: stage 'data' is a prep stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [prep, {**stages[1], "data": "data", "init": "data"}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(probe\) > mode"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [{**stages[1], "init": "/x", "mode": "partial"}]})


# ---- on a 2-worker DeepSpeed gang --------------------------------------------------------------------


def finetune_spec(tmp_path, storage: str, data: str) -> str:
    common = {"kind": "finetune", "data": data, "init": "pretrain", "batch_size": 8, "loader_workers": 2,
              "checkpoint": {"every_steps": 2, "keep_last": 1}, "optim": {"base_lr": 5e-3}}
    stages = [{"name": "pretrain", "kind": "mae", "data": data, "model": TINY_MODEL, "decoder": TINY_DECODER},
              {**common, "name": "full", "mode": "full", "zero_stage": 3, "epochs": 2},
              {**common, "name": "linear", "mode": "linear", "zero_stage": 2, "max_steps": 3},
              {**common, "name": "lora", "mode": "lora", "zero_stage": 3, "max_steps": 3, "lora": {"r": 4}}]
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump({"name": "ft", "storage": storage, "compute": {"workers": 2}, "stages": stages}))
    return str(path)


@pytest.fixture(scope="module")
def labeled_shards(s3, tmp_path_factory) -> str:
    from _shards_util import write_shards

    dest = f"s3://{s3.bucket}/finetune-shards-{tmp_path_factory.mktemp('x').name}"
    write_shards(dest, {"train": [24, 24], "val": [10]}, classes=3)
    return dest


@pytest.mark.parametrize("mode", ["full", "linear", "lora"])
def test_gang_finetunes_an_earlier_stage_export_logs_val_top1_per_epoch_and_exports(labeled_shards, s3, tmp_path,
                                                                                      mode):
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    write_mae_export(f"{storage}/ft/stages/pretrain/export")
    spec = finetune_spec(tmp_path, storage, labeled_shards)
    rc, out = finish(torchrun(spec, mode))
    assert rc == 0, out[-4000:]
    assert status(storage, "ft", mode)["state"] == "done"
    records = metrics(storage, "ft", mode)
    evaluated = [r for r in records if "val_top1" in r]
    # 48 train samples / (2 workers x 8) = 3 steps an epoch: evaluated at each epoch end (and the last step)
    assert [r["step"] for r in evaluated] == ([3, 6] if mode == "full" else [3])
    for r in evaluated:
        assert r["val_count"] == 10 and 0 <= r["val_top1"] <= r["val_top5"] <= 1 and math.isfinite(r["val_loss"])
    if mode == "full":  # layer-wise lr decay reached the optimizer: the logged lr is the head's (scale 1)
        assert all(math.isfinite(r["loss"]) for r in records)
    export = stage_store(storage, "ft", mode).child("export")
    local = tmp_path / "export"
    for name in ("config.json", "model.safetensors"):
        export.get_file(name, str(local / name))
    model = timm.create_model(f"local-dir:{local}", pretrained=True).eval()
    assert model.num_classes == 3
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()

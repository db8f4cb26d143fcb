"""MAE model, schedules, spec validation and the timm export — single process, no gang."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from jobs.engine import param_groups
from jobs.export import export_encoder, load_export
from jobs.mae import MAEConfig, build_mae, mask_noise
from pipeline._modelcheck import check_models
from pipeline.spec import SpecError, parse_spec

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}
TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}


def tiny_cfg(**over) -> MAEConfig:
    return MAEConfig(**{"name": "pretrain", "data": "/x", "model": TINY_MODEL, "decoder": TINY_DECODER, **over})


def test_mae_masks_per_sample_and_averages_loss_over_masked_patches_only():
    torch.manual_seed(0)
    model = build_mae(tiny_cfg())
    imgs = torch.randn(4, 3, 32, 32)
    noise = mask_noise(torch.tensor([7, 8, 9, 10]), 64, seed=0, step=3)
    # a pure function of (seed, step, sample index): the same sample gets the same mask in any batch,
    # on any rank and micro-batch; another step or another sample gets another one
    assert torch.equal(noise[1:3], mask_noise(torch.tensor([8, 9]), 64, seed=0, step=3))
    assert not torch.equal(noise, mask_noise(torch.tensor([7, 8, 9, 10]), 64, seed=0, step=4))
    assert not torch.equal(noise[0], noise[1])
    latent, mask, ids_restore = model.forward_encoder(imgs, noise)
    assert latent.shape == (4, 1 + 16, 64)  # cls + 25% of 64 patches: visible tokens only
    assert mask.shape == (4, 64) and torch.all(mask.sum(1) == 48)
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (4, 64, 4 * 4 * 3)
    loss = model.forward_loss(imgs, pred, mask)
    # changing the prediction on visible patches leaves the loss unchanged
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 100.0
    assert torch.allclose(model.forward_loss(imgs, pred2, mask), loss.detach())
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    # fixed sin-cos position embeddings, excluded from the optimizer
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    groups = param_groups(model, 0.05, {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"})
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.mask_token) in no_decay and id(model.encoder.cls_token) in no_decay
    assert id(model.encoder.blocks[0].attn.qkv.weight) not in no_decay
    assert id(model.encoder.blocks[0].attn.qkv.bias) in no_decay


def test_mae_with_register_tokens_and_activation_checkpointing_backpropagates():
    model = build_mae(tiny_cfg(model={**TINY_MODEL, "reg_tokens": 2}, activation_checkpointing=True))
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert model.encoder.reg_token.grad is not None and model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_export_loads_in_timm_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(model={**TINY_MODEL, "reg_tokens": 1})
    model = build_mae(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not an initial state
    dest = str(tmp_path / "export")
    export_encoder(model.encoder, cfg.model, dest)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        a = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors")),
                              **config["model_args"]).eval()
        b = timm.create_model(f"local-dir:{dest}", pretrained=True).eval()
        c = load_export(dest).eval()
        for m in (a, b, c):
            assert torch.equal(m.forward_features(x), ours)
    assert config["model_args"]["reg_tokens"] == 1 and config["architecture"] == "vit_tiny_patch16_224"
    # timm's save_for_hf fields, and a model card beside them
    assert config["global_pool"] == model.encoder.global_pool and config["num_features"] == 64
    card = (tmp_path / "export" / "README.md").read_text()
    assert "vit_tiny_patch16_224" in card and "headless encoder" in card and "local-dir:" in card


@pytest.mark.faults
def test_spec_errors_name_the_field_path():
    raw = {"name": "r", "storage": "/tmp/r", "compute": {"workers": 2, "gpu_per_worker": 1},
           "stages": [{"name": "data", "kind": "prep", "source": "./d", "shard_size": 256},
                      {"name": "pretrain", "kind": "mae", "data": "data", "epochs": 0,
                       "model": {"arch": "vit_tiny_patch16_224", "img_siz": 32}},
                      {"name": "x", "kind": "dinoo"}]}
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    text = str(err.value)
    assert "compute > gpu_per_worker" in text
    assert "stages[1] (pretrain) > model > img_siz" in text
    assert "stages[1] (pretrain) > epochs" in text
    assert "stages[2] (x)" in text and "dinoo" in text
    raw = {"name": "r", "storage": "/tmp/r", "stages": [{"name": "p", "kind": "mae", "data": "nothing"}]}
    with pytest.raises(SpecError, match=r"stages\[0\] \(p\) > data: 'nothing' is neither"):
        parse_spec(raw)
    spec = parse_spec({"name": "r", "storage": "/tmp/r",  # timm's names are checked after the spec's own checks
                       "stages": [{"name": "p", "kind": "mae", "data": "/d", "model": {"arch": "vit_tiniest"}}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(p\) > model > arch: unknown ViT architecture"):
        check_models(spec)
    spec = parse_spec({"name": "r", "storage": "s3://b/runs",
                       "stages": [{"name": "p", "kind": "mae", "data": "s3://b/shards", "model": TINY_MODEL}]})
    job = spec.stage_job("p", launcher="ray")
    assert job["stage_url"] == "s3://b/runs/r/stages/p" and job["data_url"] == "s3://b/shards"
    assert math.isclose(spec.stage("p").mask_ratio, 0.75)


def _official_2d_sincos(embed_dim: int, grid_size: int) -> torch.Tensor:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, written out here (cls_token=True)."""
    import numpy as np

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape([2, 1, grid_size, grid_size])  # grid[0]: the column index (w goes first)

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)).float()


def test_sincos_position_embeddings_are_mae_s_and_a_stored_older_order_still_loads(tmp_path):
    torch.manual_seed(0)
    model = build_mae(tiny_cfg())  # grid 8, encoder 64, decoder 32
    assert torch.equal(model.encoder.pos_embed[0], _official_2d_sincos(64, 8))
    assert torch.equal(model.decoder_pos_embed[0], _official_2d_sincos(32, 8))
    # the embedding is a (frozen) parameter: checkpoints and exports store it, loading never recomputes it
    state = model.state_dict()
    assert {"encoder.pos_embed", "decoder_pos_embed"} <= set(state)
    half = 32
    older = torch.cat([state["encoder.pos_embed"][..., half:], state["encoder.pos_embed"][..., :half]], dim=-1)
    older_dec = torch.cat([state["decoder_pos_embed"][..., 16:], state["decoder_pos_embed"][..., :16]], dim=-1)
    fresh = build_mae(tiny_cfg())
    fresh.load_state_dict({**state, "encoder.pos_embed": older, "decoder_pos_embed": older_dec})
    assert torch.equal(fresh.encoder.pos_embed, older) and torch.equal(fresh.decoder_pos_embed, older_dec)
    cfg = tiny_cfg()
    export_encoder(fresh.encoder, cfg.model, str(tmp_path / "export"))
    assert torch.equal(load_export(str(tmp_path / "export")).pos_embed, older)

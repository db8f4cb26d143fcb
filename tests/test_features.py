"""The one pooling rule (jobs/models.py ``pool_features`` / ``split_features``) that distillation, eval's
kNN / linear probe and fine-tuning's linear probe all use."""

from __future__ import annotations

import timm
import torch

from jobs.models import pool_features, split_features

VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0}


def _vit(**over):
    return timm.create_model("vit_tiny_patch16_224", **{**VIT, **over}).eval()


def test_token_is_the_cls_token_and_avg_the_mean_patch_token_without_registers():
    model = _vit(reg_tokens=2)  # tokens: CLS, 2 registers, 16 patches
    feats = model.forward_features(torch.randn(2, 3, 32, 32))  # [2, 19, 32]
    assert torch.equal(pool_features(model, feats, "token"), feats[:, 0])
    assert torch.equal(pool_features(model, feats, "avg"), feats[:, 3:].mean(1))
    glob, spatial, grid = split_features(model, feats)
    assert torch.equal(glob, feats[:, 0]) and grid == (4, 4) and spatial.shape == (2, 32, 4, 4)
    assert torch.equal(spatial[:, :, 1, 2], feats[:, 3 + 1 * 4 + 2])  # row-major patch grid


def test_a_model_without_a_cls_token_pools_its_patches_and_none_is_the_models_own_head_pooling():
    model = _vit(class_token=False, reg_tokens=2, global_pool="avg", fc_norm=True)
    feats = model.forward_features(torch.randn(2, 3, 32, 32))  # [2, 18, 32]: registers are no CLS token
    assert torch.equal(pool_features(model, feats, "token"), feats[:, 2:].mean(1))
    with torch.no_grad():
        assert torch.equal(pool_features(model, feats, None), model.forward_head(feats, pre_logits=True))  # fc_norm


def test_a_cnn_feature_map_is_averaged_whatever_the_pool():
    cnn = timm.create_model("resnet18", num_classes=0, channels=(8, 16, 32, 64), stem_width=8).eval()
    fmap = cnn.forward_features(torch.randn(2, 3, 32, 32))  # [2, 64, 1, 1]
    for pool in ("token", "avg"):
        assert torch.equal(pool_features(cnn, fmap, pool), fmap.mean(dim=(2, 3)))
    assert split_features(cnn, fmap)[1] is fmap

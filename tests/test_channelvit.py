"""ChannelViT (jobs/channelvit.py): C x L tokens from one patch embedding shared by the channels,
any channel subset at eval, Hierarchical Channel Sampling in training, timm registry and exports."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import jobs.models  # noqa: F401  registers channelvit_* with timm
from jobs.channelvit import ChannelVisionTransformer, hierarchical_channel_sampling
from jobs.export import export_timm_model

ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "in_chans": 6, "num_classes": 0}


def _model(**kw) -> ChannelVisionTransformer:
    torch.manual_seed(0)
    return timm.create_model("channelvit_tiny_patch16_224", **{**ARGS, **kw}).eval()


@pytest.mark.parametrize("arch,dim", [("channelvit_tiny_patch16_224", 192), ("channelvit_small_patch16_224", 384),
                                      ("channelvit_base_patch16_224", 768)])
def test_registered_sizes_give_one_token_per_channel_and_patch(arch, dim):
    m = timm.create_model(arch, img_size=32, patch_size=8, depth=1, in_chans=5, num_classes=0).eval()
    x = torch.randn(2, 5, 32, 32)
    assert m.forward_features(x).shape == (2, 1 + 5 * 16, dim) and m(x).shape == (2, dim)
    assert m.patch_embed.proj.in_channels == 1 and m.patch_embed.channel_embed.shape == (5, dim)  # shared projection


def test_any_channel_subset_is_accepted_and_channel_order_does_not_matter():
    m, x = _model(), torch.randn(3, 6, 32, 32)
    with torch.no_grad():
        full = m(x)
        perm = [4, 1, 5, 0, 3, 2]
        assert torch.allclose(m(x[:, perm], channels=perm), full, atol=1e-5)  # tokens carry their channel
        for subset in ([0], [2, 5], [0, 1, 3, 4]):
            out = m(x[:, subset], channels=subset)
            assert out.shape == full.shape and not torch.allclose(out, full, atol=1e-3)
        m.channel_subset = [1, 3]
        assert torch.equal(m(x[:, [1, 3]]), m(x[:, [1, 3]], channels=[1, 3]))
    m.channel_subset = None
    with pytest.raises(ValueError, match="input has 2 channels, the model was built for 6: pass channels="):
        m(x[:, :2])
    with pytest.raises(ValueError, match=r"must name 2 indices in 0..5"):
        m(x[:, :2], channels=[0, 6])


def test_hierarchical_channel_sampling_picks_a_random_k_subset_per_sample_in_training():
    torch.manual_seed(1)
    x = torch.arange(4 * 6, dtype=torch.float32).view(4, 6, 1, 1).expand(4, 6, 8, 8).contiguous()
    counts = set()
    for _ in range(30):
        picked, idx = hierarchical_channel_sampling(x, torch.arange(6))
        k = picked.shape[1]
        counts.add(k)
        assert idx.shape == (4, k) and torch.equal(picked[:, :, 0, 0], x[torch.arange(4)[:, None], idx, 0, 0])
        assert all(len(set(row.tolist())) == k for row in idx)  # a subset: no channel twice
    assert counts == set(range(1, 7))
    m = _model()
    m.train()
    lengths = {m.forward_features(torch.randn(2, 6, 32, 32)).shape[1] for _ in range(20)}
    assert len(lengths) > 1 and lengths <= {1 + k * 16 for k in range(1, 7)}
    m.eval()
    assert m.forward_features(torch.randn(2, 6, 32, 32)).shape[1] == 1 + 6 * 16


def test_export_loads_through_timm_create_model_with_c_channel_input_size(tmp_path):
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    export_timm_model(m, "channelvit_tiny_patch16_224", ARGS, str(tmp_path / "export"), img_size=32)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [6, 32, 32]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert isinstance(loaded, ChannelVisionTransformer) and torch.equal(loaded(x), m(x))
        assert torch.equal(loaded(x[:, [0, 5]], channels=[0, 5]), m(x[:, [0, 5]], channels=[0, 5]))


def test_channel_pooling_keeps_each_channel_apart_and_zeros_the_absent_ones():
    from jobs.mae import MAEConfig, MAEMethod
    from jobs.models import pool_features

    m, x = _model(), torch.randn(3, 6, 32, 32)
    with torch.no_grad():
        tokens = m.forward_features(x)  # [3, 1 + 6*16, 192]
        full = pool_features(m, tokens, "channels")
        assert full.shape == (3, 6 * 192)
        assert torch.allclose(full.view(3, 6, 192)[:, 4], tokens[:, 1 + 4 * 16:1 + 5 * 16].mean(1))  # channel 4's block
        m.channel_subset = [5, 1]
        sub = pool_features(m, tokens := m.forward_features(x[:, [5, 1]]), "channels").view(3, 6, 192)
    assert torch.allclose(sub[:, 5], tokens[:, 1:17].mean(1)) and torch.allclose(sub[:, 1], tokens[:, 17:].mean(1))
    assert not sub[:, [0, 2, 3, 4]].any()  # the channels the input lacks: zeros, in one space with the full features
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    with pytest.raises(ValueError, match=r"pool: channels needs a ChannelViT .*use pool: token or avg"):
        pool_features(plain, plain.forward_features(torch.randn(1, 3, 32, 32)), "channels")
    arch = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    mae = {"name": "m", "data": "/unused"}
    assert MAEMethod(MAEConfig(**mae, model={**arch, "arch": "channelvit_tiny_patch16_224"})).pool == "channels"
    assert MAEMethod(MAEConfig(**mae, model={**arch, "arch": "vit_tiny_patch16_224"})).pool == "avg"

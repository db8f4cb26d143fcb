"""MAE on C-channel data: in_chans from the manifest, the decoder predicts every channel, FLOPs
count C, the export records input_size [C, H, W] and loads with timm."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from _cells import cells, write_npy_shards
from dataprep.loader import StreamingLoader
from jobs.engine import StageContext
from jobs.export import export_encoder
from jobs.mae import MAEConfig, MAEMethod, build_mae
from jobs.models import ModelConfig, with_data_channels

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 4}


def _cfg(**model) -> MAEConfig:
    return MAEConfig(name="pretrain", data="/x", model={**TINY, **model},
                     decoder={"embed_dim": 32, "depth": 1, "num_heads": 4})


def test_in_chans_comes_from_the_manifest_and_a_disagreeing_one_is_refused(tmp_path):
    write_npy_shards(str(tmp_path), [a for a, _ in cells(per_class=4, classes=3, size=32)])
    assert with_data_channels(ModelConfig(**TINY), str(tmp_path)).in_chans == 6
    assert with_data_channels(ModelConfig(**TINY, in_chans=6), str(tmp_path)).in_chans == 6
    with pytest.raises(ValueError, match=r"model.in_chans is 3 but the data .* has 6 channels \(c0, c1, c2, c3, c4, c5\)"):
        with_data_channels(ModelConfig(**TINY, in_chans=3), str(tmp_path), stage="pretrain")


def test_mae_trains_on_six_channel_batches_and_exports_a_six_channel_encoder(tmp_path):
    data = tmp_path / "data"
    write_npy_shards(str(data), [a for a, _ in cells(per_class=4, classes=3, size=32)])
    method = MAEMethod(_cfg())
    method.setup(StageContext(stage_url=str(tmp_path / "stage"), data_url=str(data)))
    assert method.cfg.model.in_chans == 6
    torch.manual_seed(0)
    model = method.build_model()
    batch = next(iter(StreamingLoader(str(data), batch_size=4, transform=method.train_transform())))
    assert batch["image"].shape == (4, 6, 32, 32) and batch["image"].dtype == torch.float32
    loss, _ = method.step(model, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.decoder_pred.out_features == 4 * 4 * 6
    assert method.flops_per_sample() > MAEMethod(_cfg()).flops_per_sample()  # C=6 costs more than C=3

    export_encoder(model.encoder, method.cfg.model, str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [6, 32, 32]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 6, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.encoder.forward_features(x))


def test_rgb_data_keeps_the_arch_record_of_before():
    cfg = _cfg()
    assert "in_chans" not in cfg.model.arch_record() and build_mae(cfg).decoder_pred.out_features == 4 * 4 * 3

"""The engine's pure pieces (schedules, the DeepSpeed config) — single process, no gang.

Moved from test_mae.py: they test ``jobs/engine.py``, not MAE (an MAE config is just a stage config).
"""

from __future__ import annotations

import pytest

from jobs.engine import OptimConfig, deepspeed_config, lr_at
from jobs.mae import MAEConfig

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}
TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}


def tiny_cfg(**over) -> MAEConfig:
    return MAEConfig(**{"name": "pretrain", "data": "/x", "model": TINY_MODEL, "decoder": TINY_DECODER, **over})


def test_lr_schedule_is_warmup_then_cosine_of_the_step():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, floor=0.1) == pytest.approx(0.1)


def test_deepspeed_mapping_in_a_stage_is_merged_over_ours():
    cfg = tiny_cfg(zero_stage=3, offload_optimizer=True, optim=OptimConfig(clip_grad=1.0),
                   deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": True}})
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 64 * 4

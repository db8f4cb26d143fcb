"""A 6-channel uint16 run through ``run_spec`` (slow tier): prep ``format: npy`` from multi-page
TIFFs, MAE on 2 workers with ZeRO-2 taking in_chans from the manifest, eval with the MAE
reconstruction; the export records input_size [6, 32, 32] and loads with timm."""

from __future__ import annotations

import pytest

from _cells import cells, write_tiff_folder
from cluster.storage import Store

MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 4}


@pytest.mark.slow
def test_six_channel_prep_mae_and_eval_run_end_to_end(tmp_path, ray_local):
    import timm
    import torch

    import jobs.models  # noqa: F401
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    write_tiff_folder(str(tmp_path / "src"), cells(per_class=40, classes=3, size=32), "multipage")
    spec = parse_spec({
        "name": "cells6", "storage": str(tmp_path / "runs"),
        "compute": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [
            {"name": "data", "kind": "prep", "source": str(tmp_path / "src"), "format": "npy", "shard_size": 40,
             "val_fraction": 0.2},
            {"name": "pretrain", "kind": "mae", "data": "data", "model": MODEL,
             "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4}, "max_steps": 6, "batch_size": 16,
             "zero_stage": 2, "checkpoint": {"every_steps": 3}},
            {"name": "eval", "kind": "eval", "data": "data", "models": ["pretrain"]},
        ],
    })
    states = run_spec(spec).states
    assert set(states.values()) == {"done"}, states
    report = Store(spec.stage_url("eval")).get_json("eval.json")["models"]["pretrain"]
    assert report["reconstruction"]["samples"] == 24 and report["knn_top1"] >= 0
    export = Store(spec.stage_url("pretrain")).child("export")
    assert export.get_json("config.json")["pretrained_cfg"]["input_size"] == [6, 32, 32]
    model = timm.create_model(f"local-dir:{spec.stage_url('pretrain')}/export", pretrained=True).eval()
    assert model.forward_features(torch.randn(1, 6, 32, 32)).shape == (1, 1 + 64, 64)

"""Every run spec shipped in configs/ passes the real spec loader (strict fields, stage graph)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.spec import TRAINING_KINDS, load_spec

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if p.name != "demo.yaml"]


def test_configs_folder_holds_the_demo_and_gpu_specs():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names and len(GPU_CONFIGS) >= 2, names


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_spec_validates_and_reads_imagenet_scale_data_from_s3(path):
    spec = load_spec(str(path))
    assert spec.storage.startswith("s3://") and spec.compute.gpus_per_worker >= 1
    prep = [s for s in spec.stages if s.kind == "prep"]
    assert prep and all(s.source.startswith("s3://") for s in prep)
    kinds = [s.kind for s in spec.stages]
    assert {"distill", "finetune", "eval"} <= set(kinds) and ({"mae", "dino"} & set(kinds))
    for stage in spec.stages:
        if stage.kind in TRAINING_KINDS:
            assert stage.precision == "bf16" and stage.checkpoint.every_minutes, stage.name


def test_gpu_specs_cover_mae_vit_b16_and_dino_vit_s16_distilled_to_vit_ti():
    stages = [s for p in GPU_CONFIGS for s in load_spec(str(p)).stages]
    archs = {(s.kind, s.model.arch) for s in stages if s.kind in ("mae", "dino", "distill")}
    assert ("mae", "vit_base_patch16_224") in archs and ("dino", "vit_small_patch16_224") in archs
    assert ("distill", "vit_tiny_patch16_224") in archs


def test_demo_spec_validates_as_the_demo_prepares_it(tmp_path):
    from pipeline.demo import DEMO_SPEC, prepare

    spec = prepare(str(tmp_path / "runs"), (), tmp_path)
    assert spec.compute.workers == 2 and spec.stage("pretrain").zero_stage == 2
    assert [s.kind for s in spec.stages] == ["prep", "mae", "distill", "finetune", "finetune", "finetune",
                                               "finetune", "eval"]
    assert spec.stage("scratch").init is None and spec.stage("scratch").model.depth == spec.stage("pretrain").model.depth
    assert load_spec(str(DEMO_SPEC), overrides=[f"stages.data.source={tmp_path}"]).name == "demo"

"""Distillation: losses, projector grids and timm exports in one process, then an MAE export
distilled into a smaller ViT (ZeRO-2) and into a small CNN (ZeRO-3) on 2-worker DeepSpeed gangs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from _train_util import TINY_MODEL, finish, metrics, stage_store, status, torchrun, write_digit_shards
from jobs.distill import DistillConfig, DistillMethod, kl_logits, split_features
from jobs.engine import StageContext
from jobs.export import load_export_model
from pipeline._modelcheck import check_models
from pipeline.spec import SpecError, parse_spec
from test_finetune import write_mae_export

SMALL_VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
             "num_heads": 2}
SMALL_CNN = {"arch": "resnet18", "img_size": 32, "args": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def distill(tmp_path, student: dict, teacher_url: str, **cfg) -> tuple[DistillMethod, torch.nn.Module]:
    data = write_digit_shards(str(tmp_path / "data"), images=20)  # the student takes its channels from the data
    method = DistillMethod(DistillConfig(name="s", data=data, teacher="pretrain", model=student, **cfg))
    method.setup(StageContext(stage_url=str(tmp_path / "st"), data_url=data, refs={"teacher": teacher_url}))
    return method, method.build_model()


@pytest.mark.parametrize("student", [SMALL_VIT, SMALL_CNN], ids=["vit", "cnn"])
def test_feature_distillation_from_an_mae_export_trains_the_student_and_projector_only(tmp_path, student):
    write_mae_export(str(tmp_path / "mae"))
    method, model = distill(tmp_path, student, str(tmp_path / "mae"))
    assert method.weights == {"logits": 0.0, "cls": 1.0, "patch": 1.0}  # a teacher without classifier
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    assert not any(p is q for p in model.parameters() for q in method.teacher.parameters())  # not DeepSpeed's
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = {"image": torch.randn(8, 3, 32, 32)}
    first = None
    for step in range(8):
        loss, parts = method.step(model, batch, step)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        opt.step()
        opt.zero_grad()
    assert set(parts) == {"loss_cls", "loss_patch"} and float(loss) < first  # it fits the teacher's features

    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert not any(k.startswith(("projector", "cls.", "patch.")) for k in loaded.state_dict())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.student.forward_features(x))


def test_student_grid_and_cnn_maps_are_resized_to_the_teachers_grid(tmp_path):
    write_mae_export(str(tmp_path / "mae"))  # teacher: 8 x 8 patches of width 64
    for student in (SMALL_VIT, SMALL_CNN):  # 4 x 4 patches; a 1 x 1 map at 32 px
        method, model = distill(tmp_path, student, str(tmp_path / "mae"))
        out = model(torch.randn(2, 3, 32, 32), (8, 8))
        assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, 64, 64)
    teacher = method.teacher
    global_feat, spatial, grid = split_features(teacher, teacher.forward_features(torch.randn(2, 3, 32, 32)))
    assert global_feat.shape == (2, 64) and spatial.shape == (2, 64, 8, 8) and grid == (8, 8)


def test_a_classifier_teacher_from_timm_weights_is_distilled_by_kl_on_logits(tmp_path):
    teacher = timm.create_model("resnet18", num_classes=5, channels=(8, 16, 32, 64), stem_width=8)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    cfg = {"arch": "resnet18", "weights": str(tmp_path / "teacher.safetensors"), "num_classes": 5,
           "args": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    data = write_digit_shards(str(tmp_path / "data"), images=20)
    method = DistillMethod(DistillConfig(name="s", data=data, teacher=cfg, model=SMALL_VIT,
                                         loss={"temperature": 2.0}))
    method.setup(StageContext(stage_url=str(tmp_path / "st"), data_url=data))
    assert method.weights == {"logits": 1.0, "cls": 0.0, "patch": 0.0}
    model = method.build_model()
    assert model.student.num_classes == 5 and model.projector is None
    loss, parts = method.step(model, {"image": torch.randn(4, 3, 32, 32)}, 0)
    assert set(parts) == {"loss_logits"} and math.isfinite(float(loss))
    logits = torch.randn(3, 5)
    assert float(kl_logits(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_logits(logits, -logits, 4.0)) > 0


def test_distill_spec_checks_the_teacher_reference_and_the_student_arch():
    mae = {"name": "pretrain", "kind": "mae", "data": "s3://b/d", "model": TINY_MODEL}
    student = {"name": "student", "kind": "distill", "data": "s3://b/d", "teacher": "pretrain", "model": SMALL_CNN}
    spec = parse_spec({"name": "r", "storage": "s3://b/runs", "stages": [mae, student]})
    assert spec.stage_job("student", "ray")["teacher_url"] == "s3://b/runs/r/stages/pretrain/export"
    with pytest.raises(SpecError, match=r"stages\[1\] \(student\) > teacher: 'pretrained' is neither"):
        parse_spec({"name": "r", "storage": "/r", "stages": [mae, {**student, "teacher": "pretrained"}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(student\) > model > arch: unknown timm model"):
        check_models(parse_spec({"name": "r", "storage": "/r",
                                 "stages": [{**student, "teacher": "/t", "model": {"arch": "resnet_9000"}}]}))
    with pytest.raises(SpecError, match=r"stages\[0\] \(student\) > model > depth: resnet18 has no 'depth'"):
        check_models(parse_spec({"name": "r", "storage": "/r", "stages": [{**student, "teacher": "/t",
                                                                            "model": {**SMALL_CNN, "depth": 3}}]}))


# ---- on a 2-worker DeepSpeed gang --------------------------------------------------------------------


@pytest.mark.parametrize("student,zero", [(SMALL_VIT, 2), (SMALL_CNN, 3)], ids=["vit-zero2", "cnn-zero3"])
def test_gang_distills_an_mae_export_and_the_student_export_loads_in_timm(s3, tmp_path, student, zero):
    import yaml

    from _shards_util import write_shards

    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    data = f"{storage}/shards"
    write_shards(data, {"train": [16, 16]}, classes=None)
    write_mae_export(f"{storage}/d/stages/pretrain/export")
    stages = [{"name": "pretrain", "kind": "mae", "data": data, "model": TINY_MODEL},
              {"name": "student", "kind": "distill", "data": data, "teacher": "pretrain", "model": student,
               "zero_stage": zero, "max_steps": 4, "batch_size": 8, "loader_workers": 2,
               "checkpoint": {"every_steps": 2, "keep_last": 1}, "optim": {"base_lr": 1e-2}}]
    spec = tmp_path / "distill.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "storage": storage, "compute": {"workers": 2}, "stages": stages}))
    rc, out = finish(torchrun(str(spec), "student"))
    assert rc == 0, out[-4000:]
    assert status(storage, "d", "student")["state"] == "done"
    records = metrics(storage, "d", "student")
    assert len(records) == 4 and all(math.isfinite(r["loss_cls"] + r["loss_patch"]) for r in records)

    export = stage_store(storage, "d", "student").child("export")
    local = tmp_path / "export"
    for name in ("config.json", "model.safetensors"):
        export.get_file(name, str(local / name))
    a = timm.create_model(f"local-dir:{local}", pretrained=True).eval()
    b, config = load_export_model(export.url)
    assert config["architecture"] == student["arch"] and config["vitforge"]["teacher"] == "pretrain"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.forward_features(x), b.eval().forward_features(x))

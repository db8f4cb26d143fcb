"""DINO head, loss, schedules, EMA, last-layer freeze and spec validation — single process, no gang."""

from __future__ import annotations

import math

import pytest
import torch

from jobs._dino_loss import DINOLoss
from jobs.dino import DINOConfig, DINOMethod, DINOSchedule, build_dino, ema_update
from pipeline.spec import SpecError, parse_spec

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}
TINY_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def tiny_cfg(**over) -> DINOConfig:
    return DINOConfig(**{"name": "dino", "data": "/x", "model": TINY_MODEL, "head": TINY_HEAD, "local_crops": 2,
                         **over})


def crops(batch: int = 3, local: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(local)]


def test_dino_head_is_l2_normalised_into_a_weight_normalised_last_layer_over_multi_crop_views():
    cfg = tiny_cfg(model={**TINY_MODEL, "reg_tokens": 2})
    assert DINOConfig(name="d", data="/x").head.out_dim == 65536  # the paper's default
    torch.manual_seed(0)
    model = build_dino(cfg)
    assert model.backbone.num_prefix_tokens == 3  # cls + 2 registers
    views = crops()
    out = model(views)
    assert out.shape == (4 * 3, 64)  # view-major: 2 global + 2 local views of 3 images
    head = model.head
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [32, 32, 16]
    assert torch.allclose(head.last_layer.weight().norm(dim=1), torch.ones(64))  # unit rows (g fixed to 1)
    head.last_layer.weight_v.data.mul_(7.0)  # scaling v changes nothing: weight-normalised
    assert torch.allclose(model(views), out, atol=1e-6)
    # the bottleneck is L2-normalised: the logits are bounded by the unit rows
    assert out.abs().max() <= 1.0 + 1e-5


def test_dino_loss_centres_sharpens_skips_same_view_pairs_and_all_ranks_share_the_center():
    torch.manual_seed(0)
    loss = DINOLoss(out_dim=8, student_temp=0.1, center_momentum=0.9)
    student, teacher = torch.randn(4 * 5, 8), torch.randn(2 * 5, 8)
    got = loss(student, teacher, teacher_temp=0.04)
    s = torch.log_softmax(student / 0.1, dim=-1).chunk(4)
    t = torch.softmax(teacher / 0.04, dim=-1).chunk(2)
    pairs = [(i, v) for i in range(2) for v in range(4) if i != v]
    want = sum(torch.sum(-t[i] * s[v], dim=-1).mean() for i, v in pairs) / len(pairs)
    assert len(pairs) == 6 and torch.allclose(got, want)
    loss.update_center(teacher)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    assert "center" in dict(loss.named_buffers())
    # centring: a constant shift of every teacher logit in the center's direction is removed
    shifted = loss.teacher_probs(teacher + loss.center, 0.04)
    assert torch.allclose(shifted, torch.softmax(teacher / 0.04, dim=-1), atol=1e-6)


def test_schedules_are_pure_functions_of_the_step():
    cfg = tiny_cfg(teacher_temp=0.07, warmup_teacher_temp_epochs=2, freeze_last_layer_epochs=1)
    sched = DINOSchedule(cfg, total=100, per_epoch=10)
    partial = tiny_cfg(optim={"base_lr": 1e-3})  # other optimizer fields keep DINO's recipe
    assert (partial.optim.base_lr, partial.optim.weight_decay, partial.optim.betas) == (1e-3, 0.04, (0.9, 0.999))
    assert sched.momentum(0) == pytest.approx(0.996) and sched.momentum(100) == pytest.approx(1.0)
    assert sched.momentum(50) == pytest.approx(0.998)
    assert sched.weight_decay(0) == pytest.approx(0.04) and sched.weight_decay(100) == pytest.approx(0.4)
    assert sched.weight_decay(50) == pytest.approx(0.22)
    assert sched.teacher_temp(0) == pytest.approx(0.04) and sched.teacher_temp(10) == pytest.approx(0.055)
    assert sched.teacher_temp(20) == sched.teacher_temp(99) == pytest.approx(0.07)
    assert sched.last_layer_frozen(9) and not sched.last_layer_frozen(10)
    assert all(math.isclose(sched.momentum(s), DINOSchedule(cfg, 100, 10).momentum(s)) for s in range(101))


def test_defaults_are_main_dino_py_s():
    cfg = DINOConfig(name="d", data="/x")
    assert (cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.warmup_teacher_temp_epochs) == (0.04, 0.04, 0.0)
    assert (cfg.optim.clip_grad, cfg.optim.clip_grad_mode, cfg.head.use_bn) == (3.0, "per_param", False)
    assert cfg.model.drop_path_rate == 0.1 and cfg.freeze_last_layer_epochs == 1.0
    assert tiny_cfg(model={**TINY_MODEL, "arch": "vit_small_patch16_224"}).model.drop_path_rate == 0.1
    assert tiny_cfg().model.drop_path_rate == 0.0  # ViT-Ti
    assert tiny_cfg(model={**TINY_MODEL, "drop_path_rate": 0.2}).model.drop_path_rate == 0.2
    assert DINOSchedule(cfg, total=100, per_epoch=10).teacher_temp(0) == 0.04


def test_head_is_initialised_as_dino_s_head_and_use_bn_adds_batch_norm():
    """The last layer starts as a default nn.Linear weight (rows of norm ~0.57 at bottleneck 256, not
    trunc-normal(0.02)'s ~0.3), drawn from the same random stream as DINO's DINOHead."""
    from jobs.dino import DINOHead, DINOHeadConfig

    torch.manual_seed(3)
    head = DINOHead(64, DINOHeadConfig(out_dim=512, hidden_dim=32, bottleneck_dim=256))
    torch.manual_seed(3)
    mlp = [torch.nn.Linear(64, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 256)]
    for m in mlp:  # DINOHead._init_weights
        torch.nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
    official_last = torch.nn.Linear(256, 512, bias=False)
    assert torch.equal(head.last_layer.weight_v, official_last.weight)
    assert head.last_layer.weight_v.norm(dim=1).mean().item() == pytest.approx(0.577, abs=0.02)
    bn = DINOHead(64, DINOHeadConfig(out_dim=8, hidden_dim=32, bottleneck_dim=16, use_bn=True))
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU",
                                                  "Linear"]


def test_frozen_last_layer_gets_no_optimizer_update_at_all_then_trains():
    """While frozen the last layer is bit-identical, with no weight decay and no AdamW state (as a
    grad of None in main_dino.py); afterwards it trains and gets state."""
    from jobs.engine import OptimConfig
    from jobs._engine_config import build_optimizer

    torch.manual_seed(0)
    method = DINOMethod(tiny_cfg(freeze_last_layer_epochs=1, head={**TINY_HEAD, "norm_last_layer": False}))
    method.set_run_length(total_steps=20, steps_per_epoch=2)
    student = method.build_model()
    opt = build_optimizer(student, OptimConfig(base_lr=1e-2, weight_decay=0.5), set(),
                          method.param_groups(student, method.cfg.optim))
    last = list(student.head.last_layer.parameters())
    assert len(last) == 2 and all(p.requires_grad for p in last)
    start = [p.detach().clone() for p in last]
    for step in range(3):
        for g in opt.param_groups:
            g["frozen"] = g.get("name") in method.frozen_groups(step)
        student.zero_grad()
        loss, _ = method.step(student, {"image": crops()}, step)
        loss.backward()
        opt.step()
        if step < 2:
            assert all(torch.equal(p, p0) for p, p0 in zip(last, start)), step
            assert not any(p in opt.state for p in last)
    assert all(not torch.equal(p, p0) and p in opt.state for p, p0 in zip(last, start))
    assert opt.state[last[0]]["step"] == 1  # its moments start at the first unfrozen step
    assert student.backbone.blocks[0].attn.qkv.weight in opt.state


def test_last_layer_gets_zero_gradients_only_while_frozen_and_ema_follows_the_student():
    torch.manual_seed(0)
    method = DINOMethod(tiny_cfg(freeze_last_layer_epochs=1))
    method.set_run_length(total_steps=20, steps_per_epoch=2)
    student = method.build_model()
    assert not any(p.requires_grad for p in method.teacher.parameters())
    batch = {"image": crops()}
    for step, frozen in ((1, True), (2, False)):
        student.zero_grad()
        loss, metrics = method.step(student, batch, step)
        loss.backward()
        last = student.head.last_layer.weight_v.grad
        assert (last.abs().sum() == 0) == frozen, step
        assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert metrics["teacher_temp"] == pytest.approx(method.schedule.teacher_temp(step))
    before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.after_step(student, 2)
    m = method.schedule.momentum(2)
    for t0, t, s in zip(before, method.teacher.parameters(), student.parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s)
    state = method.extra_state()
    fresh = DINOMethod(tiny_cfg())
    fresh.build_model()
    fresh.load_extra_state(state)
    for a, b in zip(fresh.teacher.parameters(), method.teacher.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.loss.center, method.loss.center) and method.loss.center.abs().sum() > 0


def test_ema_update_in_chunks_equals_one_fused_update():
    torch.manual_seed(0)
    student = build_dino(tiny_cfg())
    a, b = build_dino(tiny_cfg()), build_dino(tiny_cfg())
    b.load_state_dict(a.state_dict())
    ema_update(a, student, 0.9)
    ema_update(b, student, 0.9, max_numel=1000)  # many small gathers
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_spec_with_a_dino_stage_validates_and_a_typo_names_its_path():
    stage = {"name": "pretrain", "kind": "dino", "data": "s3://b/shards", "model": TINY_MODEL, "head": TINY_HEAD,
             "local_crops": 2, "zero_stage": 3}
    spec = parse_spec({"name": "r", "storage": "s3://b/runs", "stages": [stage]})
    assert spec.stages[0].kind == "dino" and spec.stages[0].head.out_dim == 64
    assert spec.stage_job("pretrain", launcher="torchrun")["stage"]["kind"] == "dino"
    with pytest.raises(SpecError) as exc:
        parse_spec({"name": "r", "storage": "s3://b/runs",
                    "stages": [{**stage, "head": {**TINY_HEAD, "bottleneck_dimm": 8}}]})
    assert "stages[0] (pretrain) > head > bottleneck_dimm" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        parse_spec({"name": "r", "storage": "s3://b/runs", "stages": [{**stage, "teacher_tmp": 0.05}]})
    assert "stages[0] (pretrain) > teacher_tmp" in str(exc.value)

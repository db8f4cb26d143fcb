"""iBOT: block masks, masked student, patch loss against a hand-written reference, KoLeo — one process."""

from __future__ import annotations

import math

import pytest
import torch

from jobs._ibot_loss import PatchLoss, koleo_loss
from jobs.ibot import IBOTConfig, IBOTMethod, block_mask, build_ibot, forward_features_masked, sample_masks
from jobs.method import method_class

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}
TINY_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def tiny_cfg(**over) -> IBOTConfig:
    return IBOTConfig(**{"name": "ibot", "data": "/x", "model": TINY_MODEL, "head": TINY_HEAD, "local_crops": 2,
                         "patch_out_dim": 48, **over})


def test_patch_loss_matches_a_hand_written_reference_on_fixed_inputs():
    torch.manual_seed(0)
    b, length, k = 3, 5, 7
    student, teacher = torch.randn(2 * b, length, k), torch.randn(2 * b, length, k)
    masks = torch.rand(2 * b, length) < 0.5
    masks[1] = False  # a sample with no masked token contributes 0 (official: clamp(min=1))
    loss = PatchLoss(k, student_temp=0.1, center_momentum=0.9)
    loss.center.fill_(0.3)
    got = loss(student, teacher, masks, teacher_temp=0.05)
    total = 0.0
    for view in range(2):  # the reference, one scalar at a time
        per_sample = []
        for n in range(view * b, (view + 1) * b):
            num, den = 0.0, 0
            for t in range(length):
                if masks[n, t]:
                    q = [math.exp((teacher[n, t, j].item() - 0.3) / 0.05) for j in range(k)]
                    z = sum(math.exp(student[n, t, j].item() / 0.1) for j in range(k))
                    num += sum(-q[j] / sum(q) * (student[n, t, j].item() / 0.1 - math.log(z)) for j in range(k))
                    den += 1
            per_sample.append(num / max(den, 1))
        total += sum(per_sample) / b
    assert got.item() == pytest.approx(total / 2, rel=1e-5)
    loss.update_center(teacher)
    want = 0.9 * 0.3 + 0.1 * teacher.mean(dim=1).mean(dim=0)
    assert torch.allclose(loss.center[0, 0], want, atol=1e-6)


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.6, 0.8]])
    u = x / x.norm(dim=1, keepdim=True)
    nearest = [3, 3, 1, 1]  # on the unit circle: (0.6, 0.8) is closest to (0, 1)
    want = -sum(math.log((u[i] - u[j]).norm().item() + 1e-8) for i, j in enumerate(nearest)) / 4
    assert koleo_loss(x).item() == pytest.approx(want, rel=1e-4)


def test_block_masks_cover_the_drawn_ratio_in_rectangles_and_are_a_pure_function_of_seed_step_sample():
    import random

    m = block_mask(8, 0.4, (0.3, 1 / 0.3), random.Random(0))
    assert 0.3 <= m.float().mean() <= 0.5
    cfg = tiny_cfg(mask_ratio=[0.3], mask_ratio_var=[0.0])
    a = sample_masks(cfg, torch.tensor([5, 9, 11]), 8, step=3)
    assert a.shape == (6, 64) and a.dtype == torch.bool
    b = sample_masks(cfg, torch.tensor([11, 5]), 8, step=3)  # another batch, order and size: same masks per sample
    assert torch.equal(a[[2, 0]], b[:2]) and torch.equal(a[[5, 3]], b[2:])
    assert not torch.equal(sample_masks(cfg, torch.tensor([5]), 8, step=4), a[[0, 3]])
    assert not torch.equal(a[0], a[3])  # the two global views get their own masks
    half = sample_masks(tiny_cfg(), torch.arange(40), 8, step=0)  # [0, 0.3] +- [0, 0.2]: half unmasked
    unmasked = (half.sum(dim=1) == 0).float().mean()
    assert 0.3 < unmasked < 0.7
    with pytest.raises(ValueError, match="mask_ratio 0.9 \\+- 0.2"):
        tiny_cfg(mask_ratio=[0.9], mask_ratio_var=[0.2])


def test_masked_student_replaces_masked_patch_embeddings_only_and_unmasked_equals_timm():
    torch.manual_seed(0)
    model = build_ibot(tiny_cfg(model={**TINY_MODEL, "reg_tokens": 2})).eval()
    vit = model.backbone
    x = torch.randn(2, 3, 32, 32)
    plain = forward_features_masked(vit, x, None, model.mask_token)
    assert torch.allclose(plain, vit.forward_features(x), atol=1e-6)
    none = torch.zeros(2, 64, dtype=torch.bool)
    assert torch.allclose(forward_features_masked(vit, x, none, model.mask_token), plain, atol=1e-6)
    masks = none.clone()
    masks[0, :10] = True
    out = forward_features_masked(vit, x, masks, model.mask_token)
    assert torch.allclose(out[1], plain[1], atol=1e-6) and not torch.allclose(out[0], plain[0])
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    cls, patch, feats = model(crops, torch.zeros(4, 64, dtype=torch.bool))
    assert cls.shape == (8, 64) and patch.shape == (4, 64, 48) and feats.shape == (4, 64)


def test_ibot_step_trains_cls_patch_and_koleo_and_checkpoints_both_centers():
    torch.manual_seed(0)
    assert method_class("ibot") is IBOTMethod
    method = IBOTMethod(tiny_cfg(koleo_weight=0.1, mask_ratio=[0.4], mask_ratio_var=[0.0],
                                 freeze_last_layer_epochs=0, warmup_teacher_temp_epochs=1))
    model = method.build_model()
    method.set_run_length(10, 5)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    loss, metrics = method.step(model, {"image": crops, "index": torch.arange(4)}, step=0)
    loss.backward()
    assert {"cls_loss", "patch_loss", "koleo"} <= set(metrics) and 0.3 < metrics["masked"] < 0.5
    assert model.mask_token.grad.abs().sum() > 0 and model.head.last_layer2.weight_v.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(metrics["cls_loss"] + metrics["patch_loss"] + 0.1 * metrics["koleo"], rel=1e-5)
    state = method.extra_state()
    assert state["patch_loss.center"].abs().sum() > 0 and "loss.center" in state
    other = IBOTMethod(method.cfg)
    other.build_model()
    other.load_extra_state(state)
    assert torch.equal(other.patch_loss.center, method.patch_loss.center)
    assert method.patch_temp(0) == pytest.approx(0.04) and method.patch_temp(10 ** 6) == pytest.approx(0.07)


@pytest.mark.parametrize("shared", [False, True])
def test_both_last_layers_form_the_frozen_group_and_get_no_optimizer_update_while_frozen(shared):
    """The CLS and patch last layers (one when shared) are DINO's ``last_layer`` group: while frozen,
    bit-identical with no AdamW state (no weight decay either), as official iBOT's frozen last layers."""
    from jobs._engine_config import build_optimizer
    from jobs.dino import LAST_LAYER

    torch.manual_seed(0)
    method = IBOTMethod(tiny_cfg(shared_head=shared, mask_ratio=[0.4], mask_ratio_var=[0.0], freeze_last_layer_epochs=1))
    model = method.build_model()
    method.set_run_length(10, 2)
    groups = method.param_groups(model, method.cfg.optim)
    last = [g for g in groups if g.get("name") == LAST_LAYER][0]["params"]
    expected = {id(p) for m in (model.head.last_layer, model.head.last_layer2) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in last} == expected and len(last) == (1 if shared else 2)
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters() if p.requires_grad})
    opt = build_optimizer(model, method.cfg.optim, set(), groups)
    start = [p.detach().clone() for p in last]
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    for step in range(3):
        for g in opt.param_groups:
            g["lr"], g["frozen"] = 1e-2, g.get("name") in method.frozen_groups(step)
        model.zero_grad()
        loss, _ = method.step(model, {"image": crops, "index": torch.arange(4)}, step)
        loss.backward()
        opt.step()
        if step < 2:
            assert all(torch.equal(p, p0) for p, p0 in zip(last, start)) and not any(p in opt.state for p in last)
    assert all(not torch.equal(p, p0) and p in opt.state for p, p0 in zip(last, start))


def test_use_bn_head_normalises_patch_tokens_over_every_token_and_trains():
    """``head: {use_bn: true}`` on iBOT: the patch MLP's BatchNorm takes its statistics over every token of
    every image, as the official head's BatchNorm over [N, D, L] does; a step trains through it."""
    torch.manual_seed(0)
    method = IBOTMethod(tiny_cfg(head={**TINY_HEAD, "use_bn": True}, mask_ratio=[0.4], mask_ratio_var=[0.0]))
    model = method.build_model()
    head = model.head.train()
    x = torch.randn(3, 5, 64) * 4 + 1
    z = x
    for m in head.mlp:  # the official layout: BatchNorm1d over [N, C, L]
        z = m(z.transpose(1, 2)).transpose(1, 2) if isinstance(m, torch.nn.BatchNorm1d) else m(z)
    ref = head.last_layer2(torch.nn.functional.normalize(z, dim=-1, eps=1e-6))
    assert torch.allclose(head.patches(x), ref, atol=1e-6)
    method.set_run_length(10, 5)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    loss, metrics = method.step(model, {"image": crops, "index": torch.arange(4)}, step=0)
    loss.backward()
    assert torch.isfinite(loss) and metrics["patch_loss"] > 0
    assert model.head.mlp[1].weight.grad.abs().sum() > 0  # the BatchNorm after the first hidden layer

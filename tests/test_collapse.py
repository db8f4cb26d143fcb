"""Collapse warnings of DINO / iBOT: the targets' entropies as metrics, one warning per collapse, rank 0 only."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from jobs._collapse import PATIENCE, UNIFORM, CollapseWatch
from jobs._dino_loss import DINOLoss, target_entropies
from jobs.dino import DINOMethod
from jobs.ibot import IBOTConfig, IBOTMethod
from test_dino import TINY_HEAD, TINY_MODEL, tiny_cfg

K = 64


def test_target_entropies_tell_uniform_one_prototype_and_healthy_targets_apart():
    uniform = torch.full((8, K), 1 / K)
    assert target_entropies(uniform).tolist() == pytest.approx([math.log(K)] * 2)
    same_peak = torch.zeros(8, K)
    same_peak[:, 3] = 1
    assert target_entropies(same_peak).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    own_peaks = torch.eye(K)[:8]  # each sample its own prototype: what DINO is after
    assert target_entropies(own_peaks).tolist() == pytest.approx([0.0, math.log(8)], abs=1e-6)
    assert target_entropies(torch.zeros(0, K)) is None


def test_the_watch_warns_once_per_collapse_after_patience_consecutive_steps():
    watch = CollapseWatch("dino", "CLS", K, patience=5)
    flat, peak, ok = (math.log(K),) * 2, (0.0, 0.0), (0.5, 3.0)
    said = [watch.observe(s, flat) for s in range(4)] + [watch.observe(4, ok)]  # interrupted: starts over
    said += [watch.observe(5 + s, flat) for s in range(4)] + [watch.observe(9, None)]  # no targets: no count
    assert said == [None] * 10
    message = watch.observe(10, flat)
    assert "stage dino: uniform collapse of the CLS loss at step 11" in message
    assert f"uniform over the {K} prototypes" in message and "views" in message and "training goes on" in message
    assert [watch.observe(11 + s, flat) for s in range(20)] == [None] * 20  # said once
    said = [watch.observe(40 + s, peak) for s in range(5)]
    assert said[:4] == [None] * 4 and "one-prototype collapse" in said[4] and "centering: sinkhorn" in said[4]


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_a_teacher_that_gives_every_sample_the_same_output_has_uniform_targets(centering):
    loss = DINOLoss(K, centering=centering)
    same = (torch.rand(1, K) * 2 - 1).repeat(6, 1)  # [2B, K] cosines (the head's logits): one for every sample
    loss.center.copy_(same[:1])  # EMA centering: the center has caught up with it
    loss(torch.randn(6, K), same, 0.04)
    assert loss.target_stats[0].item() == pytest.approx(math.log(K), rel=1e-5)
    loss(torch.randn(6, K), torch.rand(6, K) * 2 - 1, 0.04)
    assert loss.target_stats[0].item() < 0.9 * math.log(K)


def _one_image_batches(method, student, steps: int, caplog):
    """``steps`` of ``method.step`` on a batch of one image repeated (no optimizer: the models stay as
    they are): the teacher's output is the same for every sample, the center converges to it."""
    torch.manual_seed(0)
    image = [torch.randn(1, 3, 32, 32).repeat(4, 1, 1, 1)] * 2 + [torch.randn(1, 3, 16, 16).repeat(4, 1, 1, 1)] * 2
    rows = []
    with caplog.at_level(logging.WARNING, logger="jobs.dino"):
        for step in range(steps):
            with torch.no_grad():
                rows.append(method.step(student, {"image": image, "index": torch.arange(4)}, step)[1])
    return rows


@pytest.mark.parametrize("rank", [0, 1])
def test_dino_reports_target_entropies_and_rank_0_warns_of_a_uniform_collapse(rank, caplog):
    method = DINOMethod(tiny_cfg(), rank=rank)
    method.set_run_length(total_steps=200, steps_per_epoch=10)
    rows = _one_image_batches(method, method.build_model(), 40 + PATIENCE, caplog)
    assert rows[0]["target_entropy"] < 0.9 * math.log(K) <= UNIFORM * math.log(K) <= rows[-1]["target_entropy"]
    assert all(isinstance(r["target_batch_entropy"], float) for r in rows)
    warned = [r for r in caplog.records if "uniform collapse of the CLS loss" in r.getMessage()]
    assert len(warned) == (1 if rank == 0 else 0)


def test_ibot_watches_its_cls_and_its_patch_targets(caplog):
    cfg = IBOTConfig(name="ibot", data="/x", model=TINY_MODEL, head=TINY_HEAD, local_crops=2, patch_out_dim=32,
                     mask_ratio=[0.3], mask_ratio_var=[0.0])
    method = IBOTMethod(cfg)
    method.set_run_length(total_steps=200, steps_per_epoch=10)
    rows = _one_image_batches(method, method.build_model(), 40 + PATIENCE, caplog)
    last = rows[-1]
    assert last["target_entropy"] >= UNIFORM * math.log(K)
    assert 0 < last["patch_target_entropy"] <= math.log(32) + 1e-4 and "patch_target_batch_entropy" in last
    assert any("uniform collapse of the CLS loss" in r.getMessage() for r in caplog.records)

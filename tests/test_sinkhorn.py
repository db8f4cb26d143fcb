"""``centering: sinkhorn``: DINOv2's Sinkhorn-Knopp teacher normalisation for the DINO and iBOT losses."""

from __future__ import annotations

import torch

from jobs._dino_loss import DINOLoss, sinkhorn_knopp
from jobs._ibot_loss import PatchLoss
from jobs.config.ibot import IBOTConfig


def reference_sinkhorn(t: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """A hand-written, single-rank reference: alternate prototype / sample normalisation of exp(t / temp)."""
    q = torch.exp(t.double() / temp).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T.float()


def test_sinkhorn_matches_the_reference_rows_sum_to_one_and_prototypes_are_balanced():
    torch.manual_seed(0)
    t = torch.randn(64, 16)
    t[:, 0] += 3.0  # every sample leans to prototype 0: a softmax would pile the mass there
    q = sinkhorn_knopp(t, 0.1, iterations=3)
    assert torch.allclose(q, reference_sinkhorn(t, 0.1, 3), atol=1e-5)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    share = q.sum(dim=0) / 64  # each prototype's share of the batch
    softmax_share = torch.softmax(t / 0.1, dim=-1).sum(dim=0) / 64
    assert share[0] < 0.2 < softmax_share[0]
    balanced = sinkhorn_knopp(t, 0.1, iterations=50).sum(dim=0) / 64
    assert torch.allclose(balanced, torch.full((16,), 1 / 16), atol=1e-3)
    assert sinkhorn_knopp(torch.zeros(0, 16), 0.1).shape == (0, 16)  # no row: nothing, and no error


def test_sinkhorn_centering_in_the_dino_and_patch_losses_leaves_the_center_alone():
    torch.manual_seed(1)
    student, teacher = torch.randn(4 * 3, 8), torch.randn(2 * 3, 8)
    loss = DINOLoss(8, 0.1, 0.9, centering="sinkhorn")
    q = sinkhorn_knopp(teacher, 0.04, 3).chunk(2)
    logp = torch.log_softmax(student / 0.1, dim=-1).chunk(4)
    want = sum(torch.sum(-q[t] * logp[v], dim=-1).mean() for t in range(2) for v in range(4) if v != t) / 6
    assert torch.allclose(loss(student, teacher, 0.04), want, atol=1e-5)
    loss.update_center(teacher)
    assert torch.equal(loss.center, torch.zeros(1, 8))

    s_patch, t_patch = torch.randn(2 * 3, 5, 8), torch.randn(2 * 3, 5, 8)
    masks = torch.rand(2 * 3, 5) < 0.5
    masks[0] = False  # a sample with no masked patch contributes 0
    patch = PatchLoss(8, 0.1, 0.9, centering="sinkhorn")
    q = torch.zeros(2 * 3, 5, 8)
    q[masks] = sinkhorn_knopp(t_patch[masks], 0.07, 3)  # over the masked tokens of every view together
    per_token = torch.sum(-q * torch.log_softmax(s_patch / 0.1, dim=-1), dim=-1)
    per_sample = (per_token * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    want = torch.stack([c.mean() for c in per_sample.chunk(2)]).mean()
    assert torch.allclose(patch(s_patch, t_patch, masks, 0.07), want, atol=1e-5)
    patch.update_center(t_patch)
    assert torch.equal(patch.center, torch.zeros(1, 1, 8))


def test_centering_defaults_to_ema_and_leaves_earlier_digests_unchanged():
    base = {"name": "s", "kind": "ibot", "data": "/d"}
    cfg = IBOTConfig.model_validate(base)
    assert cfg.centering_kwargs() == {"centering": "ema", "sinkhorn_iterations": 3}
    assert "centering" not in cfg.model_dump(mode="json", exclude={k for k in cfg.digest_optional
                                                                    if getattr(cfg, k) is None})
    sk = IBOTConfig.model_validate({**base, "centering": "sinkhorn"})
    assert sk.digest() != cfg.digest()
    assert IBOTConfig.model_validate({**base, "centering": "ema"}).centering_kwargs()["centering"] == "ema"


def _two_rank_sinkhorn(rank: int, init: str, parts: dict[str, list[torch.Tensor]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        for case, rows in parts.items():
            torch.save(sinkhorn_knopp(rows[rank], 0.05, iterations=3), f"{out}/{case}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_on_two_ranks_equals_one_rank_on_their_rows_together_even_when_a_rank_has_none(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(2)
    t = torch.randn(24, 16) * 3
    want = sinkhorn_knopp(t, 0.05, iterations=3)
    parts = {"uneven": [t[:10], t[10:]], "empty": [t[:0], t]}  # rank 0 holds 10 rows, then none
    mp.spawn(_two_rank_sinkhorn, args=(f"file://{tmp_path}/pg", parts, str(tmp_path)), nprocs=2)
    for case in parts:
        got = torch.cat([torch.load(tmp_path / f"{case}.{r}") for r in range(2)])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), case

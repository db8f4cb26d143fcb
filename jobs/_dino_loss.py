"""DINO's self-distillation loss: cross-entropy between a centred, sharpened teacher and the student.

One loss, one module, its state a buffer (as dinov2's ``DINOLoss``): the teacher *center*, an EMA
of the teacher's batch-mean output, all-reduced over ranks so every rank holds the same center.

``centering="sinkhorn"`` replaces centring + softmax by DINOv2's Sinkhorn-Knopp normalisation of the
teacher (:func:`sinkhorn_knopp`, ``sinkhorn_knopp_teacher`` there): the teacher's batch assignment to the
K prototypes is made (close to) uniform over the prototypes at every step, so it cannot collapse to one
prototype; a teacher whose outputs are the same for every sample still gives uniform targets (this does
not prevent that collapse). The center is then left as it is (unused).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


CENTERINGS = ("ema", "sinkhorn")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """``t`` reduced in place over every rank (nothing in one process); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


STATS_ROWS = 4096  # targets the entropies are measured on, at most: a per-step diagnostic, not a loss


@torch.no_grad()
def target_entropies(q: torch.Tensor) -> torch.Tensor | None:
    """``[2]`` float32 of ``[N, K]`` target probabilities (the first :data:`STATS_ROWS`, a view): the mean
    entropy of one sample's target and the entropy of the batch's mean target, in nats. ``ln K`` and ``ln K``: every sample's target is uniform
    (the teacher tells the samples nothing, the collapse DINO's sharpening prevents); ``~0`` and ``~0``:
    every sample points at the same prototype (the collapse centering prevents). None for no samples."""
    q = q[:STATS_ROWS].float()
    if q.shape[0] == 0:
        return None
    per_sample = -(q * q.clamp(min=1e-30).log()).sum(dim=-1).mean()
    mean = q.mean(dim=0)
    return torch.stack([per_sample, -(mean * mean.clamp(min=1e-30).log()).sum()])


def check_centering(centering: str) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """[N, K] teacher logits -> [N, K] probabilities (rows sum to 1) whose column sums over the batch of
    every rank are pushed towards equal (N_total / K each) by ``iterations`` Sinkhorn-Knopp rounds.

    Starts from ``exp(logits / temp)``; each round scales the K prototype rows to mass ``1 / K`` (sums
    all-reduced over ranks) and then each sample's column to mass ``1 / N_total``; a sample's column is
    finally rescaled to sum 1. Computed in float32 with the global max subtracted (exact after the
    normalisation, and exp never overflows)."""
    x = logits.float() / temp
    peak = all_reduce(x.max() if x.numel() else x.new_tensor(float("-inf")),  # a rank may hold no rows
                      op=dist.ReduceOp.MAX)
    q = torch.exp(x - peak).t()  # [K, N]
    k = q.shape[0]
    n = all_reduce(torch.tensor([float(q.shape[1])], device=q.device))
    q /= all_reduce(q.sum().reshape(1)).clamp(min=1e-30)
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True)).clamp(min=1e-30)  # each prototype: total mass 1 / K
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp(min=1e-30)  # each sample: mass 1 / N (its own column: local)
        q /= n
    q *= n
    return q.t()


class DINOLoss(nn.Module):
    """``forward(student_out, teacher_out, teacher_temp)`` -> scalar loss; ``update_center(teacher_out)``.

    ``student_out``: ``[V * B, K]`` logits of every view (the 2 global views first), view-major.
    ``teacher_out``: ``[2 * B, K]`` logits of the global views. Each teacher view supervises every
    student view except itself; the loss is the mean over those pairs.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema", sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        check_centering(centering)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.target_stats: torch.Tensor | None = None  # target_entropies() of the last forward's teacher

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centring then sharpening: ``softmax((t - center) / temp)``, [2B, K] (or Sinkhorn-Knopp)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        views = student_out.shape[0] // (teacher_out.shape[0] // 2)
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(views)  # V x [B, K]
        teacher_p = self.teacher_probs(teacher_out, teacher_temp).detach()  # [2B, K]
        self.target_stats = target_entropies(teacher_p)
        teacher_p = teacher_p.chunk(2)  # 2 x [B, K]
        total, pairs = student_out.new_zeros((), dtype=torch.float32), 0
        for t, q in enumerate(teacher_p):
            for v, logp in enumerate(student_logp):
                if v == t:  # never the same view on both sides
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean over all ranks' teacher outputs. Every rank must call it.
        With Sinkhorn-Knopp centering the center is unused and stays as it is."""
        if self.centering == "sinkhorn":
            return
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)  # [1, K]
        all_reduce(batch_sum)
        count = all_reduce(torch.tensor([float(teacher_out.shape[0])], device=batch_sum.device))
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)

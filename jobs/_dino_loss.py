"""DINO's self-distillation loss: cross-entropy between a centred, sharpened teacher and the student.

One loss, one module, its state a buffer (as dinov2's ``DINOLoss``): the teacher *center*, an EMA
of the teacher's batch-mean output, all-reduced over ranks so every rank holds the same center.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    """``forward(student_out, teacher_out, teacher_temp)`` -> scalar loss; ``update_center(teacher_out)``.

    ``student_out``: ``[V * B, K]`` logits of every view (the 2 global views first), view-major.
    ``teacher_out``: ``[2 * B, K]`` logits of the global views. Each teacher view supervises every
    student view except itself; the loss is the mean over those pairs.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centring then sharpening: ``softmax((t - center) / temp)``, [2B, K]."""
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        views = student_out.shape[0] // (teacher_out.shape[0] // 2)
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(views)  # V x [B, K]
        teacher_p = self.teacher_probs(teacher_out, teacher_temp).detach().chunk(2)  # 2 x [B, K]
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
        """center <- m * center + (1 - m) * mean over all ranks' teacher outputs. Every rank must call it."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)  # [1, K]
        count = torch.tensor([float(teacher_out.shape[0])], device=batch_sum.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)

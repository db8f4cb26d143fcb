"""iBOT's masked patch-token loss and DINOv2's KoLeo regulariser (one loss per module, state as buffers).

:class:`PatchLoss` is the patch half of the official ``iBOTLoss`` (bytedance/ibot ``main_ibot.py``):
for each global view, the cross-entropy between the centred, sharpened teacher patch distribution
(the *unmasked* view) and the student's (the *masked* view), per token; averaged over the masked
tokens of each sample (a sample with none contributes 0), then over the batch, then over the views.
Its center (``center2`` there) is an EMA of the teacher's mean patch output, all-reduced over ranks.
With ``centering="sinkhorn"`` (DINOv2) the teacher's patch distributions of the *masked* tokens are
instead Sinkhorn-Knopp normalised together (:func:`jobs._dino_loss.sinkhorn_knopp`), and the center is unused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jobs._dino_loss import STATS_ROWS, all_reduce, check_centering, sinkhorn_knopp, target_entropies


class PatchLoss(nn.Module):
    """``forward(student_patch, teacher_patch, masks, teacher_temp)``; ``update_center(teacher_patch)``.

    ``student_patch`` / ``teacher_patch``: ``[G * B, L, K]`` logits of the G global views (view-major),
    ``masks``: ``[G * B, L]`` bool (True: the student saw the mask token there).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema", sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        check_centering(centering)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, 1, out_dim))
        self.target_stats: torch.Tensor | None = None  # target_entropies() of the last forward's masked tokens

    def teacher_probs(self, teacher_patch: torch.Tensor, masks: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """[GB, L, K]: the centred, sharpened teacher; with Sinkhorn-Knopp, the masked tokens' (others 0)."""
        if self.centering == "sinkhorn":
            q = torch.zeros_like(teacher_patch, dtype=torch.float32)
            q[masks] = sinkhorn_knopp(teacher_patch[masks], teacher_temp, self.sinkhorn_iterations)
            return q
        return F.softmax((teacher_patch.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float, views: int = 2) -> torch.Tensor:
        q = self.teacher_probs(teacher_patch, masks, teacher_temp).detach()  # [GB, L, K]
        rows = masks.flatten().nonzero().squeeze(1)[:STATS_ROWS]  # masked tokens only, without copying them all
        self.target_stats = target_entropies(q.flatten(0, 1)[rows])
        logp = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)  # [GB, L, K]
        per_token = torch.sum(-q * logp, dim=-1)  # [GB, L]
        m = masks.float()
        per_sample = (per_token * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # [GB]
        return torch.stack([c.mean() for c in per_sample.chunk(views)]).mean()

    @torch.no_grad()
    def update_center(self, teacher_patch: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean over all ranks' samples of each one's mean patch output
        (with Sinkhorn-Knopp centering: unused, left as it is)."""
        if self.centering == "sinkhorn":
            return
        batch_sum = teacher_patch.float().mean(dim=1).sum(dim=0, keepdim=True)  # [1, K]
        all_reduce(batch_sum)
        count = all_reduce(torch.tensor([float(teacher_patch.shape[0])], device=batch_sum.device))
        self.center.mul_(self.center_momentum).add_((batch_sum / count).unsqueeze(0), alpha=1 - self.center_momentum)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018; dinov2 ``KoLeoLoss``): on
    L2-normalised ``[B, D]`` features, ``-mean(log(distance to the nearest other sample + eps))``."""
    x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.T  # [B, B]
        dots.fill_diagonal_(-1.0)  # never oneself
        nearest = dots.argmax(dim=1)  # [B]
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # [B]
    return -torch.log(distances + eps).mean()

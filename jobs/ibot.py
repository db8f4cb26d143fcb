"""iBOT (Zhou et al., 2022): DINO's CLS self-distillation plus masked patch-token self-distillation.

Only what iBOT adds to DINO (``jobs/dino.py``, whose head, CLS loss, EMA teacher, schedules and
checkpointed state it reuses):

- **Block-wise masking** of the student's global crops (BEiT's / official iBOT's generator,
  :func:`block_mask`): rectangles of random area and aspect ratio ``mask_aspect`` until a share of
  the patch grid drawn per image (one of ``mask_ratio`` +- its ``mask_ratio_var``; the official
  ViT-S recipe ``[0, 0.3] +- [0, 0.2]`` masks half of the images 10-50 % and leaves the others whole)
  is covered. The masks of sample ``i`` at step ``s`` come from a generator seeded by (seed, s, i), as
  MAE's noise does: a resumed run, any number of workers and any micro-batching draw the same masks.
- **The masked student**: a learned mask token replaces the patch embedding of every masked patch
  before the position embedding and the blocks (official ``mask_model``), written on top of timm's
  ``VisionTransformer`` (:func:`forward_features_masked`); the exported encoder is the plain timm ViT.
- **The patch loss** (``jobs/_ibot_loss.py``): the EMA teacher sees the unmasked global crops; on
  each global view the student's masked patch tokens learn the teacher's centred, sharpened patch
  distribution (its own center, own temperature ``teacher_patch_temp`` after a warm-up from
  ``warmup_teacher_patch_temp`` over DINO's ``warmup_teacher_temp_epochs``). The patch head is the
  CLS head's MLP with its own last layer (``patch_out_dim`` prototypes), or the same last layer
  (``shared_head``). ``loss = cls_weight * L_cls + patch_weight * L_patch + koleo_weight * L_koleo``.
- **KoLeo** (DINOv2): ``koleo_weight > 0`` adds the Kozachenko-Leonenko regulariser on the student's
  backbone CLS features of each global crop (DINOv2 uses 0.1), spreading them over the sphere.

With ``koleo_weight > 0`` and multi-crop this is the DINOv2 training objective; see the README for
which parts of DINOv2 are included. Teacher, CLS center and patch center are checkpointed.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from jobs._collapse import CollapseWatch
from jobs._ibot_loss import PatchLoss, koleo_loss
from jobs.config.ibot import IBOTConfig
from jobs.dino import DINOHead, DINOHeadConfig, DINOMethod, _same_size_runs, build_dino


# ---- masking ----------------------------------------------------------------------------------------


def block_mask(grid: int, ratio: float, aspect: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """[grid, grid] bool: rectangles added until ``ratio * grid**2`` patches are masked (BEiT's generator)."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    high = ratio * grid * grid
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < high:
        delta = _add_block(mask, high - count, log_aspect, rng)
        if delta == 0:
            break
        count += delta
    return mask


def _add_block(mask: torch.Tensor, budget: float, log_aspect: tuple[float, float], rng: random.Random) -> int:
    """Mask one rectangle of at most ``budget`` new patches (10 tries); how many became masked."""
    grid = mask.shape[0]
    for _ in range(10):
        low = (grid // 3) ** 2
        area = rng.uniform(low, budget)
        ratio = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if w < grid and h < grid:
            top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                return new
    return 0


def sample_masks(cfg: IBOTConfig, indices: torch.Tensor, grid: int, step: int, views: int = 2) -> torch.Tensor:
    """[views * N, grid * grid] bool, view-major; sample ``indices[n]``'s masks are a pure function of
    (seed, step, indices[n])."""
    choices = cfg.ratio_choices()
    out = torch.zeros(views, len(indices), grid * grid, dtype=torch.bool)
    for n, i in enumerate(indices.tolist()):
        rng = random.Random(f"ibot-mask:{cfg.seed}:{step}:{int(i)}")
        for v in range(views):
            mean, var = rng.choice(choices)
            ratio = rng.uniform(mean - var, mean + var) if var > 0 else mean
            out[v, n] = block_mask(grid, ratio, cfg.mask_aspect, rng).flatten()
    return out.flatten(0, 1)


# ---- model --------------------------------------------------------------------------------------------


def forward_features_masked(vit: VisionTransformer, x: torch.Tensor, mask: torch.Tensor | None,
                            mask_token: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_features`` with ``mask_token`` in place of the masked patch embeddings.

    x: [N, C, H, W], mask: [N, L] bool (None: no masking) -> [N, P + L, D] (P prefix tokens)."""
    tokens = vit.patch_embed(x)  # [N, L, D], or [N, h, w, D] with dynamic_img_size
    if mask is not None:
        m = mask.view(*tokens.shape[:-1], 1)
        tokens = torch.where(m, mask_token.to(tokens.dtype).view(*([1] * (tokens.ndim - 1)), -1), tokens)
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
    if vit.grad_checkpointing and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        tokens = checkpoint_seq(vit.blocks, tokens)
    else:
        tokens = vit.blocks(tokens)
    return vit.norm(tokens)


class IBOTHead(DINOHead):
    """DINO's head over every token: the shared MLP and L2 bottleneck, then the CLS last layer for
    ``[N, D]`` CLS features and ``last_layer2`` (own, or the same one when ``shared``) for patches."""

    def __init__(self, in_dim: int, cfg: DINOHeadConfig, patch_out_dim: int, shared: bool) -> None:
        super().__init__(in_dim, cfg)
        if shared:
            self.last_layer2 = self.last_layer
        else:  # a last layer exactly as DINO's head builds its own, with patch_out_dim prototypes
            self.last_layer2 = DINOHead(in_dim, cfg.model_copy(update={"out_dim": patch_out_dim})).last_layer

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N, L, K_patch]. The MLP sees the tokens as one [N * L, D] batch, so a ``use_bn``
        head normalises over every token of every image, as the official iBOT head's BatchNorm does (which
        also puts the CLS tokens in that batch; here they get their own statistics in ``forward``)."""
        n, length, d = x.shape
        z = self.mlp(x.reshape(n * length, d)).reshape(n, length, -1)
        return self.last_layer2(F.normalize(z, dim=-1, eps=1e-6))


class IBOTModel(nn.Module):
    """Backbone + iBOT head + mask token. ``forward(crops, masks)`` ->
    (CLS logits [V * B, K], global patch logits [G * B, L, K_patch], global backbone CLS [G * B, D])."""

    def __init__(self, backbone: VisionTransformer, head: IBOTHead, globals_: int = 2) -> None:
        super().__init__()
        self.backbone, self.head, self.globals = backbone, head, globals_
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))  # official: zeros

    def forward(self, crops: list[torch.Tensor], masks: torch.Tensor | None = None):
        prefix = self.backbone.num_prefix_tokens
        g = torch.cat(crops[:self.globals])  # [G * B, C, S, S]
        tokens = forward_features_masked(self.backbone, g, masks, self.mask_token)  # [GB, P + L, D]
        cls = [tokens[:, 0]]
        for group in _same_size_runs(crops[self.globals:]):
            cls.append(self.backbone(torch.cat(group)))  # local crops: unmasked, CLS only
        cls_feats = torch.cat(cls)  # [V * B, D]
        return self.head(cls_feats), self.head.patches(tokens[:, prefix:]), tokens[:, 0]


def build_ibot(cfg: IBOTConfig) -> IBOTModel:
    dino = build_dino(cfg)  # the backbone exactly as DINO builds it (dynamic size, checkpointing)
    head = IBOTHead(dino.backbone.embed_dim, cfg.head, cfg.patch_out_dim, cfg.shared_head)
    return IBOTModel(dino.backbone, head)


# ---- the method ----------------------------------------------------------------------------------------


class IBOTMethod(DINOMethod):
    """iBOT for :func:`jobs.engine.train`: DINO's hooks (EMA teacher, schedules, extra state) plus the
    masked student, the patch loss and its center."""

    Config = IBOTConfig
    cfg: IBOTConfig

    def __init__(self, cfg: IBOTConfig, rank: int = 0) -> None:
        super().__init__(cfg, rank)
        patch_dim = cfg.head.out_dim if cfg.shared_head else cfg.patch_out_dim  # shared: the CLS prototypes
        self.patch_loss = PatchLoss(patch_dim, cfg.student_temp, cfg.patch_center_momentum, **cfg.centering_kwargs())
        self.patch_collapse = CollapseWatch(cfg.name, "patch", patch_dim)

    def build_model(self) -> IBOTModel:
        student = build_ibot(self.cfg)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.grid = student.backbone.patch_embed.grid_size[0]
        for p in self.last_layer_params(student):  # frozen in the first epoch(s): kept out of every norm
            p.register_hook(self._last_layer_grad)
        return student

    def last_layer_params(self, model: nn.Module) -> list[nn.Parameter]:
        """Both last layers (CLS and patch; one when shared): official iBOT freezes every "last_layer"; they
        form DINO's ``last_layer`` optimizer group, which gets no update at all while frozen."""
        layers = {id(m): m for m in (model.head.last_layer, model.head.last_layer2)}
        return [p for m in layers.values() for p in m.parameters()]

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        sched, c = self._sched(), self.cfg
        crops = batch["image"]  # V x [B, C, S, S]
        self._freeze = sched.last_layer_frozen(step)
        teacher = self._teacher_on(crops[0].device)
        masks = sample_masks(c, batch["index"], self.grid, step).to(crops[0].device)  # [2B, L]
        temp, patch_temp = sched.teacher_temp(step), self.patch_temp(step)
        with torch.no_grad(), self._autocast(crops[0]):
            t_cls, t_patch, _ = teacher(crops[:2])  # [2B, K], [2B, L, Kp]: unmasked global crops
        s_cls, s_patch, s_feat = model(crops, masks)
        cls_loss = self.loss(s_cls, t_cls, temp)
        patch_loss = self.patch_loss(s_patch, t_patch, masks, patch_temp)
        loss = c.cls_weight * cls_loss + c.patch_weight * patch_loss
        metrics = {"cls_loss": cls_loss.detach().item(), "patch_loss": patch_loss.detach().item(), "teacher_temp": temp,
                   "teacher_patch_temp": patch_temp, "masked": float(masks.float().mean()),
                   "teacher_momentum": sched.momentum(step), "weight_decay": sched.weight_decay(step),
                   **self._watch(self.collapse, self.loss.target_stats, step),
                   **self._watch(self.patch_collapse, self.patch_loss.target_stats, step, "patch_")}
        if c.koleo_weight > 0:
            koleo = sum(koleo_loss(f) for f in s_feat.chunk(2))  # per global crop, as DINOv2
            loss = loss + c.koleo_weight * koleo
            metrics["koleo"] = koleo.detach().item()
        self.loss.update_center(t_cls)
        self.patch_loss.update_center(t_patch)
        return loss, metrics

    def patch_temp(self, step: int) -> float:
        """The teacher's patch temperature: linear warm-up over DINO's teacher-temperature epochs."""
        warmup = int(self.cfg.warmup_teacher_temp_epochs * self._sched().per_epoch)
        if step >= warmup:
            return self.cfg.teacher_patch_temp
        a, b = self.cfg.warmup_teacher_patch_temp, self.cfg.teacher_patch_temp
        return a + (b - a) * step / warmup

    def extra_state(self) -> dict[str, torch.Tensor]:
        """DINO's (teacher, CLS center) and the patch center."""
        state = super().extra_state()
        state["patch_loss.center"] = self.patch_loss.center.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.patch_loss.center.copy_(state["patch_loss.center"])

    def arch(self) -> dict[str, Any]:
        return {**super().arch(), "patch_out_dim": self.cfg.patch_out_dim, "shared_head": self.cfg.shared_head}

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"mask_token"}  # as official iBOT: the mask token is not decayed

    def _teacher_on(self, device: torch.device) -> IBOTModel:
        if self.patch_loss.center.device != device:
            self.patch_loss.to(device)
        return super()._teacher_on(device)

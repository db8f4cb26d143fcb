"""DINO (Caron et al., 2021): self-distillation with no labels — only what is special to DINO.

The student is a timm ``VisionTransformer`` (its CLS token) plus the DINO head; DeepSpeed wraps
the student only. The teacher is an EMA copy of the student that DeepSpeed never sees
(``jobs/_teacher.py``: the copy, :func:`ema_update` over the full ZeRO-3 weights, the momentum
schedule and the teacher's checkpoint state, shared with other self-distillation methods). The
teacher sees the two global crops, the student every crop (2 global + ``local_crops`` local,
``dataprep.transforms.dino_transform``). The loss (``jobs/_dino_loss.py``) centres and sharpens
the teacher; its center is a buffer all-reduced over ranks.

Every schedule is a pure function of the global step (:class:`DINOSchedule`): teacher momentum
(cosine 0.996 -> 1), teacher temperature (0.04; optionally a linear warmup), weight decay (cosine
0.04 -> 0.4, through the engine's ``weight_decay_at`` hook) and the last-layer freeze (first
epoch: the last layer's AdamW group gets no update at all, as main_dino.py's ``grad = None``).
Each parameter's gradient is clipped on its own (``clip_grad_mode: per_param``). The teacher and
the center are checkpointed through the engine's ``extra_state`` hook, so a resumed run continues
bit-exactly. Defaults follow main_dino.py; each field's description names its source.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from dataprep.transforms import dino_transform
from jobs._collapse import CollapseWatch
from jobs._dino_loss import DINOLoss
from jobs._teacher import cosine, ema_copy, ema_update, load_teacher_state, momentum_at, teacher_state
from jobs.config.dino import DROP_PATH, DINOConfig, DINOHeadConfig, _dino_model, _dino_optim  # noqa: F401
from jobs.engine import OptimConfig
from jobs.init import read_stage_init, start_encoder
from jobs.method import Method
from jobs._channels import data_channels
from jobs.models import (build_encoder, encoder_flops_per_token, fit_data_channels, patch_embed_flops,
                         set_grad_checkpointing, token_count)


log = logging.getLogger(__name__)
LAST_LAYER = "last_layer"  # the head's last layer's AdamW group

# ---- model --------------------------------------------------------------------------------------


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)^T`` with ``g`` fixed to 1 when ``norm_fixed`` (no bias).

    Written out instead of ``torch.nn.utils.weight_norm`` so its parameters are the module's own:
    ZeRO-3 gathers exactly those around ``forward``. Initialised as DINO's head: ``v`` is a default
    ``nn.Linear`` weight (kaiming-uniform, ``a = sqrt(5)``: rows of norm ~0.57), ``g`` is 1.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_fixed: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = None if norm_fixed else nn.Parameter(torch.ones(out_dim, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters (no bias)

    def weight(self) -> torch.Tensor:
        w = F.normalize(self.weight_v, dim=1)  # [K, bottleneck], unit rows
        return w if self.weight_g is None else w * self.weight_g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """[N, D] -> MLP (GELU) -> [N, bottleneck] -> L2 normalise -> weight-normalised linear -> [N, K]."""

    def __init__(self, in_dim: int, cfg: DINOHeadConfig) -> None:
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.extend([nn.BatchNorm1d(b)] if cfg.use_bn else [])
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, norm_fixed=cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # [N, bottleneck], unit norm
        return self.last_layer(x)  # [N, K]


class DINOModel(nn.Module):
    """Backbone (CLS token) + head over a list of crops: crops of one size run as one batch."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = [self.backbone(torch.cat(group)) for group in _same_size_runs(crops)]  # [n_i * B, D]
        return self.head(torch.cat(feats))  # [V * B, K], view-major


def _same_size_runs(crops: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            yield crops[start:i]
            start = i


def build_dino(cfg: DINOConfig) -> DINOModel:
    backbone = build_encoder(cfg.model, dynamic_img_size=True)  # local crops are smaller than global ones
    if cfg.activation_checkpointing:
        set_grad_checkpointing(backbone)
    return DINOModel(backbone, DINOHead(backbone.embed_dim, cfg.head))


# ---- schedules (pure functions of the global step) ---------------------------------------------------


@dataclass(frozen=True)
class DINOSchedule:
    """DINO's per-step schedules for a run of ``total`` steps of ``per_epoch`` steps each."""

    cfg: DINOConfig
    total: int
    per_epoch: int

    def momentum(self, step: int) -> float:
        return momentum_at(step, self.total, self.cfg.teacher_momentum)

    def teacher_temp(self, step: int) -> float:
        warmup = int(self.cfg.warmup_teacher_temp_epochs * self.per_epoch)
        if step >= warmup:
            return self.cfg.teacher_temp
        return self.cfg.warmup_teacher_temp + (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp) * step / warmup

    def weight_decay(self, step: int) -> float:
        return cosine(step, self.total, self.cfg.optim.weight_decay, self.cfg.weight_decay_end)

    def last_layer_frozen(self, step: int) -> bool:
        return step < int(self.cfg.freeze_last_layer_epochs * self.per_epoch)


# ---- the method ------------------------------------------------------------------------------------


class DINOMethod(Method):
    """The DINO method for :func:`jobs.engine.train` (uses its ``set_run_length``, ``weight_decay_at``,
    ``after_step`` and ``extra_state`` / ``load_extra_state`` hooks)."""

    Config = DINOConfig
    pool = "token"  # DINO trains the CLS token; main_dino.py's kNN / linear evaluation reads it
    cfg: DINOConfig

    def __init__(self, cfg: DINOConfig, rank: int = 0) -> None:
        super().__init__(cfg, rank)
        self.loss = DINOLoss(cfg.head.out_dim, cfg.student_temp, cfg.center_momentum, **cfg.centering_kwargs())
        self.collapse = CollapseWatch(cfg.name, "CLS", cfg.head.out_dim)
        self.teacher: DINOModel | None = None
        self.schedule: DINOSchedule | None = None
        self._freeze = False

    # ---- engine hooks ----------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        """``in_chans`` from the data (its manifest's channels); the init, if any."""
        self.data_channels = data_channels(ctx.data_url, ctx.storage_options)
        model = fit_data_channels(self.cfg.model, self.data_channels, f"stage {self.cfg.name!r}",
                                  f"the data at {ctx.data_url}")
        self.cfg = self.cfg.model_copy(update={"model": model})
        self.init_source = read_stage_init(self.cfg, ctx)

    def build_model(self) -> DINOModel:
        """The student (for DeepSpeed), and the teacher as its copy (kept here, never wrapped)."""
        student = build_dino(self.cfg)
        start_encoder(student.backbone, self.init_source, self.cfg.peft)  # the teacher copies it below
        self.teacher = ema_copy(student)
        if self.cfg.head.use_bn:
            self.teacher.head.train()  # as main_dino.py's teacher: batch statistics in the head's BatchNorm
        for p in self.last_layer_params(student):  # frozen in the first epoch(s): kept out of every norm
            p.register_hook(self._last_layer_grad)
        return student

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
        """The engine's decayed / not groups, plus the head's last layer as its own group ``last_layer``
        (decayed), which :meth:`frozen_groups` keeps out of the optimizer while it is frozen."""
        own = {id(p): p for p in self.last_layer_params(model)}  # a shared layer counted once
        groups = super().param_groups(model, optim)
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in own]
        frozen = [p for p in own.values() if p.requires_grad]
        return [g for g in groups if g["params"]] + [{"name": LAST_LAYER, "params": frozen,
                                                      "weight_decay": optim.weight_decay}]

    def last_layer_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the last-layer freeze covers: the head's last layer (main_dino.py's "last_layer")."""
        return list(model.head.last_layer.parameters())

    def frozen_groups(self, step: int) -> set[str]:
        """The last layer while frozen: no update at all (main_dino.py sets its gradients to None)."""
        return {LAST_LAYER} if self._sched().last_layer_frozen(step) else set()

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        self.schedule = DINOSchedule(self.cfg, total_steps, steps_per_epoch)

    def train_transform(self) -> Callable:
        c = self.cfg
        views = c.views.model_dump() if c.views is not None else {}  # DINOTransform takes the same names
        return dino_transform(self._img_size(), local_crops=c.local_crops, local_size=c.local_size,
                              global_scale=c.global_scale, local_scale=c.local_scale, **views)

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        sched = self._sched()
        crops = batch["image"]  # V x [B, C, S, S], on the student's device and dtype
        self._freeze = sched.last_layer_frozen(step)
        teacher = self._teacher_on(crops[0].device)
        temp = sched.teacher_temp(step)
        with torch.no_grad(), self._autocast(crops[0]):
            teacher_out = teacher(crops[:2])  # [2B, K], global crops only
        student_out = model(crops)  # [V*B, K]
        loss = self.loss(student_out, teacher_out, temp)
        self.loss.update_center(teacher_out)
        return loss, {"teacher_temp": temp, "teacher_momentum": sched.momentum(step),
                      "weight_decay": sched.weight_decay(step),
                      **self._watch(self.collapse, self.loss.target_stats, step)}

    def _watch(self, watch: CollapseWatch, stats: torch.Tensor | None, step: int,
               prefix: str = "") -> dict[str, float]:
        """The step's target entropies as metrics (``target_entropy``, ``target_batch_entropy``, nats) and,
        on rank 0, the collapse warning once it is due (:mod:`jobs._collapse`)."""
        if stats is None:
            return {}
        entropy, batch_entropy = stats.tolist()  # one device sync for both
        message = watch.observe(step, (entropy, batch_entropy))
        if message is not None and self.rank == 0:
            log.warning("%s", message)
        return {f"{prefix}target_entropy": entropy, f"{prefix}target_batch_entropy": batch_entropy}

    def after_step(self, model: nn.Module, step: int) -> None:
        """EMA of the student into the teacher, with this step's momentum (every rank; ZeRO-3 gathers)."""
        ema_update(self._teacher_on(next(model.parameters()).device), model, self._sched().momentum(step))

    def weight_decay_at(self, step: int) -> float:
        return self._sched().weight_decay(step)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The teacher and the center: what a resumed run needs besides the engine's own state."""
        state = teacher_state(self.teacher)
        state["loss.center"] = self.loss.center.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        load_teacher_state(self.teacher, state)
        self.loss.center.copy_(state["loss.center"])

    def arch(self) -> dict[str, Any]:
        return {"encoder": self.cfg.model.arch_record(), "head": self.cfg.head.model_dump()}

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return set()  # as DINO: only biases and norms (1-D) are not decayed

    def encoder(self, model: nn.Module) -> VisionTransformer:
        if self.cfg.export_from == "teacher":
            return self.teacher.backbone
        return model.backbone

    def flops_per_sample(self) -> float:
        """Student fwd + bwd on every crop, teacher fwd on the global crops (matmuls, 2 per MAC)."""
        if not hasattr(self, "_flops"):
            with torch.device("meta"):
                enc = build_encoder(self.cfg.model)
            size = self._img_size()
            local = self.cfg.local_size or max(8, round(size * 96 / 224 / 8) * 8)

            def crop(s: int) -> float:  # the patch embedding reads all C channels; a ChannelViT has C x L tokens
                tokens = token_count(enc, s) + enc.num_prefix_tokens
                attn = 4.0 * len(enc.blocks) * tokens * tokens * enc.embed_dim
                return encoder_flops_per_token(enc) * tokens + attn + patch_embed_flops(enc, s)

            h = self.cfg.head
            dims = [enc.embed_dim] + [h.hidden_dim] * (h.layers - 1) + [h.bottleneck_dim, h.out_dim]
            head = 2.0 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
            student = 2 * (crop(size) + head) + self.cfg.local_crops * (crop(local) + head)
            self._flops = 3.0 * student + 2 * (crop(size) + head)
        return self._flops

    # ---- helpers -----------------------------------------------------------------------------------
    def _sched(self) -> DINOSchedule:
        if self.schedule is None:
            raise RuntimeError("DINOMethod.set_run_length(total_steps, steps_per_epoch) was not called")
        return self.schedule

    def _teacher_on(self, device: torch.device) -> DINOModel:
        if self.loss.center.device != device:
            self.loss.to(device)
            self.teacher.to(device)
        return self.teacher

    def _last_layer_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self._freeze else grad

    @staticmethod
    def _autocast(like: torch.Tensor):
        if like.dtype == torch.bfloat16 and like.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)  # the fp32 teacher at the student's precision
        return nullcontext()

    def _img_size(self) -> int:
        if self.cfg.model.img_size:
            return self.cfg.model.img_size
        with torch.device("meta"):
            return int(build_encoder(self.cfg.model).patch_embed.img_size[0])

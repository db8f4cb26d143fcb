"""Knowledge distillation (``kind: distill``): a frozen teacher into any timm student, ViT or CNN.

The teacher is an earlier stage's export (``teacher: pretrain``), an export URL, or any timm
model with a local ``.safetensors`` file (``teacher: {arch: resnet50, weights: ./r50.safetensors,
num_classes: 1000}``). It is frozen, in eval mode, run under ``no_grad``, held by the method and
*not* handed to DeepSpeed (so ZeRO never partitions or checkpoints it), in bf16 on GPU.

Losses (weights configurable; ``None`` picks by the teacher):

* a classifier teacher (``num_classes > 0``): KL divergence between temperature-softened
  distributions, scaled by ``T**2`` (Hinton et al. 2015); the student gets the same head size.
* a self-supervised teacher (no classifier, e.g. MAE/DINO): feature distillation on the
  teacher's CLS and patch tokens, through a learned projector from the student's width to the
  teacher's, by cosine distance or smooth-L1. A ViT student's patch grid is interpolated to the
  teacher's; a CNN student's feature map is resized to the teacher's grid (its pooled features
  stand in for the CLS token).

``targets: cached`` (with ``cache: STAGE``, a ``teacher_outputs`` stage or its cache URL) runs no
teacher: the KL target of each (epoch, sample) is rebuilt from the cache's top-k log-probabilities
(``jobs/_cache_reader.py``: the remaining mass spread uniformly over the other classes), and the
cached pooled feature (if stored) is the CLS target. The loader replays the exact crop the teacher
saw (augmentation, and mixup/cutmix when on, are seeded by (seed, epoch, sample id) on any number
of workers). A cache made for
another recipe (img_size, crop_scale, seed), data, temperature or teacher is refused, naming what
differs: at spec time when both stages are in one spec, else when the stage starts.

The student's export is a plain timm model (the projector is not exported).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataprep.mixing import Mix
from dataprep.transforms import mae_transform
from jobs.config.distill import DistillConfig, DistillLoss, TeacherWeights  # noqa: F401  (re-exported)
from jobs.engine import StageContext, use_bf16
from jobs.export import export_timm_model
from jobs.init import read_stage_init, start_encoder
from jobs._cached_targets import cached_loss_weights, cached_step, setup_cached
from jobs._distill_parts import feature_distance, load_teacher, teacher_forward  # noqa: F401  (re-exported)
from jobs.method import Method
from jobs._channels import channel_names, data_channels, export_channels
from jobs.channelvit import ChannelVisionTransformer
from jobs.models import (build_timm_model, fit_data_channels, forward_flops, model_in_chans, split_features,
                         timm_model_kwargs)

log = logging.getLogger(__name__)




class FeatureProjector(nn.Module):
    """Student width -> teacher width for the global feature and for every grid cell."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.cls = nn.Linear(student_dim, teacher_dim)
        self.patch = nn.Linear(student_dim, teacher_dim)

    def forward(self, global_feat: torch.Tensor, spatial: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, Ds], [N, Ds, h, w] -> [N, Dt], [N, H*W, Dt] on the teacher's grid (H, W)."""
        if tuple(spatial.shape[-2:]) != tuple(grid):
            spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
        cells = spatial.flatten(2).transpose(1, 2)  # [N, H*W, Ds]
        return self.cls(global_feat), self.patch(cells)


class DistillStudent(nn.Module):
    """What DeepSpeed trains: the timm student, plus the projector for feature distillation."""

    def __init__(self, student: nn.Module, projector: FeatureProjector | None) -> None:
        super().__init__()
        self.student, self.projector = student, projector

    def forward(self, imgs: torch.Tensor, grid: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        feats = self.student.forward_features(imgs)
        out: dict[str, torch.Tensor] = {}
        if getattr(self.student, "num_classes", 0):
            out["logits"] = self.student.forward_head(feats)  # [N, C]
        if self.projector is not None and grid is not None:
            global_feat, spatial, _ = split_features(self.student, feats)
            out["cls"], out["patch"] = self.projector(global_feat, spatial, grid)  # [N, Dt], [N, L, Dt]
        return out


# ---- losses ---------------------------------------------------------------------------------------


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T**2 (gradient scale of Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * t * t


# ---- the method -----------------------------------------------------------------------------------


class DistillMethod(Method):
    """Distillation for :func:`jobs.engine.train`; ``setup`` loads the teacher (kept off DeepSpeed)."""

    Config = DistillConfig
    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, rank: int = 0) -> None:
        super().__init__(cfg, rank)
        self.teacher: nn.Module | None = None
        self.teacher_classes, self.teacher_size = 0, cfg.model.img_size

    def setup(self, ctx: StageContext) -> None:
        """The student's ``in_chans`` from the data (its manifest's channels); the teacher (or its cache)."""
        self.data_channels = data_channels(ctx.data_url, ctx.storage_options)
        model = fit_data_channels(self.cfg.model, self.data_channels, f"stage {self.cfg.name!r}",
                                  f"the data at {ctx.data_url}")
        self.cfg = self.cfg.model_copy(update={"model": model})
        if self.cfg.targets == "cached":
            setup_cached(self, ctx)
            return
        self.teacher, self.teacher_classes, self.teacher_size = load_teacher(
            self.cfg.teacher, ctx.refs.get("teacher"), self.cfg.model.img_size, ctx.storage_options)
        self._check_teacher_channels(ctx.data_url)
        self.weights = self._loss_weights()
        self.init_source = read_stage_init(self.cfg, ctx)
        log.info("distilling %s (%d classes, %d px) into %s; loss weights %s", type(self.teacher).__name__,
                 self.teacher_classes, self.teacher_size, self.cfg.model.arch, self.weights)

    def _check_teacher_channels(self, data_url: str) -> None:
        """The teacher reads the data's channels as the student does: a count that differs is refused."""
        have, want = model_in_chans(self.teacher), len(channel_names(self.data_channels))
        if have != want and not isinstance(self.teacher, ChannelVisionTransformer):
            raise ValueError(f"stage {self.cfg.name!r}: the teacher takes {have} input channels but the data at "
                             f"{data_url} has {want} ({', '.join(channel_names(self.data_channels))}); distil from a "
                             f"teacher trained on this data, or prep the data with {have} channels")

    def _loss_weights(self) -> dict[str, float]:
        loss, classifier = self.cfg.loss, self.teacher_classes > 0
        if self.cfg.targets == "cached":
            return cached_loss_weights(self)
        weights = {"logits": loss.logits_weight if loss.logits_weight is not None else float(classifier),
                   "cls": loss.cls_weight if loss.cls_weight is not None else float(not classifier),
                   "patch": loss.patch_weight if loss.patch_weight is not None else float(not classifier)}
        if weights["logits"] and not classifier:
            raise ValueError(f"stage {self.cfg.name!r}: loss.logits_weight needs a teacher with a classifier")
        if not any(weights.values()):
            raise ValueError(f"stage {self.cfg.name!r}: every distillation loss weight is 0")
        return weights

    @property
    def num_classes(self) -> int:
        return self.teacher_classes if self.weights["logits"] else 0

    def build_model(self) -> DistillStudent:
        student = build_timm_model(self.cfg.model, num_classes=self.num_classes)
        head = (getattr(student, "pretrained_cfg", None) or {}).get("classifier") or "head"
        start_encoder(student, self.init_source, self.cfg.peft, trainable=(f"{head}.*",))
        projector = None
        if self.weights["cls"] or self.weights["patch"]:
            teacher_dim = self.cache.manifest["feature_dim"] if self.teacher is None else self.teacher.num_features
            projector = FeatureProjector(int(student.num_features), int(teacher_dim))
        return DistillStudent(student, projector)

    def train_transform(self) -> Callable:
        return mae_transform(self.cfg.model.img_size, scale=self.cfg.crop_scale)  # RandomResizedCrop + flip

    def train_mix(self) -> Mix | None:
        """Mixup / cutmix keyed by (seed, epoch, sample id): the teacher sees the mixed image, so its
        targets need no mixing (and a cache made with the same settings holds exactly these)."""
        return self.cfg.mix(self.cfg.seed)

    def _teacher_targets(self, imgs: torch.Tensor) -> dict[str, Any]:
        """The frozen teacher's logits / CLS / patch tokens (fp32), on its own device and dtype."""
        p = next(self.teacher.parameters())
        if p.device != imgs.device:
            dtype = torch.bfloat16 if use_bf16(self.cfg, imgs.is_cuda) else torch.float32
            self.teacher.to(imgs.device, dtype=dtype)
            p = next(self.teacher.parameters())
        feats = teacher_forward(self.teacher, imgs.to(p.dtype), self.teacher_size)
        with torch.no_grad():
            out: dict[str, Any] = {}
            if self.weights["logits"]:
                out["logits"] = self.teacher.forward_head(feats).float()  # [N, C]
            if self.weights["cls"] or self.weights["patch"]:
                global_feat, spatial, grid = split_features(self.teacher, feats)
                out["cls"], out["grid"] = global_feat.float(), grid  # [N, Dt]
                out["patch"] = spatial.flatten(2).transpose(1, 2).float()  # [N, L, Dt]
        return out

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.targets == "cached":
            return cached_step(self, model, batch)
        imgs = batch["image"]  # [N, C, S, S], on the student's device and dtype
        target = self._teacher_targets(imgs)
        out = model(imgs, target.get("grid"))
        w, parts = self.weights, {}
        if w["logits"]:
            parts["logits"] = kl_logits(out["logits"].float(), target["logits"], self.cfg.loss.temperature)
        for key in ("cls", "patch"):
            if w[key]:
                parts[key] = feature_distance(out[key].float(), target[key], self.cfg.loss.feature_loss)
        loss = sum(w[k] * v for k, v in parts.items())
        return loss, {f"loss_{k}": float(v.detach()) for k, v in parts.items()}

    def arch(self) -> dict[str, Any]:
        teacher = self.cfg.teacher if not isinstance(self.cfg.teacher, TeacherWeights) else self.cfg.teacher.model_dump()
        return {"student": self.cfg.model.model_dump(), "teacher": teacher, "loss": self.cfg.loss.model_dump()}

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def export(self, model: nn.Module, dest_url: str, *, rank: int, storage_options: dict[str, Any],
               extra: dict[str, Any]) -> None:
        """The student alone, as a plain timm model (every rank calls: ZeRO gathers)."""
        student = model.student
        export_timm_model(student, self.cfg.model.arch, timm_model_kwargs(self.cfg.model, self.num_classes), dest_url,
                          img_size=self.cfg.model.img_size, rank=rank, storage_options=storage_options,
                          extra={**extra, "teacher": self.arch()["teacher"]},
                          channels=export_channels(self.data_channels, model_in_chans(student)))

    def flops_per_sample(self) -> float:
        """3x the student's forward plus the teacher's forward."""
        if not hasattr(self, "_flops"):
            student = forward_flops(lambda: build_timm_model(self.cfg.model, self.num_classes), self.cfg.model.img_size)
            if self.teacher is None:  # cached targets: no teacher forward
                self._flops = 3.0 * student
                return self._flops
            teacher = 2.0 * sum(p.numel() for p in self.teacher.parameters()) * self._teacher_tokens()
            self._flops = 3.0 * student + teacher
        return self._flops

    def _teacher_tokens(self) -> int:
        embed = getattr(self.teacher, "patch_embed", None)
        return int(embed.num_patches + self.teacher.num_prefix_tokens) if embed is not None else 1

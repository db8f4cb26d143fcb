"""What online distillation (``jobs/distill.py``), cached distillation (``jobs/_cached_targets.py``) and
the teacher-outputs stage (``jobs/teacher_cache.py``) share: the frozen teacher (loaded from an earlier
stage's export, an export URL or timm + weights) and its forward, and the feature distance."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.storage import Store, local_staging
from jobs.config.distill import TeacherWeights
from jobs.export import load_export_model, load_timm_weights


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over samples (and tokens) of the cosine distance or smooth-L1 between features [..., D]."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.smooth_l1_loss(student, teacher)


# ---- the teacher ----------------------------------------------------------------------------------


def load_teacher(teacher: str | TeacherWeights, url: str | None, img_size: int,
                 storage_options: dict[str, Any] | None = None) -> tuple[nn.Module, int, int]:
    """(frozen eval-mode teacher, its num_classes, its input size)."""
    if isinstance(teacher, TeacherWeights):
        model = _timm_with_weights(teacher, storage_options)
        classes, size = teacher.num_classes, teacher.img_size or img_size
    else:
        model, config = load_export_model(url or teacher, storage_options)
        classes, size = int(config.get("num_classes", 0)), int(config["pretrained_cfg"]["input_size"][-1])
    return model.eval().requires_grad_(False), classes, size


def teacher_forward(teacher: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """The frozen teacher's ``forward_features`` of ``x`` (already in its dtype), resized to its input ``size``."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return teacher.forward_features(x)


def _timm_with_weights(teacher: TeacherWeights, storage_options: dict[str, Any] | None) -> nn.Module:
    if "://" not in teacher.weights:
        return load_timm_weights(teacher.arch, os.path.expanduser(teacher.weights), teacher.args, teacher.num_classes)
    parent, name = teacher.weights.rsplit("/", 1)
    with local_staging("vitforge-teacher-") as tmp:
        Store(parent, storage_options).get_file(name, os.path.join(tmp, name))
        return load_timm_weights(teacher.arch, os.path.join(tmp, name), teacher.args, teacher.num_classes)

"""Stage config of ``kind: distill`` (the method: ``jobs/distill.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.config.init import InitFields, WeightsFile
from jobs.config.models import TimmModelConfig
from jobs.config.kinds import register_config
from jobs.config.train import TrainConfig
from dataprep.mixing import MixFields


TeacherWeights = WeightsFile  # any timm model with a weights file (.safetensors; a path or a store URL)


class DistillLoss(BaseModel):
    model_config = ConfigDict(extra="forbid")

    logits_weight: float | None = Field(default=None, ge=0, description="KL on logits; default 1 for classifier teachers")
    temperature: float = Field(default=4.0, gt=0)
    cls_weight: float | None = Field(default=None, ge=0, description="default 1 for teachers without classifier")
    patch_weight: float | None = Field(default=None, ge=0, description="default 1 for teachers without classifier")
    feature_loss: Literal["cosine", "smooth_l1"] = "cosine"


class DistillConfig(TrainConfig, InitFields, MixFields):
    """A ``kind: distill`` stage: ``model`` is the student (any timm model), ``teacher`` the frozen teacher.
    ``init`` / ``peft``: the student starts from existing weights and trains partly (``jobs/init.py``).
    ``mixup`` / ``cutmix`` (off by default): the loader's batch transform (``dataprep/mixing.py``); the
    teacher (or the cache, made with the same settings) gives the targets of the mixed image."""

    kind: Literal["distill"] = "distill"
    teacher: str | TeacherWeights | None = Field(
        default=None, description="an earlier training stage, an export URL/path, or timm + weights")
    model: TimmModelConfig
    loss: DistillLoss = Field(default_factory=DistillLoss)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    targets: Literal["online", "cached"] = Field(default="online", description="online: run the teacher each step; "
                                                 "cached: read a teacher_outputs stage's cache")
    cache: str | None = Field(default=None, description="targets: cached: the teacher_outputs stage (or its cache URL)")

    @model_validator(mode="after")
    def _targets_source(self) -> "DistillConfig":
        if self.targets == "online" and self.teacher is None:
            raise ValueError("targets: online needs a teacher (an earlier stage, an export, or {arch, weights}); "
                             "or set targets: cached with cache: <teacher_outputs stage>")
        if self.targets == "cached" and self.cache is None:
            raise ValueError("targets: cached needs cache: <a teacher_outputs stage or its cache URL>")
        if self.targets == "online" and self.cache is not None:
            raise ValueError("cache is only read with targets: cached (drop it, or set targets: cached)")
        if self.targets == "cached" and self.loss.patch_weight:
            raise ValueError("loss.patch_weight needs the teacher's patch tokens, which a cache does not hold: use "
                             "targets: online for patch distillation")
        return self


register_config(DistillConfig)

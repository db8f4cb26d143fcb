"""Stage config of ``kind: ibot`` (the method: ``jobs/ibot.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.config.dino import DINOConfig
from jobs.config.kinds import register_config


class IBOTConfig(DINOConfig):
    """A ``kind: ibot`` stage: every ``kind: dino`` field (they mean the same) plus iBOT's own."""

    kind: Literal["ibot"] = "ibot"  # type: ignore[assignment]
    patch_out_dim: int = Field(default=8192, ge=2, description="patch prototypes (official default 8192)")
    shared_head: bool = Field(default=False, description="the patch tokens use the CLS head's last layer "
                                                         "(then head.out_dim prototypes; patch_out_dim is unused)")
    mask_ratio: list[float] = Field(default=[0.0, 0.3], min_length=1, description="per image, one is chosen")
    mask_ratio_var: list[float] = Field(default=[0.0, 0.2], min_length=1, description="+- uniform, per ratio")
    mask_aspect: tuple[float, float] = Field(default=(0.3, 1 / 0.3), description="of each masked block")
    teacher_patch_temp: float = Field(default=0.07, gt=0, description="after the warm-up (official 0.07)")
    warmup_teacher_patch_temp: float = Field(default=0.04, gt=0)
    patch_center_momentum: float = Field(default=0.9, ge=0, lt=1)
    cls_weight: float = Field(default=1.0, ge=0, description="official lambda1")
    patch_weight: float = Field(default=1.0, ge=0, description="official lambda2")
    koleo_weight: float = Field(default=0.0, ge=0, description="DINOv2 uses 0.1")

    @model_validator(mode="after")
    def _ratios(self) -> "IBOTConfig":
        if len(self.mask_ratio_var) not in (1, len(self.mask_ratio)):
            raise ValueError(f"mask_ratio_var has {len(self.mask_ratio_var)} values for {len(self.mask_ratio)} "
                             "mask_ratio values: give one, or one per ratio")
        var = self.mask_ratio_var * (len(self.mask_ratio) if len(self.mask_ratio_var) == 1 else 1)
        for r, v in zip(self.mask_ratio, var):
            if not (0 <= r - v and r + v < 1):
                raise ValueError(f"mask_ratio {r} +- {v} leaves [0, 1): each ratio +- its var must stay in [0, 1)")
        if not 0 < self.mask_aspect[0] <= self.mask_aspect[1]:
            raise ValueError(f"mask_aspect {self.mask_aspect}: give (low, high) with 0 < low <= high")
        return self

    def ratio_choices(self) -> list[tuple[float, float]]:
        var = self.mask_ratio_var * (len(self.mask_ratio) if len(self.mask_ratio_var) == 1 else 1)
        return list(zip(self.mask_ratio, var))


register_config(IBOTConfig)

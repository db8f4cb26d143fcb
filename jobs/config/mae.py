"""Stage config of ``kind: mae`` (the method: ``jobs/mae.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.config.init import InitFields
from jobs.config.kinds import register_config
from jobs.config.train import TrainConfig


class DecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embed_dim: int = Field(default=512, ge=8)
    depth: int = Field(default=8, ge=1)
    num_heads: int = Field(default=16, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)


class MAEConfig(TrainConfig, InitFields):
    """A ``kind: mae`` stage: the common training fields plus MAE's own. With ``init`` the encoder
    starts from existing weights (``jobs/init.py``; the decoder starts fresh), with ``peft`` only
    some of its tensors train (``jobs/peft.py``)."""

    kind: Literal["mae"] = "mae"
    mask_ratio: float = Field(default=0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    crop_scale: tuple[float, float] = (0.2, 1.0)


register_config(MAEConfig)

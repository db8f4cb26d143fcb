"""Stage config of ``kind: dino`` (the method: ``jobs/dino.py``). Defaults follow main_dino.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.config.init import InitFields
from jobs.config.models import ModelConfig
from jobs.config.kinds import register_config
from jobs.config.train import OptimConfig, TrainConfig


class DINOHeadConfig(BaseModel):
    """The projection head: MLP -> bottleneck -> L2 normalisation -> weight-normalised linear."""

    model_config = ConfigDict(extra="forbid")

    out_dim: int = Field(default=65536, ge=2, description="prototypes (K)")
    hidden_dim: int = Field(default=2048, ge=1)
    bottleneck_dim: int = Field(default=256, ge=1)
    layers: int = Field(default=3, ge=1)
    norm_last_layer: bool = Field(default=True, description="fix the last layer's weight norm to 1")
    use_bn: bool = Field(default=False, description="BatchNorm1d after each hidden linear layer (DINO's "
                         "--use_bn_in_head, default False in main_dino.py); statistics per rank, not synced")


class DINOViewsConfig(BaseModel):
    """``views:`` the multi-crop views' photometric augmentations; the defaults are main_dino.py's
    ``DataAugmentationDINO``. Every draw is made whatever the probability, so a view's crop does not move
    when only these change. On small grayscale images (16 px digits) solarizing erases the strokes and the
    blur is a no-op; ``solarize_p: 0`` and ``blur_p: [0, 0, 0]`` keep the views legible."""

    model_config = ConfigDict(extra="forbid")

    color_jitter_p: float = Field(default=0.8, ge=0, le=1, description="brightness 0.4, contrast 0.4, saturation "
                                  "0.2, hue 0.1, in random order (8-bit RGB only)")
    grayscale_p: float = Field(default=0.2, ge=0, le=1, description="8-bit RGB only")
    blur_p: tuple[float, float, float] = Field(default=(1.0, 0.1, 0.5), description="Gaussian blur of the first "
                                               "global view, the second, and each local view")
    solarize_p: float = Field(default=0.2, ge=0, le=1, description="solarize (threshold 128) the second global view")

    @field_validator("blur_p")
    @classmethod
    def _probabilities(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not 0 <= p <= 1 for p in value):
            raise ValueError(f"blur_p {list(value)}: each probability must be in [0, 1]")
        return value


def _dino_optim() -> OptimConfig:
    # main_dino.py's recipe: lr 5e-4 * batch / 256 after 10 warmup epochs, cosine to 1e-6, wd from 0.04,
    # each parameter's gradient clipped to norm 3 on its own (--clip_grad 3.0, utils.clip_gradients)
    return OptimConfig(base_lr=5e-4, min_lr=1e-6, weight_decay=0.04, betas=(0.9, 0.999), warmup_epochs=10,
                       clip_grad=3.0, clip_grad_mode="per_param")


DROP_PATH = 0.1  # main_dino.py --drop_path_rate (the student's stochastic depth), for ViT-S and larger


def _dino_model(value: Any) -> Any:
    """``model:`` with DINO's drop path unless the stage sets one: 0.1 from ViT-S up, timm's 0 for ViT-Ti."""
    if isinstance(value, dict) and "drop_path_rate" not in value:
        tiny = str(value.get("arch", "")).startswith(("vit_tiny", "channelvit_tiny"))
        return {**value, "drop_path_rate": 0.0 if tiny else DROP_PATH}
    return value


class DINOConfig(TrainConfig, InitFields):
    """A ``kind: dino`` stage: the common training fields plus DINO's own. ``init`` / ``peft``:
    the backbone starts from existing weights (the head fresh) and trains partly (``jobs/init.py``).

    ``optim.weight_decay`` is where the weight-decay cosine starts; ``weight_decay_end`` where it ends.
    """

    kind: Literal["dino"] = "dino"
    optim: OptimConfig = Field(default_factory=_dino_optim)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig.model_validate(_dino_model({})),
                               description="the encoder; drop_path_rate defaults to 0.1 (main_dino.py "
                               "--drop_path_rate) from ViT-S up, 0 for ViT-Ti")
    head: DINOHeadConfig = Field(default_factory=DINOHeadConfig)
    local_crops: int = Field(default=8, ge=0)
    local_size: int | None = Field(default=None, ge=8, description="default: img_size * 96/224")
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0, description="after the warmup (main_dino.py --teacher_temp "
                                "0.04; the paper raises it to 0.07 over 30 epochs for longer runs)")
    warmup_teacher_temp: float = Field(default=0.04, gt=0, description="main_dino.py --warmup_teacher_temp")
    warmup_teacher_temp_epochs: float = Field(default=0.0, ge=0, description="linear warmup from "
                                              "warmup_teacher_temp (main_dino.py --warmup_teacher_temp_epochs 0)")
    teacher_momentum: float = Field(default=0.996, ge=0, le=1, description="start of the cosine to 1")
    center_momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay_end: float = Field(default=0.4, ge=0)
    freeze_last_layer_epochs: float = Field(default=1.0, ge=0, description="no optimizer update of the head's "
                                            "last layer for this long (main_dino.py --freeze_last_layer 1)")
    export_from: Literal["student", "teacher"] = Field(default="student", description="which backbone to export")
    views: DINOViewsConfig | None = Field(default=None, description="the views' colour jitter, grayscale, blur and "
                                          "solarize probabilities (default: main_dino.py's)")
    centering: Literal["ema", "sinkhorn"] | None = Field(
        default=None, description="how the teacher's outputs are made a target: ema (None: the same) centres them "
        "by an EMA of their mean, then a softmax at the teacher temperature (DINO, iBOT); sinkhorn: DINOv2's "
        "Sinkhorn-Knopp normalisation over the batch (iBOT: the CLS outputs and the masked patch tokens' apart)")
    sinkhorn_iterations: int | None = Field(default=None, ge=1, description="with centering: sinkhorn (None: 3, "
                                            "as DINOv2)")
    digest_optional = ("views", "centering", "sinkhorn_iterations")

    def centering_kwargs(self) -> dict[str, Any]:
        return {"centering": self.centering or "ema", "sinkhorn_iterations": self.sinkhorn_iterations or 3}

    @field_validator("model", mode="before")
    @classmethod
    def _dino_drop_path(cls, value: Any) -> Any:
        return _dino_model(value)


register_config(DINOConfig)

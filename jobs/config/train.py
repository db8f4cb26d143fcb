"""The stage config every training kind shares: :class:`TrainConfig`, its :class:`OptimConfig` and
:class:`CheckpointPolicy`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs._ckpt_policy import CheckpointPolicy
from jobs.config.digest import json_digest
from jobs.config.models import ModelConfig


class OptimConfig(BaseModel):
    """AdamW and its schedule. ``lr = base_lr * global_batch / 256`` (Goyal et al. linear scaling)."""

    model_config = ConfigDict(extra="forbid")

    base_lr: float = Field(default=1.5e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0, description="overrides warmup_epochs")
    clip_grad: float | None = Field(default=None, gt=0, description="gradient clipping threshold; None: no clipping")
    clip_grad_mode: Literal["global", "per_param"] = Field(
        default="global", description="global: the norm of all gradients together (DeepSpeed's gradient_clipping); "
        "per_param: each parameter's full gradient on its own, as DINO's utils.clip_gradients (jobs/_grad_clip.py)")


class TrainConfig(BaseModel):
    """What every training stage has. Methods subclass it with their own fields and a ``kind``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: str = Field(description="an earlier stage's name, or a manifest URL / prep output directory")
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (overrides epochs)")
    batch_size: int = Field(default=64, ge=1, description="images per worker per micro-step")
    grad_accum: int = Field(default=1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload: optimizer state and step on the CPU "
                                    "(torch AdamW; needs zero_stage >= 1)")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = False
    compile: bool = False
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointPolicy = Field(default_factory=lambda: CheckpointPolicy(every_minutes=15.0))
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings merged over ours")
    seed: int = 0
    loader_workers: int = Field(default=2, ge=0)
    progress: bool | None = Field(default=None, description="progress bar on rank 0; default: only on a TTY")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers (jobs/_trackers.py); [] for none")

    @field_validator("optim", mode="before")
    @classmethod
    def _over_method_defaults(cls, value: Any) -> Any:
        """A partial ``optim:`` changes only the fields it names; the others keep the method's defaults (its
        Config's ``optim`` default, e.g. fine-tuning's betas (0.9, 0.999)), not :class:`OptimConfig`'s."""
        if not isinstance(value, dict):
            return value
        default = cls.model_fields["optim"].get_default(call_default_factory=True)
        return {**default.model_dump(), **value}

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainConfig:
        """DeepSpeed offloads only a ZeRO optimizer: at stage 0 the option would silently do nothing."""
        zero = self.deepspeed.get("zero_optimization") or {}
        stage = zero.get("stage", self.zero_stage) if isinstance(zero, dict) else self.zero_stage
        passthrough = zero.get("offload_optimizer") if isinstance(zero, dict) else None
        offload = self.offload_optimizer or (isinstance(passthrough, dict)
                                             and passthrough.get("device", "none") not in (None, "none"))
        if offload and stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3: DeepSpeed offloads the optimizer state "
                             "of a ZeRO optimizer only, so with zero_stage 0 it would stay on the device; set "
                             "zero_stage to 1 or higher, or drop offload_optimizer")
        return self

    #: optional fields left out of the digest while unset, so runs from before they existed still resume
    digest_optional: ClassVar[tuple[str, ...]] = ()

    def digest(self) -> str:
        """Digest of everything that shapes the result (not how often we checkpoint or show progress)."""
        skip = {"checkpoint", "progress", "loader_workers", "trackers"}
        skip |= {name for name in self.digest_optional if getattr(self, name) is None}
        return json_digest(self.model_dump(mode="json", exclude=skip))




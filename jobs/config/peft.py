"""Stage config of parameter-efficient training (``peft:``; what it does: ``jobs/peft.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


LORA_TARGETS = r".*\.attn\.(qkv|proj)$"


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: str = Field(default=LORA_TARGETS, description="regex over the encoder's module names")


class PeftConfig(BaseModel):
    """Which encoder tensors train (everything else in the encoder is frozen)."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraConfig | None = None
    unfreeze_last: int = Field(default=0, ge=0, description="train the last K transformer blocks fully")
    unfreeze: list[str] = Field(default_factory=list, description="fnmatch patterns of parameter names to train")

    @model_validator(mode="after")
    def _something_trains(self) -> "PeftConfig":
        if self.lora is None and not self.unfreeze_last and not self.unfreeze:
            raise ValueError("peft trains nothing of the encoder: give lora: {rank: 8}, unfreeze_last: K or "
                             "unfreeze: [patterns] (or drop peft to train every weight)")
        return self


class PromptConfig(BaseModel):
    """Shallow visual prompt tuning: ``tokens`` learnable prompts (timm registers) on a frozen backbone."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(default=10, ge=1, description="prompt tokens (the model's reg_tokens)")


class AdapterConfig(BaseModel):
    """AdaptFormer's parallel adapter on every block (the paper's defaults)."""

    model_config = ConfigDict(extra="forbid")

    bottleneck: int = Field(default=64, ge=1, description="hidden width of the down/up projection")
    scale: float | Literal["learned"] = Field(default=0.1, description="fixed output scale, or 'learned' "
                                              "(a trained scalar starting at 1)")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout after the activation")

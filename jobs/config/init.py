"""Stage config of starting from existing weights (``init:``, ``peft:``; what they do: ``jobs/init.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.config.peft import PeftConfig


class WeightsFile(BaseModel):
    """Any timm model with a weights file (``.safetensors``; a path or a store URL)."""

    model_config = ConfigDict(extra="forbid")

    arch: str
    weights: str
    num_classes: int = Field(default=0, ge=0, description="the classifier size in the file (0: none)")
    img_size: int | None = Field(default=None, ge=8, description="its input resolution; default: the stage's")
    args: dict[str, Any] = Field(default_factory=dict, description="other timm constructor arguments")


InitRef = str | WeightsFile


class InitFields(BaseModel):
    """The stage fields that start a model from existing weights, shared by every training kind."""

    init: InitRef | None = Field(default=None, description="an earlier training stage, an export URL/path, or "
                                 "{arch, weights: PATH_OR_URL} (timm safetensors); default: random init")
    peft: PeftConfig | None = Field(default=None, description="train only some encoder tensors (jobs/peft.py: lora, "
                      "unfreeze_last, unfreeze)")
    init_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                    description="SHA-256 of the init's weights file; the run pins it (part of the "
                                    "stage digest) when init is a file or URL rather than an earlier stage")




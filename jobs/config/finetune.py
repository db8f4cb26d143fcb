"""Stage config of ``kind: finetune`` (the method: ``jobs/finetune.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.config.init import InitFields
from jobs.config.models import TimmModelConfig
from jobs.config.peft import LORA_TARGETS, AdapterConfig, PromptConfig
from jobs.config.kinds import register_config
from jobs.config.train import OptimConfig, TrainConfig
from dataprep.mixing import MixFields


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str = Field(default=LORA_TARGETS, description="regex over module names (peft)")


class FinetuneConfig(TrainConfig, InitFields, MixFields):
    """A ``kind: finetune`` stage: ``init`` (an export, or timm weights) or ``model`` (random init),
    exactly one. ``None`` recipe fields take the mode's defaults (see :data:`RECIPES`). ``peft``
    (``jobs/peft.py``) trains only some backbone tensors plus the head; ``mode: lora`` is
    ``peft: {lora: …}`` from the ``lora`` settings when ``peft`` is not given."""

    kind: Literal["finetune"] = "finetune"
    model: TimmModelConfig | None = Field(default=None, description="without init: the timm model to train from "
                                          "random initialisation (seeded by seed)")
    mode: Literal["full", "linear", "lora", "prompt", "adapter"] = "full"
    label_fraction: float = Field(default=1.0, gt=0, le=1, description="stratified share of the train labels used")
    num_classes: int | None = Field(default=None, ge=1, description="default: the manifest's class count")
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1)
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    mixup: float | None = Field(default=None, ge=0, description="mixup alpha; 0 disables (default: the mode's)")
    cutmix: float | None = Field(default=None, ge=0, description="cutmix alpha; 0 disables (default: the mode's)")
    crop_scale: tuple[float, float] = (0.08, 1.0)
    global_pool: Literal["token", "avg"] | None = Field(
        default=None, description="ViTs: what the classifier reads, the CLS token or the mean patch token (after "
        "the encoder's final norm, as kind: eval's pool: avg; MAE's fine-tuning pools so, main_finetune.py "
        "--global_pool); default: the init's own (its timm global_pool; an MAE export's is token)")
    channels: list[str] | None = Field(default=None, min_length=1, description="the data's channels the model "
                                       "reads, by name and in order (default: all): a ChannelViT takes any subset, "
                                       "a plain model exactly its in_chans")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="mode prompt: the prompt tokens")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="mode adapter: AdaptFormer's adapter")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(base_lr=1e-3, betas=(0.9, 0.999)))

    digest_optional: ClassVar[tuple[str, ...]] = ("global_pool",)  # unset: the digests of earlier runs hold

    @model_validator(mode="after")
    def _init_or_model(self) -> "FinetuneConfig":
        if self.init is None and self.model is None:
            raise ValueError("give init (an earlier training stage or an export URL/path) to fine-tune pretrained "
                             "weights, or model (a timm model, e.g. {arch: vit_tiny_patch16_224, img_size: 32}) to "
                             "train from random initialisation")
        if self.init is not None and self.model is not None:
            raise ValueError(f"init ({self.init!r}) and model are both given: the architecture comes from init's "
                             "export; drop model, or drop init to train model from random initialisation")
        if self.peft is not None and self.mode == "linear":
            raise ValueError("peft with mode linear: a linear probe trains no encoder tensor; use mode full "
                             "(or lora) with peft, or drop peft")
        for name, default in (("prompt", PromptConfig()), ("adapter", AdapterConfig())):
            if getattr(self, name) != default and self.mode != name:
                raise ValueError(f"{name} settings are given but mode is {self.mode!r}: set mode: {name}, or drop {name}")
        if self.model is not None and self.model.drop_path_rate:
            raise ValueError("model > drop_path_rate: set the stage's drop_path_rate instead (the fine-tune recipe "
                             "owns it)")
        return self

    @model_validator(mode="after")
    def _mode_defaults(self) -> "FinetuneConfig":
        for name, value in RECIPES[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self


# MAE's recipes: full fine-tuning (ViT-B: layer decay 0.65-0.75, drop path 0.1, mixup 0.8, cutmix 1.0,
# smoothing 0.1) and linear probing (no augmentation beyond crops, no regularisation).
RECIPES: dict[str, dict[str, float]] = {
    "full": {"layer_decay": 0.75, "drop_path_rate": 0.1, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0},
    "linear": {"layer_decay": 1.0, "drop_path_rate": 0.0, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0},
    "lora": {"layer_decay": 1.0, "drop_path_rate": 0.0, "label_smoothing": 0.1, "mixup": 0.0, "cutmix": 0.0},
}
RECIPES["prompt"] = RECIPES["adapter"] = RECIPES["lora"]  # a frozen backbone: no drop path, no mixing


register_config(FinetuneConfig)

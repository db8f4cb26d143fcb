"""Stage config of an encoder: a timm ViT by name (:class:`ModelConfig`), or any timm model (:class:`TimmModelConfig`).

Whether the name exists in timm, and whether a ViT field applies to the architecture, needs timm:
:func:`jobs.models.model_problems` checks that (the runner, ``vitforge validate``), not these models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """An encoder: a timm ViT by name plus shape overrides (``None`` keeps the architecture's own)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(default="vit_base_patch16_224", description="timm model name, e.g. vit_tiny_patch16_224")
    img_size: int | None = Field(default=None, ge=8)
    patch_size: int | None = Field(default=None, ge=1)
    depth: int | None = Field(default=None, ge=1)
    embed_dim: int | None = Field(default=None, ge=8)
    num_heads: int | None = Field(default=None, ge=1)
    mlp_ratio: float | None = Field(default=None, gt=0)
    reg_tokens: int = Field(default=0, ge=0, description="register tokens (Darcet et al. 2023)")
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    in_chans: int | None = Field(default=None, ge=1, description="input channels; default: the data's (its "
                                                                  "manifest's channels), 3 for RGB images")

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.arch, **kwargs)`` (headless encoder)."""
        kw: dict[str, Any] = {"num_classes": 0}
        for name in ("img_size", "patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "in_chans"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.reg_tokens:
            kw["reg_tokens"] = self.reg_tokens
        return kw

    def arch_record(self) -> dict[str, Any]:
        """What must match between a checkpoint and the run resuming it (shape-defining fields)."""
        return {"arch": self.arch, **self.timm_kwargs()}


class TimmModelConfig(BaseModel):
    """Any timm model by name — a ViT or a CNN — plus shape overrides and extra constructor args.

    ViT shape fields (``patch_size``, ``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``,
    ``reg_tokens``) go to timm only when set and only for architectures whose constructor takes
    them; ``img_size`` is the input resolution (passed to timm when the constructor takes it, as
    ViTs' does). ``args`` holds any other constructor argument, e.g. a tiny ResNet:
    ``{arch: resnet18, img_size: 32, args: {channels: [16, 32, 64, 128], stem_width: 16}}``. The timm
    keyword arguments are :func:`jobs.models.timm_model_kwargs`.
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="timm model name, e.g. vit_tiny_patch16_224 or resnet18")
    img_size: int = Field(default=224, ge=8, description="input resolution")
    patch_size: int | None = Field(default=None, ge=1)
    depth: int | None = Field(default=None, ge=1)
    embed_dim: int | None = Field(default=None, ge=8)
    num_heads: int | None = Field(default=None, ge=1)
    mlp_ratio: float | None = Field(default=None, gt=0)
    reg_tokens: int = Field(default=0, ge=0)
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    in_chans: int | None = Field(default=None, ge=1, description="input channels; default: the data's (its "
                                                                  "manifest's channels), 3 for RGB images")
    args: dict[str, Any] = Field(default_factory=dict, description="other timm constructor arguments")

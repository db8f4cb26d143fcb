"""Stage config of an encoder: a timm ViT by name (:class:`ModelConfig`), or any timm model (:class:`TimmModelConfig`)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs import channelvit as _channelvit  # noqa: F401  registers channelvit_*_patch16_224 with timm


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

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if not arch.startswith(("vit_", "channelvit_")) or arch not in timm.list_models(arch):
            sizes = ", ".join(f"vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large"))
            raise ValueError(f"unknown ViT architecture {arch!r}: give a timm ViT name such as {sizes} "
                             "or vit_huge_patch14_224 (see timm.list_models('vit_*'))")
        return arch

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
    ``{arch: resnet18, img_size: 32, args: {channels: [16, 32, 64, 128], stem_width: 16}}``.
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
    args: dict[str, Any] = Field(default_factory=dict, description="other timm constructor arguments")

    @field_validator("arch")
    @classmethod
    def _known_model(cls, arch: str) -> str:
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model {arch!r}: give a name from timm.list_models(), "
                             "e.g. vit_tiny_patch16_224, resnet18, convnext_atto")
        return arch

    @model_validator(mode="after")
    def _fields_the_model_takes(self) -> "TimmModelConfig":
        for name in ("patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "reg_tokens"):
            value = getattr(self, name)
            if value and not takes_kwarg(self.arch, name):
                raise ValueError(f"{name}: {self.arch} has no {name!r} (it applies to ViTs; "
                                 "give other constructor arguments under args)")
        return self

    def timm_kwargs(self, num_classes: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.arch, **kwargs)`` (also what an export records)."""
        kw: dict[str, Any] = {"num_classes": num_classes, **self.args}
        if takes_kwarg(self.arch, "img_size"):
            kw["img_size"] = self.img_size
        for name in ("patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "reg_tokens"):
            value = getattr(self, name)
            if value:
                kw[name] = value
        return kw



def takes_kwarg(arch: str, name: str) -> bool:
    """Whether timm model ``arch``'s class constructor takes ``name`` (cheap: built on the meta device)."""
    return name in _constructor_params(arch)


@functools.lru_cache(maxsize=None)
def _constructor_params(arch: str) -> frozenset[str]:
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    names: set[str] = set()
    for cls in type(model).__mro__:  # a subclass taking **kwargs (ChannelViT) passes its base's on
        params = inspect.signature(cls.__init__).parameters
        names |= set(params)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or cls is torch.nn.Module:
            break
    return frozenset(names)




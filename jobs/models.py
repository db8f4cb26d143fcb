"""ViT encoders, built through timm by name, so every export loads with ``timm.create_model``.

A :class:`ModelConfig` names a timm architecture (``vit_tiny_patch16_224`` … ``vit_huge_patch14_224``)
and optionally overrides its shape (``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
``num_heads``, ``reg_tokens``). :meth:`ModelConfig.timm_kwargs` is exactly what goes to
``timm.create_model`` here and, with ``pretrained=True``, downstream — one source of truth.

Attention goes through ``F.scaled_dot_product_attention`` (timm's ``fused_attn``), which picks the
flash / memory-efficient kernels on GPU.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.models.vision_transformer import VisionTransformer

from jobs import adaptformer as _adaptformer  # noqa: F401  registers adaptformer_vit with timm
from jobs import channelvit as _channelvit  # noqa: F401  registers channelvit_*_patch16_224 with timm

log = logging.getLogger(__name__)


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


def with_data_channels(model: ModelConfig, data_url: str, storage_options: dict[str, Any] | None = None,
                       stage: str = "") -> ModelConfig:
    """``model`` with ``in_chans`` from the data's manifest (``format: npy`` shards name their channels;
    images are 3). An explicit ``in_chans`` that disagrees is an error naming both."""
    from dataprep.manifest import load_manifest

    channels = load_manifest(data_url, storage_options)[0].channels
    count = channels.count if channels is not None else 3
    if model.in_chans is None:
        return model.model_copy(update={"in_chans": count}) if count != 3 else model
    if model.in_chans != count:
        names = f" ({', '.join(channels.names)})" if channels is not None else " (RGB images)"
        raise ValueError(f"stage {stage!r}: model.in_chans is {model.in_chans} but the data at {data_url} has "
                         f"{count} channels{names}; remove model.in_chans or set it to {count}")
    return model


def build_encoder(cfg: ModelConfig, **extra: Any) -> VisionTransformer:
    """A randomly initialised timm ``VisionTransformer`` for ``cfg`` (no classifier head)."""
    model = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate,
                              **cfg.timm_kwargs(), **extra)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{cfg.arch} is a {type(model).__name__}, not a timm VisionTransformer")
    if model.patch_embed.img_size[0] % model.patch_embed.patch_size[0]:
        raise ValueError(f"img_size {model.patch_embed.img_size} is not a multiple of patch_size "
                         f"{model.patch_embed.patch_size}")
    return model


def set_grad_checkpointing(model: torch.nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of every transformer block (timm's own switch)."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(enable)


def encoder_flops_per_token(model: VisionTransformer) -> float:
    """Forward FLOPs per token per block stack (matmuls only, 2 per MAC), excluding attention scores."""
    dim = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    return 2.0 * len(model.blocks) * (4 * dim * dim + 2 * dim * hidden)


# ---- fixed 2-D sin-cos position embeddings (MAE, MoCo v3) ----------------------------------------


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, prefix_tokens: int = 0) -> torch.Tensor:
    """[prefix_tokens + grid_size**2, embed_dim]; prefix rows (cls, registers) are zeros."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim % 4 == 0, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as patches are laid out
    # MAE's get_2d_sincos_pos_embed order: the column (w) half first, then the row (h) half. Exports and
    # checkpoints store the embedding, so models trained with the older h-first order keep theirs.
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w.reshape(-1)),
                          _sincos_1d(embed_dim // 2, grid_h.reshape(-1))], axis=1)  # [G*G, D]
    if prefix_tokens:
        emb = np.concatenate([np.zeros((prefix_tokens, embed_dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # [D/2]
    out = np.einsum("m,d->md", pos, omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


# ---- any timm model (distillation students, CNNs included) ---------------------------------------


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


def build_timm_model(cfg: TimmModelConfig, num_classes: int = 0) -> torch.nn.Module:
    """A randomly initialised timm model for ``cfg`` with ``num_classes`` outputs (0: features only)."""
    return timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate,
                             **cfg.timm_kwargs(num_classes))


def forward_flops(build: Callable[[], torch.nn.Module], img_size: int) -> float:
    """Forward FLOPs per ``img_size`` image of the model ``build()`` makes (built and run on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        chans = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), 3)  # C, not 3
        x = torch.empty(1, int(getattr(model, "in_chans", None) or chans), img_size, img_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return float(counter.get_total_flops())

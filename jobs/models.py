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
from typing import Any, Literal

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from dataprep.manifest import ChannelInfo
from jobs import adaptformer as _adaptformer  # noqa: F401  registers adaptformer_vit with timm
from jobs import channelvit as _channelvit  # noqa: F401  registers channelvit_*_patch16_224 with timm
from jobs._channels import data_channels, data_in_chans
from jobs.config.models import ModelConfig, TimmModelConfig

log = logging.getLogger(__name__)


def with_data_channels(model: ModelConfig | TimmModelConfig, data_url: str,
                       storage_options: dict[str, Any] | None = None, stage: str = "",
                       selected: list[str] | None = None) -> ModelConfig | TimmModelConfig:
    """``model`` with ``in_chans`` from the data's manifest (``format: npy`` shards name their channels;
    images are 3), or from ``selected`` of its channels. An explicit ``in_chans`` that disagrees is an error
    naming both; a 3-channel model keeps ``in_chans`` unset (its record is that of an RGB model)."""
    return fit_data_channels(model, data_channels(data_url, storage_options), f"stage {stage!r}",
                             f"the data at {data_url}", selected)


def fit_data_channels(model: ModelConfig | TimmModelConfig, info: ChannelInfo | None, where: str, data: str,
                      selected: list[str] | None = None) -> ModelConfig | TimmModelConfig:
    """As :func:`with_data_channels`, for a manifest's ``channels`` already read (None: RGB images)."""
    count = data_in_chans(model.in_chans, info, where, data=data, selected=selected)
    return model.model_copy(update={"in_chans": count}) if count != 3 and model.in_chans is None else model


def encoder_in_chans(encoder: torch.nn.Module) -> int:
    """The input channels of a timm ViT (a ChannelViT: the channels it has embeddings for)."""
    embed = encoder.patch_embed
    return int(getattr(embed, "in_chans", None) or embed.proj.in_channels)


def model_in_chans(model: torch.nn.Module) -> int:
    """The input channels of any timm model: a ViT's patch embedding, else the first convolution's."""
    if hasattr(model, "patch_embed"):
        return encoder_in_chans(model)
    return int(next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), 3))


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


def token_count(encoder: torch.nn.Module, img_size: int) -> int:
    """Patch tokens of one ``img_size`` image (a ChannelViT: one per channel and patch)."""
    grid = (img_size // encoder.patch_embed.patch_size[0]) ** 2
    return grid * (encoder_in_chans(encoder) if isinstance(encoder, _channelvit.ChannelVisionTransformer) else 1)


def patch_embed_flops(encoder: torch.nn.Module, img_size: int) -> float:
    """Forward FLOPs of the patch embedding of one ``img_size`` image: every pixel of every channel C."""
    patch = encoder.patch_embed.patch_size[0]
    return 2.0 * (img_size // patch) ** 2 * encoder.embed_dim * patch * patch * encoder_in_chans(encoder)


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

VIT_FIELDS = ("patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "reg_tokens")


def timm_model_kwargs(cfg: TimmModelConfig, num_classes: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(cfg.arch, **kwargs)`` (also what an export records)."""
    kw: dict[str, Any] = {"num_classes": num_classes, **cfg.args}
    if takes_kwarg(cfg.arch, "img_size"):
        kw["img_size"] = cfg.img_size
    for name in VIT_FIELDS:
        value = getattr(cfg, name)
        if value:
            kw[name] = value
    if cfg.in_chans:
        kw["in_chans"] = cfg.in_chans
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


# ---- what timm says about a stage's model (the spec itself is validated without timm) -----------


def model_problems(cfg: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for each thing timm refuses in a stage's ``model``: an unknown architecture,
    a ViT field for a model that has none. [] when it builds (or ``cfg`` is no model config)."""
    if isinstance(cfg, ModelConfig):
        return vit_arch_problems(cfg.arch)
    if isinstance(cfg, TimmModelConfig):
        if not timm.is_model(cfg.arch):
            return [("arch", f"unknown timm model {cfg.arch!r}: give a name from timm.list_models(), "
                     "e.g. vit_tiny_patch16_224, resnet18, convnext_atto")]
        return [(name, f"{cfg.arch} has no {name!r} (it applies to ViTs; give other constructor arguments under "
                 "args)") for name in VIT_FIELDS if getattr(cfg, name) and not takes_kwarg(cfg.arch, name)]
    return []


def vit_arch_problems(arch: str) -> list[tuple[str, str]]:
    """``[("arch", message)]`` unless ``arch`` is a timm ViT (or a ChannelViT) name."""
    if arch.startswith(("vit_", "channelvit_")) and arch in timm.list_models(arch):
        return []
    sizes = ", ".join(f"vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large"))
    return [("arch", f"unknown ViT architecture {arch!r}: give a timm ViT name such as {sizes} "
             "or vit_huge_patch14_224 (see timm.list_models('vit_*'))")]


# ---- pooled features of any timm model -----------------------------------------------------------


def pool_features(model: torch.nn.Module, feats: torch.Tensor,
                  pool: Literal["token", "avg", "channels"] | None = "token") -> torch.Tensor:
    """``model.forward_features`` output -> one feature per image ``[N, D]`` (the one pooling rule).

    Token models (ViTs, ``[N, P + L, D]`` with ``P = num_prefix_tokens``): ``token`` is the CLS token
    (the mean patch token for a model without one), ``avg`` the mean patch token (prefix tokens such
    as registers left out), ``channels`` (a ChannelViT) each channel's mean patch token, concatenated
    (:func:`jobs.channelvit.channel_pool`). Feature maps (CNNs, ``[N, C, H, W]``): the global average,
    whatever ``pool``. ``None``: the model's own pre-logits pooling (timm's ``forward_head(pre_logits=True)``:
    its ``global_pool``, then ``fc_norm``), what its classifier head sees.
    """
    if pool is None:
        return model.forward_head(feats, pre_logits=True)  # [N, D]
    if feats.ndim == 4:  # [N, C, H, W]
        return feats.mean(dim=(2, 3))
    if feats.ndim != 3:
        raise ValueError(f"{type(model).__name__}.forward_features gave shape {tuple(feats.shape)}: "
                         "expected tokens [N, T, D] or a feature map [N, C, H, W]")
    if pool == "channels":
        from jobs.channelvit import channel_pool

        return channel_pool(model, feats)  # [N, C*D]
    if pool == "token" and getattr(model, "cls_token", None) is not None:
        return feats[:, 0]  # [N, D]
    return feats[:, int(getattr(model, "num_prefix_tokens", 0)):].mean(dim=1)  # [N, D]


def split_features(model: torch.nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``forward_features`` output -> (global [N, D], spatial [N, D, H, W], grid (H, W)).

    global: :func:`pool_features` with ``token`` pooling; spatial: a token model's patch tokens on their
    square grid, or a CNN's feature map itself.
    """
    pooled = pool_features(model, feats, "token")  # also refuses shapes that are neither
    if feats.ndim == 4:  # [N, C, H, W]
        return pooled, feats, (feats.shape[2], feats.shape[3])
    patches = feats[:, int(getattr(model, "num_prefix_tokens", 0)):]  # [N, L, D]
    side = int(round(patches.shape[1] ** 0.5))
    spatial = patches.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], side, side)  # [N, D, g, g]
    return pooled, spatial, (side, side)


def build_timm_model(cfg: TimmModelConfig, num_classes: int = 0) -> torch.nn.Module:
    """A randomly initialised timm model for ``cfg`` with ``num_classes`` outputs (0: features only)."""
    return timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate,
                             **timm_model_kwargs(cfg, num_classes))


def forward_flops(build: Callable[[], torch.nn.Module], img_size: int) -> float:
    """Forward FLOPs per ``img_size`` image of the model ``build()`` makes (built and run on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, model_in_chans(model), img_size, img_size)  # C, not 3
        with FlopCounterMode(display=False) as counter:
            model(x)
    return float(counter.get_total_flops())

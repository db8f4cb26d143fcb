"""ChannelViT (Bao et al., "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words", 2024).

A timm ``VisionTransformer`` whose patch embedding is *shared across channels and applied to each
channel separately*: an image ``[C, H, W]`` becomes ``C x L`` tokens, each the sum of the shared
projection of one channel's patch, the patch position's embedding (shared by the channels) and a
learned embedding of the channel. Because a token knows its channel, the model takes any subset
of the channels it was trained on: pass ``channels=[indices]`` (or set :attr:`channel_subset`).

Hierarchical Channel Sampling (HCS, the paper's training regime) is on in training mode when
``hcs=True``: per batch a channel count ``k ~ U{1..C}``, then per sample a random ``k``-subset of
its channels (the official code draws one subset per batch; per sample gives more variety at the
same cost). Draws come from torch's global generator, which the engine seeds.

Importing this module (``import jobs.models`` does) registers ``channelvit_tiny_patch16_224``,
``channelvit_small_patch16_224`` and ``channelvit_base_patch16_224`` with timm, so exports load
with ``timm.create_model("local-dir:EXPORT", pretrained=True)``. Written for vitforge after
reading insitro/ChannelViT (``channelvit/backbone/{channel_vit,hcs_channel_vit}.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["ChannelPatchEmbed", "ChannelVisionTransformer", "channel_pool", "hierarchical_channel_sampling"]


class ChannelPatchEmbed(nn.Module):
    """``[B, C, H, W]`` -> ``[B, C, L, D]``: one ``Conv2d(1, D, p, p)`` for every channel, plus the
    learned embedding of each channel index."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]  # per channel
        self.in_chans = in_chans
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)  # shared by all channels
        self.channel_embed = nn.Parameter(torch.zeros(in_chans, embed_dim))
        trunc_normal_(self.channel_embed, std=0.02)

    def forward(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """``channels``: ``[C]`` or ``[B, C]`` indices (into ``in_chans``) of the channels ``x`` holds."""
        b, c, h, w = x.shape
        t = self.proj(x.reshape(b * c, 1, h, w))  # [B*C, D, g, g]
        t = t.flatten(2).transpose(1, 2).reshape(b, c, -1, t.shape[1])  # [B, C, L, D]
        emb = self.channel_embed[channels]  # [C, D] or [B, C, D]
        return t + (emb[None, :, None] if emb.ndim == 2 else emb[:, :, None])


def hierarchical_channel_sampling(x: torch.Tensor, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, H, W]`` -> ``[B, k, H, W]`` and ``[B, k]`` indices: ``k ~ U{1..C}`` per batch, then a
    random ``k``-subset per sample (torch's global generator)."""
    b, c = x.shape[:2]
    k = int(torch.randint(1, c + 1, ()).item())
    pick = torch.rand(b, c, device=x.device).argsort(dim=1)[:, :k].sort(dim=1).values  # [B, k] positions
    picked = torch.gather(x, 1, pick[:, :, None, None].expand(-1, -1, *x.shape[2:]))
    idx = channels.expand(b, -1) if channels.ndim == 1 else channels
    return picked, torch.gather(idx, 1, pick)


class ChannelVisionTransformer(VisionTransformer):
    """timm's ViT with :class:`ChannelPatchEmbed`: ``C x L`` patch tokens after the class token.

    Same API as timm's (``forward_features``, ``forward_head``, ``forward``), plus a ``channels``
    argument naming which of the ``in_chans`` trained channels the input holds.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, hcs: bool = True,
                 **kwargs: Any) -> None:
        if kwargs.get("reg_tokens") or kwargs.get("class_token") is False or kwargs.get("no_embed_class"):
            raise ValueError("ChannelViT supports a class token without registers (reg_tokens=0)")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **kwargs)
        embed_dim = self.embed_dim
        self.patch_embed = ChannelPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        # one position embedding per patch position (shared by the channels) + the class token's
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.in_chans, self.hcs = in_chans, hcs
        self.channel_subset: list[int] | None = None  # eval: which channels the input holds

    def _channel_index(self, c: int, channels: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor:
        if channels is None:
            channels = self.channel_subset
        if channels is None:
            if c != self.in_chans:
                raise ValueError(f"input has {c} channels, the model was built for {self.in_chans}: pass "
                                 f"channels=[indices of those {c} among 0..{self.in_chans - 1}] or set channel_subset")
            return torch.arange(c, device=device)
        idx = torch.as_tensor(channels, dtype=torch.long, device=device)
        if idx.shape[-1] != c or (idx < 0).any() or (idx >= self.in_chans).any():
            raise ValueError(f"channels {idx.tolist()} must name {c} indices in 0..{self.in_chans - 1}")
        return idx

    def forward_features(self, x: torch.Tensor, channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[:2]
        idx = self._channel_index(c, channels, x.device)  # [C] or [B, C]
        if self.training and self.hcs:
            x, idx = hierarchical_channel_sampling(x, idx)
        t = self.patch_embed(x, idx)  # [B, C, L, D]
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        t = (t + self.patch_pos(grid)[:, None]).flatten(1, 2)  # [B, C*L, D]: positions shared by channels
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)  # [B, 1, D]
        x = self.pos_drop(torch.cat([cls, t], dim=1))  # [B, 1 + C*L, D]
        x = self.norm_pre(self.patch_drop(x))
        x = self.blocks(x)
        return self.norm(x)

    def patch_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, g*g, D]``: the patch positions' embedding on ``grid``, resampled as timm does (bicubic) from
        the trained grid when another image size comes in (DINO's local crops)."""
        pos, trained = self.pos_embed[:, 1:], tuple(self.patch_embed.grid_size)
        if tuple(grid) == trained:
            return pos
        return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(trained), num_prefix_tokens=0)

    def forward(self, x: torch.Tensor, channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, channels))


_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 0, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.5,), "std": (0.5,), "first_conv": "patch_embed.proj",
            "classifier": "head", **kwargs}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    size = variant.split("_")[1]
    embed_dim, heads = _SIZES[size]
    args = {"patch_size": 16, "embed_dim": embed_dim, "depth": 12, "num_heads": heads, **kwargs}
    return build_model_with_cfg(ChannelVisionTransformer, variant, pretrained, **args)


def channel_pool(model: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """``pool: channels``: ``[N, 1 + k*L, D]`` -> ``[N, C*D]``, each trained channel's mean patch token in the
    trained order; a channel the input lacks (``channel_subset``) gives a block of zeros, so features of any
    subset share one space.

    A ChannelViT's mean over all its tokens (``avg``) averages the channels together, and the class of
    multi-channel data is often *which* channel shows a structure: on the cells of ``tests/_cells.py``, an
    MAE-trained ChannelViT's linear probe reads 15% (chance) from ``avg`` and 72% from ``channels``."""
    if not isinstance(model, ChannelVisionTransformer):
        raise ValueError(f"pool: channels needs a ChannelViT (one token per channel and patch); "
                         f"{type(model).__name__} mixes the channels in every token: use pool: token or avg")
    n, t, d = feats.shape
    present = list(model.channel_subset) if model.channel_subset is not None else list(range(model.in_chans))
    prefix = int(model.num_prefix_tokens)
    per = feats[:, prefix:].reshape(n, len(present), (t - prefix) // len(present), d).mean(dim=2)  # [N, k, D]
    out = feats.new_zeros(n, model.in_chans, d)
    out[:, present] = per
    return out.flatten(1)


# read by timm's register_model (this module's ``default_cfgs``): what create_model resolves by name
default_cfgs = generate_default_cfgs({f"channelvit_{size}_patch16_224": _cfg() for size in _SIZES})


@register_model
def channelvit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    return _create("channelvit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def channelvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    return _create("channelvit_small_patch16_224", pretrained, **kwargs)


@register_model
def channelvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    return _create("channelvit_base_patch16_224", pretrained, **kwargs)

"""Masked autoencoders (He et al., 2021): only what is special to MAE — its model, loss, transform, config.

The encoder is a plain timm ``VisionTransformer`` (its ``patch_embed``, ``blocks`` and ``norm`` do
the work), so the encoder's state dict *is* a timm checkpoint. As in the paper and its reference
code: per-sample random masking (ratio 0.75) with only visible patches entering the encoder; a
light decoder (width 512, depth 8 by default) over all tokens with mask tokens; fixed 2-D sin-cos
position embeddings in encoder and decoder; per-patch pixel targets, optionally normalised
(``norm_pix_loss``); the loss averaged over masked patches only.

The masking noise of sample ``i`` (its global index in the shards) at step ``s`` comes from a
generator seeded by (seed, s, i): a resumed run draws exactly the masks an uninterrupted one
would, and neither the rank, the micro-batch of a gradient-accumulation step nor the number of
workers changes a sample's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models.vision_transformer import Block, VisionTransformer

from dataprep.transforms import mae_transform
from jobs._eval_recon import mae_reconstruction
from jobs.config.mae import DecoderConfig, MAEConfig
from jobs.init import read_stage_init, start_encoder
from jobs.method import Method
from jobs._channels import data_channels, is_channelvit
from jobs.channelvit import ChannelVisionTransformer
from jobs.models import (ModelConfig, build_encoder, encoder_flops_per_token, encoder_in_chans, fit_data_channels,
                         patch_embed_flops, set_grad_checkpointing, sincos_pos_embed_2d, token_count)


class MaskedAutoencoder(nn.Module):
    """timm ViT encoder + MAE decoder. ``forward(imgs, noise)`` -> (loss, pred, mask).

    A ChannelViT encoder (``jobs/channelvit.py``) makes one token per channel and patch: ``L = C x G*G``
    tokens are masked (channel-major, as the encoder lays them out), each token predicts its own channel's
    ``p*p`` pixels, and the decoder adds a learned channel embedding to the fixed position embedding.
    """

    def __init__(self, encoder: VisionTransformer, decoder: DecoderConfig, norm_pix_loss: bool = True,
                 mask_ratio: float = 0.75) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = encoder.patch_embed.patch_size[0]
        self.grid = encoder.patch_embed.grid_size[0]
        self.prefix = encoder.num_prefix_tokens  # cls + registers
        self.in_chans = encoder_in_chans(encoder)
        self.channel_tokens = isinstance(encoder, ChannelVisionTransformer)  # one token per channel and patch
        self.token_chans = 1 if self.channel_tokens else self.in_chans  # channels of the pixels one token predicts
        self.length = self.grid ** 2 * (self.in_chans if self.channel_tokens else 1)  # tokens masked per image
        dim, ddim = encoder.embed_dim, decoder.embed_dim
        norm = partial(nn.LayerNorm, eps=1e-6)

        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.prefix + self.grid ** 2, ddim), requires_grad=False)
        if self.channel_tokens:
            self.decoder_channel_embed = nn.Parameter(torch.zeros(self.in_chans, ddim))  # [C, Dd], learned
        self.decoder_blocks = nn.ModuleList(
            Block(ddim, decoder.num_heads, decoder.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder.depth))
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, self.patch ** 2 * self.token_chans)
        self._init_weights()

    # ---- init (as the reference code) ----------------------------------------------------------
    def _init_weights(self) -> None:
        enc = self.encoder
        if enc.pos_embed is not None:  # fixed sin-cos; prefix rows zero (none when no_embed_class)
            rows = enc.pos_embed.shape[1] - self.grid ** 2
            enc.pos_embed.data.copy_(sincos_pos_embed_2d(enc.embed_dim, self.grid, rows).unsqueeze(0))
            enc.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid, self.prefix).unsqueeze(0))
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in (enc.cls_token, getattr(enc, "reg_token", None), self.mask_token,
                      getattr(self, "decoder_channel_embed", None)):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for name, m in self.named_modules():
            if name == "encoder.patch_embed.proj":
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- the objective in named steps ----------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (row-major patches, pixels (p, q, c) within a patch); channel
        tokens: [N, C*L, p*p] (channel-major, then row-major patches)."""
        n, c, p, g = imgs.shape[0], self.in_chans, self.patch, self.grid
        x = imgs.reshape(n, c, g, p, g, p)
        if self.channel_tokens:
            return torch.einsum("nchpwq->nchwpq", x).reshape(n, c * g * g, p * p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] (channel tokens: [N, C*L, p*p]) -> [N, C, H, W]."""
        n, c, p, g = x.shape[0], self.in_chans, self.patch, self.grid
        if self.channel_tokens:
            x = torch.einsum("nchwpq->nchpwq", x.reshape(n, c, g, g, p, p))
            return x.reshape(n, c, g * p, g * p)
        x = x.reshape(n, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, g * p, g * p)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the (1 - mask_ratio) patches with the smallest noise, per sample.

        x: [N, L, D], noise: [N, L] -> visible [N, L_keep, D], mask [N, L] (1 = removed), ids_restore [N, L]
        """
        n, length, d = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]  # [N, L_keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, L_keep, D]
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L], back in patch order
        return visible, mask, ids_restore

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, D] patch tokens plus their position embedding (channel tokens: the position's
        embedding, shared by the channels, plus the channel's)."""
        enc = self.encoder
        if self.channel_tokens:
            channels = torch.arange(self.in_chans, device=imgs.device)
            x = enc.patch_embed(imgs, channels) + enc.pos_embed[:, None, -self.grid ** 2:]  # [N, C, G*G, D]
            return x.flatten(1, 2)  # [N, C*G*G, D]
        x = enc.patch_embed(imgs)  # [N, L, D]
        return x + enc.pos_embed[:, -self.grid ** 2:] if enc.pos_embed is not None else x

    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor):
        enc = self.encoder
        x = self.embed_patches(imgs)  # [N, L, D]
        x, mask, ids_restore = self.random_masking(x, noise)  # [N, L_keep, D]
        prefix = [enc.cls_token] if enc.cls_token is not None else []
        if getattr(enc, "reg_token", None) is not None:
            prefix.append(enc.reg_token)
        if prefix:
            tokens = torch.cat(prefix, dim=1)  # [1, P, D]
            if enc.pos_embed is not None and not enc.no_embed_class:
                tokens = tokens + enc.pos_embed[:, :self.prefix]
            x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)  # [N, P + L_keep, D]
        x = enc.norm_pre(x)
        x = self._run_blocks(enc.blocks, x, enc.grad_checkpointing)
        return enc.norm(x), mask, ids_restore  # [N, P + L_keep, D]

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, P + L_keep, Dd]
        n, length = ids_restore.shape
        masked = self.mask_token.expand(n, length + self.prefix - x.shape[1], -1)
        patches = torch.cat([x[:, self.prefix:], masked], dim=1)  # [N, L, Dd], shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :self.prefix], patches], dim=1) + self._decoder_pos()  # [N, P + L, Dd]
        x = self._run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, P + L, p*p*C]
        return x[:, self.prefix:]  # [N, L, p*p*C]

    def _decoder_pos(self) -> torch.Tensor:
        """[1, P + L, Dd]: the fixed sin-cos rows; channel tokens add their channel's learned embedding."""
        if not self.channel_tokens:
            return self.decoder_pos_embed
        pos = self.decoder_pos_embed[:, self.prefix:]  # [1, G*G, Dd]
        tokens = (pos[:, None] + self.decoder_channel_embed[None, :, None]).flatten(1, 2)  # [1, C*G*G, Dd]
        return torch.cat([self.decoder_pos_embed[:, :self.prefix], tokens], dim=1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        target = self.patchify(imgs).float()  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.length, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
        for blk in blocks:
            if checkpointed and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def build_mae(cfg: MAEConfig) -> MaskedAutoencoder:
    model = MaskedAutoencoder(build_encoder(cfg.model), cfg.decoder, cfg.norm_pix_loss, cfg.mask_ratio)
    if cfg.activation_checkpointing:
        set_grad_checkpointing(model.encoder)
    return model


def mask_noise(indices: torch.Tensor, length: int, seed: int, step: int) -> torch.Tensor:
    """[N, L] uniform noise; row ``n`` is a pure function of (seed, step, indices[n])."""
    base = (seed * 1_000_003 + step) * 2_147_483_659
    gens = [torch.Generator().manual_seed((base + int(i)) % 2**63) for i in indices.tolist()]
    return torch.stack([torch.rand(length, generator=g) for g in gens])


class MAEMethod(Method):
    """The MAE method for :func:`jobs.engine.train`."""

    Config = MAEConfig
    cfg: MAEConfig
    # MAE's loss reaches the patch tokens, not the CLS token; the official fine-tuning pools their mean
    # (main_finetune.py --global_pool, its default), while its linear probe reads the CLS token
    # ... and a ChannelViT's, per channel (``channels``: the mean over all its tokens averages the channels away)
    pool = "avg"

    def __init__(self, cfg: MAEConfig, rank: int = 0) -> None:
        super().__init__(cfg, rank)
        if is_channelvit(self.cfg.model.arch):
            self.pool = "channels"

    def setup(self, ctx: Any) -> None:
        """``in_chans`` from the data: the decoder then predicts every channel of each patch."""
        self.data_channels = data_channels(ctx.data_url, ctx.storage_options)
        model = fit_data_channels(self.cfg.model, self.data_channels, f"stage {self.cfg.name!r}",
                                  f"the data at {ctx.data_url}")
        self.cfg = self.cfg.model_copy(update={"model": model})
        self.init_source = read_stage_init(self.cfg, ctx)

    def build_model(self) -> MaskedAutoencoder:
        model = build_mae(self.cfg)  # the init is loaded after _init_weights: nothing overwrites it
        start_encoder(model.encoder, self.init_source, self.cfg.peft)
        self.length = model.length  # tokens masked per image
        return model

    def train_transform(self) -> Callable:
        return mae_transform(self.cfg.model.img_size or _default_img_size(self.cfg.model), scale=self.cfg.crop_scale)

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        imgs = batch["image"]  # [N, C, H, W], on the model's device and dtype
        noise = mask_noise(batch["index"], self.length, self.cfg.seed, step).to(imgs.device)  # [N, L]
        loss, _, _ = model(imgs, noise)
        return loss, {}

    def arch(self) -> dict[str, Any]:
        return {"encoder": self.cfg.model.arch_record(), "decoder": self.cfg.decoder.model_dump(),
                "norm_pix_loss": self.cfg.norm_pix_loss}

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed", "channel_embed",
                "decoder_channel_embed"}

    def encoder(self, model: nn.Module) -> VisionTransformer:
        return model.encoder

    @classmethod
    def reconstruction_report(cls, stage_url: str, data_url: str, split: str, seed: int,
                              storage_options: dict[str, Any] | None) -> dict[str, Any]:
        """The val reconstruction loss of the MAE stage at ``stage_url`` vs trivial baselines (``jobs/_eval_recon.py``)."""
        return mae_reconstruction(stage_url, data_url, split, seed, storage_options)

    def flops_per_sample(self) -> float:
        """3x forward matmul FLOPs: encoder on visible tokens, decoder on all tokens."""
        if not hasattr(self, "_flops"):
            with torch.device("meta"):
                enc = build_encoder(self.cfg.model)
            length = token_count(enc, int(enc.patch_embed.img_size[0]))  # ChannelViT: C x G*G
            keep = int(length * (1 - self.cfg.mask_ratio)) + enc.num_prefix_tokens
            d = self.cfg.decoder
            dec = 2.0 * d.depth * (4 * d.embed_dim ** 2 + 2 * d.embed_dim * int(d.embed_dim * d.mlp_ratio))
            tokens = length + enc.num_prefix_tokens
            attn_enc = 4.0 * len(enc.blocks) * keep * keep * enc.embed_dim
            attn_dec = 4.0 * d.depth * tokens * tokens * d.embed_dim
            # C: the decoder predicts, the embedding reads, every channel (per token, or one token per channel)
            pixels = enc.patch_embed.patch_size[0] ** 2 * encoder_in_chans(enc) * (enc.patch_embed.num_patches / length)
            head = 2.0 * tokens * d.embed_dim * pixels
            embed = patch_embed_flops(enc, int(enc.patch_embed.img_size[0]))
            fwd = encoder_flops_per_token(enc) * keep + attn_enc + dec * tokens + attn_dec + head + embed
            self._flops = 3.0 * fwd
        return self._flops


def _default_img_size(model: ModelConfig) -> int:
    with torch.device("meta"):
        return int(build_encoder(model).patch_embed.img_size[0])

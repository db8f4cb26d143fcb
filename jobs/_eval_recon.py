"""MAE's reconstruction loss on held-out images, against trivial baselines (for ``kind: eval``).

An MAE stage's export holds only the encoder; the decoder lives in its checkpoints. This reads
the stage's newest *committed* checkpoint (:func:`jobs.checkpoint.latest_committed`) (DeepSpeed files: ``torch.load`` unpickles them, so
only evaluate runs from a store you trust), rebuilds the full model from the config saved with
it, and measures, on every sample of a split read with the eval transform (center crop, no
augmentation), with the same masks for every model (noise of batch ``b`` seeded by (seed, b)):

* ``loss``: MAE's own objective (per-patch MSE over the masked patches; with ``norm_pix_loss``
  the target is each patch normalised by its own mean and variance);
* ``baseline_mean_patch``: predicting every masked patch as a flat patch of its own true mean
  colour. In norm-pix space that is the all-zero prediction; without ``norm_pix_loss`` it is the
  patch's per-channel mean. It knows each hidden patch's mean, so it is not a weak baseline;
* ``baseline_visible_mean``: predicting every masked patch as the mean of the image's visible
  patch targets (the best guess from the visible patches without a model).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from cluster.storage import CHECKSUM, Store, local_staging
from dataprep.loader import StreamingLoader
from dataprep.transforms import eval_transform
from jobs._ckpt_verify import check_digest
from jobs._safe_load import safe_loading
from jobs.checkpoint import latest_committed
from jobs.method import method_class

log = logging.getLogger(__name__)


def load_from_checkpoint(stage_url: str, storage_options: dict[str, Any] | None = None):
    """(model, config, step) from the newest committed checkpoint of the training stage at ``stage_url``: the
    config saved with it, validated by its kind's method, and that method's full model (decoder included)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    info = latest_committed(stage_url, storage_options)
    if info is None:
        raise FileNotFoundError(f"{stage_url}/checkpoints: no committed checkpoint; has the stage run?")
    method = method_class(info.meta["config"]["kind"])
    cfg = method.Config.model_validate(info.meta["config"])
    store = Store(info.url, storage_options)
    with local_staging("vitforge-recon-") as tmp:
        for name in info.files:
            if name.startswith("engine/"):
                check_digest(store.url_of(name), info.files[name],
                             store.get_file(name, os.path.join(tmp, name), checksum=CHECKSUM in info.files[name]))
        with safe_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(tmp, "engine"))  # engine/latest: the tag
    embed = state.get("encoder.patch_embed.channel_embed")  # a ChannelViT: one embedding per channel
    chans = int(embed.shape[0] if embed is not None else state["encoder.patch_embed.proj.weight"].shape[1])
    if cfg.model.in_chans is None and chans != 3:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"in_chans": chans})})
    torch.manual_seed(cfg.seed)
    model = method(cfg).build_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # fixed sin-cos embeddings
    if set(missing) - frozen or unexpected:
        raise ValueError(f"{info.url} does not match {cfg.model.arch}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval(), cfg, info.step


load_mae_from_checkpoint = load_from_checkpoint  # the name reconstruction callers know


def _norm_targets(model, imgs: torch.Tensor) -> torch.Tensor:
    target = model.patchify(imgs).float()  # [N, L, p*p*C]
    if model.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def _flat_patches(model, imgs: torch.Tensor) -> torch.Tensor:
    """Each patch replaced by its own per-channel mean colour, as a target-space prediction."""
    patches = model.patchify(imgs).float()  # [N, L, p*p*C], pixels (p, q, c)
    if model.norm_pix_loss:
        return torch.zeros_like(patches)
    n, length, _ = patches.shape
    c = model.token_chans  # channels per token: C, or 1 for a ChannelViT's channel tokens
    per_channel = patches.view(n, length, -1, c).mean(dim=2, keepdim=True)  # [N, L, 1, C]
    return per_channel.expand(-1, -1, patches.shape[-1] // c, -1).reshape(patches.shape)


@torch.no_grad()
def reconstruction_report(model, data_url: str, split: str = "val", seed: int = 0, batch_size: int = 256,
                          storage_options: dict[str, Any] | None = None, num_workers: int = 0) -> dict[str, float]:
    """MAE loss and the two baselines (module docstring), averaged over every masked patch of ``split``."""
    size = int(model.encoder.patch_embed.img_size[0])
    loader = StreamingLoader(data_url, split=split, batch_size=batch_size, seed=seed, transform=eval_transform(size),
                             num_workers=num_workers, partial="pad", shuffle=False, storage_options=storage_options,
                             persistent_workers=False)
    sums = {"loss": 0.0, "baseline_mean_patch": 0.0, "baseline_visible_mean": 0.0}
    masked = samples = 0.0
    for b, batch in enumerate(loader):
        imgs = batch["image"][~batch["pad"]]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        noise = torch.rand(imgs.shape[0], model.length, generator=gen)
        latent, mask, ids_restore = model.forward_encoder(imgs, noise)
        pred = model.forward_decoder(latent, ids_restore).float()  # [N, L, p*p*C]
        target = _norm_targets(model, imgs)
        visible = (1 - mask).unsqueeze(-1)  # [N, L, 1]
        visible_mean = (target * visible).sum(dim=1, keepdim=True) / visible.sum(dim=1, keepdim=True)
        for key, guess in (("loss", pred), ("baseline_mean_patch", _flat_patches(model, imgs)),
                           ("baseline_visible_mean", visible_mean.expand_as(target))):
            sums[key] += float((((guess - target) ** 2).mean(dim=-1) * mask).sum())
        masked += float(mask.sum())
        samples += imgs.shape[0]
    out = {k: v / masked for k, v in sums.items()}
    return {**out, "samples": int(samples), "mask_ratio": float(model.mask_ratio), "norm_pix_loss": model.norm_pix_loss}


def mae_reconstruction(stage_url: str, data_url: str, split: str = "val", seed: int = 0,
                       storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`reconstruction_report` of the MAE stage at ``stage_url`` (its newest checkpoint)."""
    model, cfg, step = load_from_checkpoint(stage_url, storage_options)
    report = reconstruction_report(model, data_url, split, seed, storage_options=storage_options)
    log.info("MAE %s (step %d) on %s/%s: loss %.4f, mean-patch baseline %.4f, visible-mean baseline %.4f",
             cfg.name, step, data_url, split, report["loss"], report["baseline_mean_patch"],
             report["baseline_visible_mean"])
    return {**report, "step": step}

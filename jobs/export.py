"""Encoder export: ``export/model.safetensors`` + ``export/config.json``, loadable by timm.

The weights are the fp32 master copy (gathered from every ZeRO partition), with timm's own key
names (a plain ``VisionTransformer`` state dict, no classifier head). ``config.json`` has timm's
hub layout (``architecture``, ``model_args``, ``pretrained_cfg``), so both of these work::

    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"),
                      **config["model_args"])
    timm.create_model("local-dir:/path/to/export", pretrained=True)

No pickle is involved: safetensors and JSON only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from cluster.storage import Store, local_staging
from jobs.models import ModelConfig, build_encoder

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def gather_fp32_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 parameters and buffers of ``module`` on CPU, under any ZeRO stage.

    A collective under ZeRO 1–3: every rank must call it, in step.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather its shards
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone()
        if full is None:
            full = p.detach()
        out[name] = full.float().cpu().contiguous()
    for name, b in module.named_buffers():
        if b is not None and name in module.state_dict():
            out[name] = b.detach().cpu().contiguous()
    return out


def export_config(model_cfg: ModelConfig, encoder: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm hub-style config for the exported encoder."""
    kwargs = model_cfg.timm_kwargs()  # num_classes=0 included: the export is headless
    size = int(encoder.patch_embed.img_size[0])
    return {
        "architecture": model_cfg.arch,
        "num_classes": 0,
        "num_features": int(encoder.num_features),
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic", "crop_pct": 0.875, "num_classes": 0, "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "vitforge": {"format": "vitforge-export/1", **(extra or {})},
    }


def export_encoder(encoder: nn.Module, model_cfg: ModelConfig, dest_url: str, *, rank: int = 0,
                   storage_options: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``dest_url/model.safetensors`` and ``config.json`` (every rank calls; rank 0 writes).

    The config is written last: an export without ``config.json`` is unfinished.
    """
    state = gather_fp32_state_dict(encoder)
    if rank != 0:
        return
    store = Store(dest_url, storage_options)
    with local_staging("vitforge-export-") as tmp:
        path = os.path.join(tmp, WEIGHTS)
        save_file(state, path, metadata={"format": "pt", "architecture": model_cfg.arch})
        store.put_file(path, WEIGHTS)
    store.put_json(CONFIG, export_config(model_cfg, encoder, extra))
    log.info("exported %s encoder (%d tensors) to %s", model_cfg.arch, len(state), store.url)


def load_export(url: str, storage_options: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the exported encoder with timm and load its weights (downloads from any store URL)."""
    import timm

    store = Store(url, storage_options)
    config = store.get_json(CONFIG)
    with local_staging("vitforge-load-") as tmp:
        path = os.path.join(tmp, WEIGHTS)
        store.get_file(WEIGHTS, path)
        kwargs = {"num_classes": 0, **config["model_args"], **overrides}
        return timm.create_model(config["architecture"], pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path, num_classes=0), **kwargs)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """An untrained encoder of the exported shape (for tests and shape checks)."""
    return build_encoder(ModelConfig(arch=config["architecture"], **config["model_args"]))

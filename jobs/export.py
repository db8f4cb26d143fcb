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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from cluster.storage import Store, local_staging
from dataprep.transforms import IMAGENET_MEAN, IMAGENET_STD
from jobs.layout import EXPORT_CONFIG_NAME, EXPORT_WEIGHTS_NAME
from jobs.models import ModelConfig, build_encoder, encoder_in_chans
from jobs.peft import merged_state

log = logging.getLogger(__name__)

WEIGHTS = EXPORT_WEIGHTS_NAME
CONFIG = EXPORT_CONFIG_NAME
MODEL_CARD = "README.md"  # a short model card, as on the Hugging Face Hub


def model_card(config: dict[str, Any]) -> str:
    """A short model card: what the export is, how it was trained, how to load it."""
    vf, pre = config.get("vitforge", {}), config.get("pretrained_cfg", {})
    facts = {k: vf[k] for k in ("stage", "step", "mode", "init", "label_fraction", "labeled_samples",
                                "config_digest", "code_version") if vf.get(k) is not None}
    lines = [f"# {vf.get('stage', 'vitforge export')}: {config['architecture']}", "",
             f"A timm `{config['architecture']}` trained by vitforge "
             f"({'a classifier with ' + str(config['num_classes']) + ' classes' if config.get('num_classes') else 'a headless encoder'}"
             f", {config.get('num_features')} features, global pool `{config.get('global_pool')}`).", "",
             f"- input: {pre.get('input_size')}, mean {pre.get('mean')}, std {pre.get('std')}",
             *(f"- {k}: {v}" for k, v in facts.items()), "", "```python", "import timm",
             'model = timm.create_model("local-dir:/path/to/this/folder", pretrained=True)', "```", ""]
    return "\n".join(lines)


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


def normalization(chans: int, channels: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """The export's ``pretrained_cfg`` mean / std: the data's per-channel train statistics when the stage's
    data described its channels (``jobs._channels.export_channels``), else ImageNet's for RGB."""
    if channels and len(channels.get("mean", ())) == chans:
        return list(channels["mean"]), list(channels["std"])
    return (list(IMAGENET_MEAN), list(IMAGENET_STD)) if chans == 3 else ([0.0] * chans, [1.0] * chans)


def encoder_export_args(model_cfg: ModelConfig, encoder: nn.Module) -> tuple[dict[str, Any], int, int]:
    """(timm ``model_args``, input size, channels) of a headless ViT ``encoder`` built from ``model_cfg``:
    its own input size, and its own channel count (a stage may have taken it from its data's manifest)."""
    kwargs = model_cfg.timm_kwargs()  # num_classes=0 included: the export is headless
    chans = encoder_in_chans(encoder)
    if chans != 3:
        kwargs["in_chans"] = chans
    return kwargs, int(encoder.patch_embed.img_size[0]), chans


def export_encoder(encoder: nn.Module, model_cfg: ModelConfig, dest_url: str, *, rank: int = 0,
                   storage_options: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                   channels: dict[str, Any] | None = None) -> None:
    """Write the headless timm encoder ``encoder`` (built from ``model_cfg``) to ``dest_url``: the
    :func:`export_timm_model` of its architecture, input size and channels; ``channels``: its data's
    (names, dtype, mean, std), else ImageNet's normalisation for RGB and none (mean 0, std 1) for other
    channel counts. Every rank calls (ZeRO gathers)."""
    args, size, _ = encoder_export_args(model_cfg, encoder)
    export_timm_model(encoder, model_cfg.arch, args, dest_url, img_size=size, rank=rank,
                      storage_options=storage_options, extra=extra, channels=channels)


def load_export(url: str, storage_options: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the exported model with timm and load its weights (downloads from any store URL)."""
    return load_export_model(url, storage_options, **overrides)[0]


def read_export_config(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """An export's ``config.json``; a clear error when the export is missing or unfinished."""
    store = Store(url, storage_options)
    try:
        return dict(store.get_json(CONFIG))
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.url_of(CONFIG)} does not exist: {url} is not a finished export "
                                "(has the stage that writes it finished?)") from None


def load_export_model(url: str, storage_options: dict[str, Any] | None = None,
                      **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(timm model, config.json) of the export at ``url`` (``file://``, ``s3://``, a path, …).

    Safetensors only. ``overrides`` go to ``timm.create_model`` (e.g. ``num_classes=10`` for a new
    classifier head: timm then keeps every weight but the exported head; ``drop_path_rate=0.1``).
    """
    config = read_export_config(url, storage_options)
    with local_staging("vitforge-load-") as tmp:
        path = os.path.join(tmp, WEIGHTS)
        Store(url, storage_options).get_file(WEIGHTS, path)
        return load_timm_weights(config["architecture"], path, {**config["model_args"], **overrides},
                                 saved_classes=int(config.get("num_classes", 0))), config


def load_timm_weights(arch: str, weights: str, model_args: dict[str, Any], saved_classes: int) -> nn.Module:
    """``timm.create_model(arch, **model_args)`` with the weights of a local ``.safetensors`` file.

    ``saved_classes``: the classifier size in the file (0: none). When ``model_args`` asks for
    another ``num_classes``, timm drops the saved classifier and keeps every other weight.
    """
    import timm

    if not weights.endswith(".safetensors"):
        raise ValueError(f"{weights}: only .safetensors weights are loaded (no pickle); convert it with "
                         "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    kwargs = {"num_classes": saved_classes, **model_args}
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": weights, "num_classes": saved_classes},
                             **kwargs)


def timm_export_config(architecture: str, model_args: dict[str, Any], img_size: int,
                       extra: dict[str, Any] | None = None, label_names: list[str] | None = None,
                       channels: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm hub-style config for any timm model (``model_args`` includes ``num_classes``); a classifier's
    ``label_names`` (class index -> name, as timm's ``save_for_hf`` writes them) when given; ``channels``:
    its data's (names, dtype, mean, std: ``jobs._channels.export_channels``)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **model_args)
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    num_classes = int(model_args.get("num_classes", getattr(model, "num_classes", 0)))
    chans = int(model_args.get("in_chans", 3))
    mean, std = normalization(chans, channels)
    extra = {**(extra or {}), **({"channels": channels} if channels else {})}
    return {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": int(model.num_features),
        "global_pool": _pool_name(model),
        **({"label_names": list(label_names)} if label_names and len(label_names) == num_classes else {}),
        "model_args": dict(model_args),
        "pretrained_cfg": {
            "input_size": [chans, img_size, img_size], "mean": mean, "std": std,
            "interpolation": "bicubic", "crop_pct": 0.875, "num_classes": num_classes,
            "first_conv": base.get("first_conv"), "classifier": base.get("classifier"),
        },
        "vitforge": {"format": "vitforge-export/1", **(extra or {})},
    }


def export_timm_model(module: nn.Module, architecture: str, model_args: dict[str, Any], dest_url: str, *,
                      img_size: int, rank: int = 0, storage_options: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None,
                      convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                      label_names: list[str] | None = None, channels: dict[str, Any] | None = None) -> None:
    """Export any timm model (a classifier, a CNN, …): ``timm.create_model(architecture, **model_args)``
    must accept the state dict of ``module`` after ``convert`` (e.g. merging LoRA weights, folding a
    BatchNorm into a head). Every rank calls it (ZeRO gathers); rank 0 converts and writes.
    This is the one export path: :func:`export_encoder` (a method's default export) comes here too.
    """
    state = gather_fp32_state_dict(module)
    if rank != 0:
        return
    state = merged_state(module, state)  # LoRA adapters folded in
    if convert is not None:
        state = convert(state)
    _write_export(state, timm_export_config(architecture, model_args, img_size, extra, label_names, channels),
                  dest_url, storage_options)


def _write_export(state: dict[str, torch.Tensor], config: dict[str, Any], dest_url: str,
                  storage_options: dict[str, Any] | None) -> None:
    """Weights first, ``config.json`` last (an export without it is unfinished)."""
    store = Store(dest_url, storage_options)
    with local_staging("vitforge-export-") as tmp:
        path = os.path.join(tmp, WEIGHTS)
        save_file({k: v.contiguous() for k, v in state.items()}, path,
                  metadata={"format": "pt", "architecture": config["architecture"]})
        store.put_file(path, WEIGHTS)
    store.put_bytes(MODEL_CARD, model_card(config).encode())
    store.put_json(CONFIG, config)
    log.info("exported %s (%d tensors, %d classes) to %s", config["architecture"], len(state),
             config["num_classes"], store.url)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """An untrained encoder of the exported shape (for tests and shape checks)."""
    return build_encoder(ModelConfig(arch=config["architecture"], **config["model_args"]))


def _pool_name(model: Any) -> str | None:
    """timm's ``global_pool`` as its name: a ViT keeps a string, a CNN a pooling module (its ``pool_type``)."""
    pool = getattr(model, "global_pool", None)
    if pool is None or isinstance(pool, str):
        return pool
    name = getattr(pool, "pool_type", None)
    return name if isinstance(name, str) else type(pool).__name__

"""Parameter-efficient training of an encoder (``peft:`` on ``mae``, ``dino``, ``distill``, ``finetune``).

    peft: {lora: {rank: 8, alpha: 16, targets: '.*\\.attn\\.(qkv|proj)$'}, unfreeze_last: 1, unfreeze: ['norm.*']}

The encoder is frozen except for: LoRA adapters (the ``peft`` package) on the modules whose name
matches ``lora.targets`` (a regex; default every block's attention ``qkv`` and ``proj``), the
last ``unfreeze_last`` transformer blocks, and the parameters matching any ``unfreeze`` pattern
(``fnmatch`` over parameter names, e.g. ``blocks.11.*``, ``norm.*``, ``pos_embed``). What the
method adds around the encoder (MAE's decoder, DINO's head, a classifier head) trains fully.
Frozen parameters get no gradient and no optimizer state (the engine's AdamW groups hold only
parameters that require grad, so ZeRO partitions only those). ExPLoRA (Khanna et al., 2024) is
``{lora: {rank: 64}, unfreeze_last: 1}`` on a DINO or MAE continuation.

Exports merge every adapter into its base weight (``W + B A * alpha / rank``): a plain timm model.

Two more ways to train a frozen backbone (``finetune``'s ``mode: prompt`` and ``mode: adapter``)
freeze through the same :func:`apply_peft`, with the tensors they add as its ``unfreeze`` patterns:

* **prompts** (shallow VPT, Jia et al., 2022): ``prompt: {tokens: N}`` learnable tokens after the
  class token, which a timm ViT already has as registers (``reg_tokens``, :data:`PROMPT_TENSORS`).
  They get no position embedding (:func:`add_prompt_rows` inserts zero rows, frozen) and VPT's
  uniform init (:func:`init_prompts`); the export is a plain timm ViT with ``reg_tokens=N``.
* **adapters** (AdaptFormer, ``jobs/adaptformer.py``): ``adapter: {bottleneck, scale, dropout}``, a
  parallel bottleneck MLP on every block (:data:`ADAPTER_TENSORS`); the export is the registered
  ``adaptformer_vit`` architecture.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Literal

import torch
import torch.nn as nn

from jobs.config.peft import LORA_TARGETS, AdapterConfig, LoraConfig, PeftConfig, PromptConfig  # noqa: F401
PROMPT_TENSORS = ("reg_token",)             # a timm ViT's registers: the prompt tokens
ADAPTER_TENSORS = ("blocks.*.adapter.*",)   # jobs/adaptformer.py's adapters


def with_trainable(cfg: PeftConfig | None, patterns: tuple[str, ...]) -> PeftConfig:
    """``cfg`` (or nothing else) plus ``patterns`` among the tensors that train."""
    if cfg is None:
        return PeftConfig(unfreeze=list(patterns))
    return cfg.model_copy(update={"unfreeze": [*cfg.unfreeze, *(p for p in patterns if p not in cfg.unfreeze)]})


def apply_peft(encoder: nn.Module, cfg: PeftConfig, trainable: tuple[str, ...] = ()) -> nn.Module:
    """Freeze ``encoder`` but for ``cfg``'s tensors (and the patterns in ``trainable``, e.g. a head).

    Injects LoRA in place (the returned module is ``encoder``); raises when a pattern matches nothing.
    """
    if cfg.lora is not None:
        from peft import LoraConfig as _PeftLora
        from peft import inject_adapter_in_model

        lora = cfg.lora
        encoder = inject_adapter_in_model(_PeftLora(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=lora.targets), encoder)
        if not any("lora_" in name for name, _ in encoder.named_parameters()):
            raise ValueError(f"peft > lora: no module of {type(encoder).__name__} matches targets {lora.targets!r}")
    patterns = [*cfg.unfreeze, *trainable] + [f"blocks.{i}.*" for i in _last_blocks(encoder, cfg.unfreeze_last)]
    for pattern in cfg.unfreeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in encoder.named_parameters()):
            raise ValueError(f"peft > unfreeze: {pattern!r} matches no parameter of {type(encoder).__name__} "
                             f"(names look like {next(iter(dict(encoder.named_parameters())))!r})")
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    return encoder


def add_prompt_rows(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An init's ``state`` (without registers) for ``model`` with prompt tokens: its ``pos_embed`` gains a
    zero row per prompt after the class token's row (a prompt has no position), unless the model adds
    no position to prefix tokens (``no_embed_class``). Every other tensor is unchanged."""
    prompts = int(getattr(model, "num_reg_tokens", 0))
    pos = state.get("pos_embed")
    if pos is None or not prompts or getattr(model, "no_embed_class", False):
        return state
    cls_rows = 1 if getattr(model, "cls_token", None) is not None else 0
    rows = pos.new_zeros(pos.shape[0], prompts, pos.shape[-1])  # [1, N, D]
    return {**state, "pos_embed": torch.cat([pos[:, :cls_rows], rows, pos[:, cls_rows:]], dim=1)}


def init_prompts(model: nn.Module) -> None:
    """VPT's prompt init: ``U(-v, v)``, ``v = sqrt(6 / (C * p * p + D))`` (Xavier over a patch's fan-in)."""
    token = getattr(model, "reg_token", None)
    if token is None:
        return
    p = model.patch_embed.patch_size
    chans = int(model.patch_embed.proj.in_channels)
    bound = math.sqrt(6.0 / float(chans * p[0] * p[1] + token.shape[-1]))
    with torch.no_grad():
        token.uniform_(-bound, bound)


def _last_blocks(encoder: nn.Module, k: int) -> range:
    depth = len(getattr(encoder, "blocks", []))
    if k > depth:
        raise ValueError(f"peft > unfreeze_last: {k} blocks, but {type(encoder).__name__} has {depth}")
    return range(depth - k, depth)


def param_counts(module: nn.Module) -> dict[str, int]:
    """``{"trainable_params", "total_params"}`` (full sizes, also of ZeRO-3 partitioned parameters)."""
    sizes = [(int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for p in module.parameters()]
    return {"trainable_params": sum(n for n, grad in sizes if grad), "total_params": sum(n for n, _ in sizes)}


# ---- merging LoRA for the export -------------------------------------------------------------------


def lora_scalings(module: nn.Module) -> dict[str, float]:
    """``{module name: alpha / rank}`` of every LoRA layer in ``module`` (its default adapter)."""
    return {name: float(m.scaling["default"]) for name, m in module.named_modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold every adapter into its base weight (``W + B @ A * scaling``) and restore timm's names.

    ``scaling``: one value for every layer, or per layer name (:func:`lora_scalings`)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        m = re.match(r"(.*)\.base_layer\.(weight|bias)$", name)
        if m is None:
            out[name] = value
            continue
        prefix, kind = m.groups()
        if kind == "weight":
            a = state[next(k for k in state if k.startswith(f"{prefix}.lora_A.") and k.endswith(".weight"))]  # [r, in]
            b = state[next(k for k in state if k.startswith(f"{prefix}.lora_B.") and k.endswith(".weight"))]  # [out, r]
            s = scaling if isinstance(scaling, float | int) else scaling[prefix]
            value = (value.double() + (b.double() @ a.double()) * s).float()
        out[f"{prefix}.{kind}"] = value
    return out


def merged_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of ``module`` with its LoRA adapters merged (unchanged when it has none)."""
    scalings = lora_scalings(module)
    return merge_lora_state(state, scalings) if scalings else state


def peft_record(cfg: PeftConfig | None) -> dict[str, Any] | None:
    return cfg.model_dump() if cfg is not None else None

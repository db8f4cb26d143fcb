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
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch
import torch.nn as nn

from jobs.config.peft import LORA_TARGETS, LoraConfig, PeftConfig  # noqa: F401  (re-exported)


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

"""The engine's configuration and the pure pieces built from it.

Stage configs (:class:`TrainConfig`, :class:`OptimConfig`), where a worker runs
(:class:`StageContext`), the schedules (pure functions of
the global step), the AdamW parameter groups, and the DeepSpeed config handed to ``accelerate``.
Public names are re-exported by :mod:`jobs.engine`; import them from there.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jobs.config.train import OptimConfig, TrainConfig
from jobs.layout import PREEMPT_NAME

PREEMPT_MARKER = PREEMPT_NAME  # a driver's stop request in the stage directory
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — a preempted stage continues on rerun
METHOD_STATE = "method_state.safetensors"  # a method's extra_state() inside each checkpoint


# ---- configuration ------------------------------------------------------------------------------


@dataclass
class StageContext:
    """Where a worker runs: its rank and the stage's place in the store."""

    stage_url: str                    # <run_root>/stages/<name>
    data_url: str                     # resolved manifest URL
    rank: int = 0
    world_size: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    launcher: str = "torchrun"        # "ray" | "torchrun" | "local"
    refs: dict[str, str] = field(default_factory=dict)  # resolved references, e.g. {"init": <export URL>}


@dataclass(frozen=True)
class StepEnd:
    """What a step callback (``train(..., on_step=[...])``) sees after each optimizer step: its metrics
    are logged, its checkpoint not yet decided. Every rank calls its callbacks."""

    step: int                         # optimizer steps completed
    total_steps: int
    rank: int
    world_size: int
    resumed_from: int | None          # the step this attempt resumed from (None: a fresh start)
    saved_step: int | None            # the newest step this attempt (or its checkpoint) saved
    checkpoints: Any                  # the stage's jobs.checkpoint.CheckpointManager


@dataclass
class TrainResult:
    state: Literal["done", "preempted"]
    step: int
    total_steps: int
    resumed_from: int | None
    losses: list[float]


# ---- schedules (pure functions of the global step) ----------------------------------------------


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then half-cosine from ``peak`` down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    return cfg.optim.base_lr * cfg.batch_size * cfg.grad_accum * world_size / 256


# ---- optimizer ------------------------------------------------------------------------------------


def decayed(name: str, p: torch.Tensor, no_decay_names: set[str]) -> bool:
    """The one weight-decay rule: every tensor is decayed but the 1-D ones (biases, norms) and those named in
    ``no_decay_names`` (by full name or by its last component, e.g. ``pos_embed``)."""
    return not (p.ndim <= 1 or name in no_decay_names or name.split(".")[-1] in no_decay_names)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: set[str],
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups of ``model``'s trainable parameters, split by :func:`decayed`.

    Without ``layer_decay``: two groups, decayed weights then the rest (both always present). With it
    (layer-wise lr decay, as MAE's and BEiT's fine-tuning): one group per (layer, decayed) pair, with
    ``lr_scale = layer_decay ** (L + 1 - layer)``, ordered by layer and no-decay first; the layers are
    those of :func:`vit_layer_id`. The engine multiplies the scheduled lr by a group's ``lr_scale``.
    """
    if layer_decay is None:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if decayed(name, p, no_decay_names) else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = vit_layer_id(name, depth), decayed(name, p, no_decay_names)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


_EMBEDDINGS = ("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "dist_token")


def vit_layer_id(name: str, depth: int) -> int:
    """A parameter's layer for layer decay (MAE's ``get_layer_id_for_vit``): the embeddings and prefix tokens
    are layer 0, ``blocks.i`` is layer ``i + 1``, everything after the blocks (norm, head) is ``depth + 1``.
    A model without ``blocks`` (a CNN) has depth 0: all but its embeddings share one layer, scale 1."""
    if name.startswith(_EMBEDDINGS):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


class FreezableAdamW(torch.optim.AdamW):
    """torch's AdamW, except that a param group with ``frozen: True`` gets no update at all that step.

    Its parameters are stepped as if they had no gradient: no weight decay, no moment update, no
    optimizer state created. Under ZeRO the group's parameters are its flat fp32 partitions, so this
    holds there too.
    """

    def step(self, closure: Any = None) -> Any:
        held = [(p, p.grad) for g in self.param_groups if g.get("frozen") for p in g["params"]]
        for p, _ in held:
            p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, grad in held:
                p.grad = grad


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, no_decay_names: set[str],
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """:class:`FreezableAdamW` over ``groups`` (a method's :meth:`~jobs.method.Method.param_groups`), else over
    the two groups of :func:`param_groups`."""
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay, no_decay_names)
    return FreezableAdamW(groups, lr=cfg.base_lr, betas=cfg.betas, eps=cfg.eps)


# ---- DeepSpeed through accelerate -----------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def use_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """Our DeepSpeed config for ``cfg``, with the stage's ``deepspeed:`` mapping merged over it."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ours = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": (cfg.optim.clip_grad or 0.0) if cfg.optim.clip_grad_mode == "global" else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg, on_gpu)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # we pass torch's AdamW; with offload DeepSpeed would otherwise insist on its CPU Adam build
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ours, cfg.deepspeed)


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory op at process-group start.

    The op serves only ``inference_all_reduce``; training never calls it. Building it costs a C++
    compile on a fresh machine, and its build lock (``~/.cache/torch_extensions/…/lock``) survives a
    ``kill -9`` during the build, after which every later start waits on that lock forever.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_accelerator(cfg: TrainConfig, world_size: int):
    """An ``Accelerator`` driving DeepSpeed. Every rank calls it once per process."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
        _skip_deepspeed_shm_op()
    ds_cfg = deepspeed_config(cfg, world_size, on_gpu)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg)
    # accelerate only knows DeepSpeed on accelerators; naming the gloo backend makes it take the
    # DeepSpeed path on CPU too (it then adopts an existing process group, e.g. Ray Train's).
    handlers = [] if on_gpu else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=cfg.grad_accum,
                       mixed_precision="bf16" if ds_cfg["bf16"]["enabled"] else "no", kwargs_handlers=handlers)

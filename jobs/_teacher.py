"""The EMA teacher shared by self-distillation methods (DINO, iBOT): its copy, update, schedule and state.

The teacher is an EMA copy of the student that DeepSpeed never sees: a full fp32 module on every
rank, updated after each optimizer step from the student's *full* weights (:func:`ema_update`
gathers ZeRO-3 partitions chunk by chunk with ``GatheredParameters``). Its momentum follows a
half-cosine to 1 (:func:`momentum_at`); it is checkpointed as a flat state dict under a prefix
(:func:`teacher_state` / :func:`load_teacher_state`), through a method's ``extra_state`` hook.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn as nn

PREFIX = "teacher."


def ema_copy(student: nn.Module) -> nn.Module:
    """The teacher at step 0: a copy of ``student`` in eval mode with no gradients."""
    return copy.deepcopy(student).eval().requires_grad_(False)


def _full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned parameter keeps its full size there


def _chunks(params: list[nn.Parameter], max_numel: int) -> Iterator[tuple[int, int]]:
    start, size = 0, 0
    for i, p in enumerate(params):
        if size and size + _full_numel(p) > max_numel:
            yield start, i
            start, size = i, 0
        size += _full_numel(p)
    if start < len(params):
        yield start, len(params)


def _gathered(params: list[nn.Parameter]):
    """Full parameters inside the block: ZeRO-3 partitions are all-gathered (read only), others as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, max_numel: int = 1 << 26) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` over the student's full weights.

    Under ZeRO-3 the student's parameters are gathered ``max_numel`` elements at a time (a collective:
    every rank must call it, in step). Fused ``torch._foreach_*`` over each chunk; the teacher keeps
    its own dtype (fp32).
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not an EMA copy")
    for a, b in _chunks(s_params, max_numel):
        with _gathered(s_params[a:b]):
            ts = t_params[a:b]
            ss = [s.detach().to(device=t.device, dtype=t.dtype) for t, s in zip(ts, s_params[a:b])]
            torch._foreach_mul_(ts, momentum)
            torch._foreach_add_(ts, ss, alpha=1.0 - momentum)


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total``."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, total: int, start: float) -> float:
    """The teacher momentum at ``step``: a half-cosine from ``start`` to 1 over ``total`` steps (DINO, iBOT)."""
    return cosine(step, total, start, 1.0)


def teacher_state(teacher: nn.Module, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The teacher's weights and buffers on the CPU, keys under ``prefix`` (for ``extra_state``)."""
    return {f"{prefix}{k}": v.detach().cpu().clone().contiguous() for k, v in teacher.state_dict().items()}


def load_teacher_state(teacher: nn.Module, state: dict[str, torch.Tensor], prefix: str = PREFIX) -> None:
    """Load what :func:`teacher_state` wrote (strict: every key of the teacher, no other under ``prefix``)."""
    teacher.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

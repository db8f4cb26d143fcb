"""Per-parameter gradient clipping on each parameter's *full* gradient, under ZeRO 0-3.

DINO's rule (``utils.clip_gradients`` in facebookresearch/dino): every parameter's gradient is
clipped on its own, ``g <- g * clip / (||g|| + 1e-6)`` when that factor is below 1. Under ZeRO-1/2
each rank holds fragments of the (flat, partitioned) gradients, under ZeRO-3 one partition of each
parameter's gradient; a norm of a fragment is not the parameter's norm. So each rank sums the squares
of its local pieces per parameter, one all-reduce of that ``[n_params]`` vector over the
data-parallel group gives every parameter's full squared norm, and each rank scales its own pieces by
the same factor. The gradients are read where DeepSpeed's own ``safe_get_full_grad`` reads them
(ZeRO-3's local fp32 partition, ZeRO-1/2's ``_hp_mapping`` fragment, ``.grad`` otherwise), between
``engine.backward`` at an accumulation boundary and ``engine.step``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

EPS = 1e-6  # as DINO's clip_gradients


class _Local:
    """One parameter's gradient as this rank holds it: read its piece, scale it in place."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param = param
        self.partitioned = hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")
        self.group = getattr(param, "ds_process_group", None) or getattr(param, "_dp_group", None)

    def piece(self) -> torch.Tensor | None:
        """This rank's share of the full (averaged) gradient, flat; None when it holds none."""
        p = self.param
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the fp32 gradient
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 (and bf16): the fragment of this rank's flat partition
            if mapping is None:
                return None
            frag = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            address = mapping.lp_fragment_address
            if frag.numel() == p.numel() and address.numel != p.numel():  # a full buffer: count our fragment only
                frag = frag.narrow(0, address.start, address.numel)
            return frag
        return None if p.grad is None else p.grad.reshape(-1)

    def scale(self, factor: float) -> None:
        p = self.param
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            safe_set_local_grad(p, safe_get_local_grad(p) * factor)
            return
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            mapping.get_lp_grad_fragment(p._index_in_param_group).mul_(factor)
        elif not hasattr(p, "_hp_mapping") and p.grad is not None:
            p.grad.mul_(factor)


@torch.no_grad()
def clip_grad_per_param(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip each parameter's full gradient to ``max_norm`` (DINO's rule); returns the norms before.

    Every data-parallel rank must call it, in step (one all-reduce when the gradients are partitioned).
    Parameters without a gradient anywhere (norm 0) are left alone.
    """
    locals_ = [_Local(p) for p in params if p.requires_grad]
    device = next((piece.device for x in locals_ if (piece := x.piece()) is not None), torch.device("cpu"))
    squares = torch.zeros(len(locals_), dtype=torch.float64, device=device)
    for i, x in enumerate(locals_):
        piece = x.piece()
        if piece is not None:
            squares[i] = piece.double().pow(2).sum()
    shared = torch.tensor([x.partitioned for x in locals_], dtype=torch.bool, device=device)
    if bool(shared.any()) and dist.is_available() and dist.is_initialized():
        groups = {id(x.group): x.group for x in locals_ if x.partitioned}
        if len(groups) != 1:
            raise RuntimeError(f"per-parameter clipping found parameters in {len(groups)} data-parallel groups; "
                               "it supports one (no model or sequence parallelism): use clip_grad_mode: global")
        partial = torch.where(shared, squares, torch.zeros_like(squares))
        dist.all_reduce(partial, group=next(iter(groups.values())))
        squares = torch.where(shared, partial, squares)
    norms = squares.sqrt()
    factors = (max_norm / (norms + EPS)).tolist()
    for x, factor in zip(locals_, factors):
        if factor < 1:
            x.scale(factor)
    return norms

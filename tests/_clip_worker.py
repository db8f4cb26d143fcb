"""One torchrun rank: per-parameter clipping on DeepSpeed's partitioned gradients vs DINO's rule in plain torch.

    torchrun --nproc-per-node 2 tests/_clip_worker.py OUT.json STAGE...

For each ZeRO stage the same small model (parameter sizes that the 2-way partitions cut through) takes
one backward of a different batch on each rank inside DeepSpeed, then :func:`clip_grad_per_param`
and one AdamW step. The reference, in plain torch on every rank: the gradient averaged over both
ranks' batches, clipped by DINO's ``utils.clip_gradients`` rule (each parameter on its own,
``clip / (||g|| + 1e-6)`` when below 1), and the same AdamW step. Rank 0 writes, per stage, the
largest differences of the full clipped gradients and of the stepped weights, and how many
parameters the rule clipped.
"""

from __future__ import annotations

import json
import os
import sys

import torch

LR = 0.05


def model() -> torch.nn.Module:
    """187 elements: ZeRO-1/2 split the first weight (100) between their two flat partitions; ZeRO-3 splits each one."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 20), torch.nn.GELU(), torch.nn.Linear(20, 3), torch.nn.Linear(3, 1))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 5, generator=g) * (1 + 3 * rank), torch.randn(6, 1, generator=g)


def loss_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((net(x) - y) ** 2).mean() * 10.0


def reference(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """DINO's rule on the rank-averaged gradients, then AdamW: (clipped grads, stepped weights, clip)."""
    net = model()
    loss = sum(loss_of(net, *batch(r)) for r in range(world)) / world
    loss.backward()
    norms = [p.grad.norm(2) for p in net.parameters()]
    clip = float(torch.stack(norms).median())  # about half the parameters get clipped
    for p, norm in zip(net.parameters(), norms):  # utils.clip_gradients
        coef = clip / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in net.parameters()], clip


def under_deepspeed(stage: int, clip: float, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from jobs._engine_config import FreezableAdamW, TrainConfig, make_accelerator
    from jobs._grad_clip import clip_grad_per_param

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cfg = TrainConfig(name="clip", data="/x", zero_stage=stage, batch_size=6, precision="fp32",
                      optim={"clip_grad": clip, "clip_grad_mode": "per_param"})
    world = int(os.environ["WORLD_SIZE"])
    accelerator = make_accelerator(cfg, world)
    net = model()
    engine, _ = accelerator.prepare(net, FreezableAdamW(net.parameters(), lr=LR, weight_decay=0.0))
    assert engine.gradient_clipping() == 0.0  # DeepSpeed's global clipping is off
    engine.set_gradient_accumulation_boundary(is_boundary=True)
    engine.backward(loss_of(engine, *batch(rank)))
    norms = clip_grad_per_param(engine.module.parameters(), clip)
    grads = [safe_get_full_grad(p).detach().clone().reshape(getattr(p, "ds_shape", p.shape))
             for p in engine.module.parameters()]
    engine.step()
    weights = [safe_get_full_fp32_param(p).detach().clone() if stage else p.detach().clone()
               for p in engine.module.parameters()]
    return grads, weights, int((norms > clip).sum())


def main() -> None:
    out, *stages = sys.argv[1:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    want_grads, want_weights, clip = reference(world)
    results = {}
    for stage in stages:
        grads, weights, clipped = under_deepspeed(int(stage), clip, rank)
        results[stage] = {  # relative to the largest entry (the gradients are O(10))
            "grad_diff": max(float((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in zip(grads, want_grads)),
            "weight_diff": max(float((a - b).abs().max()) for a, b in zip(weights, want_weights)),
            "clipped": clipped, "params": len(grads), "clip": clip,
        }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: DeepSpeed's threads at exit sometimes abort it ("terminate called")


if __name__ == "__main__":
    main()

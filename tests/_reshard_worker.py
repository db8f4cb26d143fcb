"""torchrun worker for tests/test_faults_workers.py: DeepSpeed state across a change of world size.

    torchrun --nproc-per-node N tests/_reshard_worker.py train OUT
    torchrun --nproc-per-node M tests/_reshard_worker.py reload SRC OUT

For every ZeRO stage 0-3 in turn (one accelerator each, in one process): ``train`` runs 3 AdamW
steps on rank-dependent data and saves the engine state; ``reload`` builds a fresh engine, loads
SRC's state through :func:`jobs.reshard.load_engine_state` (as the training engine does), saves it
again at once (the state *right after loading*), then trains one more step. The test compares the
saved states, consolidated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from jobs.engine import TrainConfig, build_optimizer, make_accelerator  # noqa: E402
from jobs.reshard import load_engine_state  # noqa: E402

STAGES = (0, 1, 2, 3)


class Tiny(nn.Module):
    """Decayed weights, norm/bias (the no-decay group), BatchNorm statistics (buffers) and a frozen
    parameter that moves (like an EMA copy): everything a checkpoint must carry besides the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(16, affine=False)
        self.frozen = nn.Parameter(torch.linspace(-1, 1, 16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.norm(self.inp(x))) + self.frozen)


def _move_frozen(model, stage: int) -> None:
    """frozen <- 0.5 * frozen + 0.5 * mean of inp.weight's rows (every rank; ZeRO-3 gathers)."""
    import deepspeed

    inner = model.module
    gather = deepspeed.zero.GatheredParameters([inner.frozen, inner.inp.weight], modifier_rank=0) if stage == 3 \
        else contextlib.nullcontext()
    with gather, torch.no_grad():
        inner.frozen.mul_(0.5).add_(inner.inp.weight.mean(dim=1), alpha=0.5)


def _engine(stage: int, world: int):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a fresh DeepSpeed plugin per stage; the process group stays
    cfg = TrainConfig(name="w", data="unused", zero_stage=stage, batch_size=4, optim={"weight_decay": 0.1})
    torch.manual_seed(0)
    accelerator = make_accelerator(cfg, world)
    model = Tiny()
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optim, set()))
    return accelerator, model, optimizer


def _steps(accelerator, model, optimizer, stage: int, n: int, rank: int, world: int, offset: int = 0) -> float:
    loss = torch.zeros(())
    for s in range(n):
        gen = torch.Generator().manual_seed(1000 * (s + offset) + 10 * world + rank)
        loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        _move_frozen(model, stage)
    return float(loss)


def main(mode: str, *dirs: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = dirs[-1]
    for stage in STAGES:
        accelerator, model, optimizer = _engine(stage, world)
        dest = os.path.join(out, f"zero{stage}")
        if mode == "reload":
            src = os.path.join(dirs[0], f"zero{stage}")
            with open(os.path.join(src, "world.json")) as f:
                saved_world = json.load(f)["world_size"]
            local = os.path.join(out, f"restore-rank{rank}", f"zero{stage}")  # each rank its own copy, as the
            shutil.copytree(os.path.join(src, "engine"), os.path.join(local, "engine"))  # engine downloads it
            load_engine_state(accelerator, model, os.path.join(local, "engine"), saved_world, world)
            shutil.rmtree(local)
            accelerator.save_state(os.path.join(dest, "engine"))
            loss = _steps(accelerator, model, optimizer, stage, 1, rank, world, offset=50)
        else:
            loss = _steps(accelerator, model, optimizer, stage, 3, rank, world)
            accelerator.save_state(os.path.join(dest, "engine"))
        assert torch.isfinite(torch.tensor(loss)), loss
        if rank == 0:
            with open(os.path.join(dest, "world.json"), "w") as f:
                json.dump({"world_size": world, "loss": loss}, f)
        accelerator.wait_for_everyone()
    print(f"RESHARD-WORKER {mode} rank {rank}/{world} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])

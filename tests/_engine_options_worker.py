"""One torchrun rank that trains the tiny MAE once per engine option and records what took effect.

    torchrun --nproc-per-node 2 tests/_engine_options_worker.py OUT.json MANIFEST_URL ROOT_URL VARIANT...

A VARIANT names options joined by ``+`` (``offload``, ``compile``, ``checkpointing``; ``off`` for
none) and optionally ``@<zero stage>`` (default 2), e.g. ``offload+checkpointing@3``. Each runs
:func:`jobs.engine.train` afresh in its own stage directory under ``ROOT_URL``, all on the same
process group: the processes, imports and gloo group are the expensive part at this size.

A probe method (MAE with its maths untouched, plus a notebook) records what the engine really
built, as seen from inside the steps: the DeepSpeed config accelerate holds, the ZeRO optimizer's
offload mode and where the optimizer state lives, whether the engine's module is compiled and how
many graphs dynamo compiled, and how often the first encoder and decoder block ran per step (twice
with activation checkpointing: the backward recomputes them). Rank 0 writes
``{variant: {"state", "losses", "probe"}}`` to ``OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

STEPS = 6
STAGE = {
    "kind": "mae",
    "model": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4},
    "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
    "max_steps": STEPS, "batch_size": 8, "zero_stage": 2, "loader_workers": 0,
    "checkpoint": {"every_steps": 1000, "keep_last": 1},
    "optim": {"base_lr": 1.0e-2, "warmup_steps": 2},
}
OPTIONS = {"off": {}, "offload": {"offload_optimizer": True}, "compile": {"compile": True},
           "checkpointing": {"activation_checkpointing": True}}


def variant_config(variant: str, manifest: str) -> dict[str, Any]:
    """The stage mapping of ``variant`` (see the module docstring)."""
    options, _, zero = variant.partition("@")
    stage = {**STAGE, "name": variant.replace("+", "-").replace("@", "-zero"), "data": manifest}
    for option in options.split("+"):
        stage.update(OPTIONS[option])
    if zero:
        stage["zero_stage"] = int(zero)
    return stage


def _probe_class():
    from jobs.mae import MAEMethod

    class Probe(MAEMethod):
        """MAE plus a record of what the engine handed it."""

        def __init__(self, cfg, rank: int) -> None:
            super().__init__(cfg, rank)
            self.record: dict[str, Any] = {}
            self.block_runs = {"encoder": 0, "decoder": 0}

        def build_model(self):
            model = super().build_model()
            self._count_runs(model.encoder.blocks[0], "encoder")
            self._count_runs(model.decoder_blocks[0], "decoder")
            return model

        def _count_runs(self, block: torch.nn.Module, which: str) -> None:
            """Count executions of ``block.forward`` (a checkpoint's recompute bypasses module hooks)."""
            forward = block.forward

            def counted(*args, **kwargs):
                self.block_runs[which] += 1
                return forward(*args, **kwargs)

            block.forward = counted

        def step(self, model, batch, step):
            if not self.record:
                self.record = _inspect(model)
            if step >= 1:  # after the first update the optimizer has state
                self.record.setdefault("optimizer_state_devices", _state_devices(model))
            return super().step(model, batch, step)

    return Probe


def _inspect(engine) -> dict[str, Any]:
    """What the DeepSpeed engine handed to a method really is (on the first step)."""
    from accelerate.state import AcceleratorState

    ds_config = AcceleratorState().deepspeed_plugin.deepspeed_config
    zero_opt = engine.optimizer  # DeepSpeed's ZeRO optimizer around ours (ours itself at stage 0)
    return {
        "engine": type(engine).__name__,
        "accelerate_offload_optimizer": ds_config["zero_optimization"].get("offload_optimizer"),
        "engine_zero_cpu_offload": bool(engine.zero_cpu_offload()),
        "zero_optimizer": type(zero_opt).__name__,
        # ZeRO-1/2 call the mode cpu_offload, ZeRO-3 offload_optimizer
        "zero_optimizer_offloads": bool(getattr(zero_opt, "cpu_offload", False)
                                        or getattr(zero_opt, "offload_optimizer", False)),
        "inner_optimizer": type(getattr(zero_opt, "optimizer", zero_opt)).__name__,
        "engine_is_compiled": bool(getattr(engine, "is_compiled", False)),
        "encoder_grad_checkpointing": bool(engine.module.encoder.grad_checkpointing),
    }


def _state_devices(engine) -> list[str]:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({t.device.type for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim})


def _fresh_accelerate() -> None:
    """A new Accelerator per variant in the same process (the process group stays)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def run_variant(variant: str, manifest: str, root: str, rank: int, world: int) -> dict[str, Any]:
    import torch._dynamo

    from jobs.engine import StageContext, train
    from jobs.mae import MAEConfig

    cfg = MAEConfig.model_validate(variant_config(variant, manifest))
    method = _probe_class()(cfg, rank)
    ctx = StageContext(stage_url=f"{root.rstrip('/')}/{cfg.name}", data_url=manifest, rank=rank, world_size=world,
                       launcher="torchrun")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _fresh_accelerate()
    start = time.monotonic()
    result = train(method, cfg, ctx)
    seconds = time.monotonic() - start
    probe = {**method.record, "block_runs_per_step": {k: v / STEPS for k, v in method.block_runs.items()},
             "dynamo_unique_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    return {"state": result.state, "losses": result.losses, "probe": probe, "seconds": seconds}


def main() -> None:
    out, manifest, root, *variants = sys.argv[1:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = {variant: run_variant(variant, manifest, root, rank, world) for variant in variants}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

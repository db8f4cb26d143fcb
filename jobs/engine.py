"""The one training loop every method runs: ``train(method, cfg, ctx)``.

A *method* (``jobs/mae.py``, …) supplies only what is special to it: a subclass of
:class:`jobs.method.Method` with its model, its ``step(model, batch, step) -> (loss, metrics)``, its
transform, and optionally the other hooks that class documents (``after_step``, …). The engine supplies everything else, once:

* DeepSpeed ZeRO 0–3 through ``accelerate`` (:func:`deepspeed_config`; a stage's ``deepspeed:``
  mapping is merged over ours), bf16 on GPU / fp32 on CPU, gradient accumulation, clipping;
  gloo on CPU, nccl on GPU. Under Ray Train the process group already exists; under ``torchrun``
  accelerate creates it from the environment.
* AdamW with no-decay groups and, for a method that declares ``layer_decay``, layer-wise lr decay
  (:func:`param_groups`, one rule); ``lr = base_lr * global_batch / 256``, linear warmup then cosine,
  a pure function of the global step (:func:`lr_at`): nothing to save, nothing to drift.
* Checkpoints through :class:`jobs.checkpoint.CheckpointManager` (engine state via accelerate, loader
  position, step, RNG, resolved config + digest, code version, metrics so far); resume from the
  newest committed one at the exact data position, refusing a different architecture or config.
  When to save is the stage's ``checkpoint:`` policy (``jobs/_ckpt_policy.py``); with
  ``every_minutes`` rank 0's clock decides, carried in the step's one all-reduce (no extra collective).
* Step callbacks: ``train(..., on_step=[fn])`` calls ``fn(StepEnd)`` after each step on every rank
  (tests install their fault injection this way, ``jobs/_faults.py``).
* Preemption: SIGTERM/SIGINT (or a ``PREEMPT`` marker a driver writes in the stage directory)
  finishes the current step, saves synchronously and returns ``state="preempted"``.
* Metrics per step (loss, lr, grad norm, images/s, step time, MFU on GPU) by rank 0, uploaded as
  numbered append-only chunks under ``<stage>/metrics/`` (:mod:`jobs.metrics`); a progress bar on
  rank 0 only on a terminal.

One *step* is one optimizer update (``grad_accum`` micro-batches); checkpoints fall on step
boundaries only, so the saved loader position is always exact.

Layout: this module is the public surface. The code lives in ``jobs/_engine_config.py``
(configs, schedules, optimizer groups, DeepSpeed/accelerate set-up),
``jobs/_engine_watch.py`` (preemption, metrics) and ``jobs/_engine_loop.py`` (the loop).
"""

from __future__ import annotations

from typing import Any

from cluster.storage import Store
from jobs._engine_config import (METHOD_STATE, PREEMPT_MARKER, PREEMPTED_EXIT_CODE, OptimConfig, StageContext,
                                 StepEnd, TrainConfig, TrainResult, build_optimizer, deepspeed_config, lr_at, make_accelerator,
                                 param_groups, peak_lr, use_bf16)
from jobs._engine_loop import train
from jobs.layout import RunLayout
from jobs.method import Method
from jobs._engine_watch import PEAK_TFLOPS_BF16, PreemptionWatch, peak_flops
from jobs.metrics import MetricsLog

# what a method author needs; the rest stays importable from here for the engine's own callers
__all__ = ["Method", "OptimConfig", "StageContext", "TrainConfig", "TrainResult", "train", "use_bf16"]


def stage_store(run_root: str, stage: str, storage_options: dict[str, Any] | None = None) -> Store:
    return Store(RunLayout(run_root).stage(stage).url, storage_options)

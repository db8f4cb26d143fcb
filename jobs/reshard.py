"""Resume a training stage on another number of workers than the one its checkpoint was written by.

What depends on the number of workers W, and what the engine does when it changes (N -> M):

* **the global batch** (images per optimizer step: ``batch_size x grad_accum x W``) is the stage's
  invariant: the learning rate is scaled by it and the epoch length is counted in it.
  :func:`batch_shape` keeps it, choosing the per-worker micro-batch (never larger than the
  checkpoint's) and gradient accumulation for M workers; a global batch that M does not divide is
  refused (:class:`WorldSizeError`, naming the numbers of workers that would work).
* **DeepSpeed state**: under ZeRO-1/2/3 the fp32 master weights and the Adam moments are
  partitioned per data-parallel rank. :func:`load_engine_state` converts the checkpoint to
  DeepSpeed's *universal* format (``deepspeed.checkpoint.ds_to_universal``: one file per parameter
  and state) and loads that, re-partitioned for M ranks, then restores what a universal checkpoint
  leaves out (buffers such as BatchNorm statistics, frozen parameters) from the module state, and
  keeps each optimizer group's settings (DeepSpeed's ZeRO-3 universal loader gives every group the
  first group's weight decay). Without ZeRO the state is whole on every rank and loads as it is.
* **the data position**: the loader re-splits what is left of the epoch over M ranks, so every
  remaining sample is served exactly once (``dataprep/loader.py``).
* **per-rank RNG streams**: a rank that did not exist in the checkpoint gets its own stream,
  derived from (seed, step, rank) (:func:`seed_new_rank`), rather than a copy of rank 0's.

Every rank converts the checkpoint on its own (ranks on different nodes share no disk), in its
local restore directory, which the checkpoint manager removes afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs._ckpt_state import CheckpointMismatchError
from jobs._safe_load import safe_loading
from jobs.checkpoint import CheckpointInfo, latest_committed

log = logging.getLogger(__name__)

MODEL_TAG = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag inside the engine directory


class WorldSizeError(CheckpointMismatchError):
    """The checkpoint cannot continue on this number of workers (its global batch does not split)."""


def saved_shape(meta: Mapping[str, Any], default: tuple[int, int]) -> tuple[int, int, int]:
    """(batch_size, grad_accum, world_size) a checkpoint was trained with (``default`` for missing keys)."""
    config = meta.get("config") or {}
    return (int(config.get("batch_size", default[0])), int(config.get("grad_accum", default[1])),
            int(meta.get("world_size", 1)))


def batch_shape(meta: Mapping[str, Any] | None, world_size: int, default: tuple[int, int],
                where: str = "the checkpoint") -> tuple[int, int]:
    """(batch_size, grad_accum) per worker that continue checkpoint ``meta`` on ``world_size`` workers.

    No checkpoint: ``default`` (the stage's own). The same number of workers: the checkpoint's
    shape (which may itself come from an earlier change). Another number: the same global batch,
    with the largest micro-batch that divides the per-worker share and is not larger than the
    checkpoint's, and accumulation for the rest. Raises :class:`WorldSizeError` when
    ``world_size`` does not divide the global batch.
    """
    if not meta:
        return default
    batch, accum, saved_world = saved_shape(meta, default)
    if saved_world == world_size:
        return batch, accum
    total = batch * accum * saved_world
    if total % world_size:
        fits = [w for w in range(1, total + 1) if total % w == 0]
        raise WorldSizeError(
            f"{where} (step {meta.get('step')}) was written by {saved_world} workers with a global batch of "
            f"{total} images per step (batch_size {batch} x grad_accum {accum} x {saved_world} workers); "
            f"{world_size} workers cannot split it evenly. Resume on a number of workers that divides {total} "
            f"({', '.join(map(str, fits[:12]))}{', ...' if len(fits) > 12 else ''}), or start the stage afresh.")
    share = total // world_size
    micro = max(d for d in range(1, min(batch, share) + 1) if share % d == 0)
    return micro, share // micro


@dataclass(frozen=True)
class ResumePlan:
    """How a stage continues on ``world_size`` workers, computed once (:func:`resume_plan`) and used by
    the driver's pre-flight, the worker that builds the method and the engine alike."""

    checkpoint: CheckpointInfo | None   # the newest committed one; None: the stage starts afresh
    world_size: int
    batch_size: int                     # per worker, see :func:`batch_shape`
    grad_accum: int

    @property
    def reshaped(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.world_size != self.world_size

    def shape(self, cfg: Any) -> Any:
        """``cfg`` (a TrainConfig) with this plan's batch_size / grad_accum (itself when they are its own)."""
        if (self.batch_size, self.grad_accum) == (cfg.batch_size, cfg.grad_accum):
            return cfg
        return cfg.model_copy(update={"batch_size": self.batch_size, "grad_accum": self.grad_accum})


def resume_plan(stage_url: str, storage_options: dict[str, Any] | None, world_size: int, cfg: Any) -> ResumePlan:
    """The :class:`ResumePlan` of stage config ``cfg`` at ``stage_url`` on ``world_size`` workers (reads the
    newest committed checkpoint; raises :class:`WorldSizeError` when its global batch does not split)."""
    info = latest_committed(stage_url, storage_options)
    batch, accum = batch_shape(info.meta if info else None, world_size, (cfg.batch_size, cfg.grad_accum),
                               where=f"checkpoint {info.url}" if info else "")
    return ResumePlan(info, world_size, batch, accum)


def load_engine_state(accelerator: Any, engine: Any, engine_dir: str, saved_world: int, world_size: int) -> None:
    """:func:`_load_engine_state` with every ``torch.load`` weights-only (:mod:`jobs._safe_load`)."""
    with safe_loading():
        _load_engine_state(accelerator, engine, engine_dir, saved_world, world_size)


def _load_engine_state(accelerator: Any, engine: Any, engine_dir: str, saved_world: int, world_size: int) -> None:
    """Load ``accelerator.save_state``'s directory ``engine_dir`` into the prepared DeepSpeed ``engine``.

    The same number of workers: ``accelerator.load_state`` as it is. Another one: partitioned
    (ZeRO) optimizer state goes through a universal checkpoint, re-partitioned for ``world_size``
    ranks; the optimizer's parameter-group settings (weight decay, lr scale, ...) are kept as this
    run built them (DeepSpeed's ZeRO-3 universal loader would give every group the first group's);
    buffers and frozen parameters come from the checkpoint's module state. Every rank calls it, with
    its own local copy of the checkpoint (the conversion writes beside ``engine_dir``).
    """
    if saved_world == world_size:
        accelerator.load_state(engine_dir)
        return
    source = os.path.join(engine_dir, MODEL_TAG)
    if not glob.glob(os.path.join(source, "*optim_states.pt")):  # not partitioned: whole on every rank
        accelerator.load_state(engine_dir)
        return
    if not engine.zero_optimization():
        raise WorldSizeError(
            f"{source} holds partitioned optimizer state without ZeRO (DeepSpeed's bf16 optimizer at "
            f"zero_stage 0); it cannot be re-partitioned for {world_size} workers: resume on {saved_world} "
            "workers, or train with zero_stage >= 1")
    universal = engine_dir.rstrip("/") + "-universal"
    stateless = fill_missing_state(source)
    to_universal(source, os.path.join(universal, MODEL_TAG))
    inner = _inner_optimizer(engine)
    groups = inner.param_groups
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    engine._config.load_universal_checkpoint = True  # read by DeepSpeed's load_checkpoint only
    try:
        accelerator.load_state(universal)
    finally:
        engine._config.load_universal_checkpoint = False
    for group, kept in zip(groups, settings):
        group.update(kept)
    wrapper = engine.optimizer  # its flat fp32 partitions, in the order of the files' state entries
    flat = getattr(wrapper, "fp32_partitioned_groups_flat", None) or wrapper.single_partition_of_fp32_groups
    for k in stateless:  # back to "no optimizer state", as in the run that saved it
        inner.state.pop(flat[k], None)
    _load_untrained(engine, source)


def fill_missing_state(source: str) -> set[int]:
    """Give every flat parameter of the ZeRO optimizer files in ``source`` Adam moments, in place.

    A parameter group that never took a step (e.g. DINO's last layer while frozen: no optimizer state
    at all, :class:`~jobs._engine_config.FreezableAdamW`) has no (or an empty) state entry, and ``ds_to_universal``
    cannot convert a checkpoint with one (a KeyError, or at ZeRO-1/2 a group silently left out).
    Zeros with step 0 are injected for the conversion; returns their indices (into the ZeRO optimizer's
    flat fp32 partitions), whose state the caller drops again after the load."""
    missing: set[int] = set()
    for path in sorted(glob.glob(os.path.join(source, "*optim_states.pt"))):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        sd = saved["optimizer_state_dict"]
        if "fp32_flat_groups" in sd:  # ZeRO-3
            state, flats = sd["optimizer_state_dict"]["state"], sd["fp32_flat_groups"]
        else:  # ZeRO-1/2
            state, flats = sd["base_optimizer_state"]["state"], sd["single_partition_of_fp32_groups"]
        here = [k for k in range(len(flats)) if "exp_avg" not in state.get(k, {})]  # ZeRO-2 may hold {}
        if not here:
            continue
        step = next((v["step"] for v in state.values() if "step" in v), None)
        for k in here:
            state[k] = {"exp_avg": torch.zeros_like(flats[k]), "exp_avg_sq": torch.zeros_like(flats[k]),
                        **({"step": torch.zeros_like(step) if torch.is_tensor(step) else 0} if step is not None else {})}
        torch.save(saved, path)
        missing.update(here)
    return missing


def _load_untrained(engine: Any, source: str) -> None:
    """Buffers (e.g. BatchNorm statistics) and frozen parameters from DeepSpeed checkpoint folder ``source``.

    A universal checkpoint restores what the optimizer holds; DeepSpeed then skips the module's own
    state, so these would keep the values this run built them with.
    """
    module = engine.module
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())
    if not frozen and not buffers:
        return
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather from every rank's partition files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        saved = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(source), tag=os.path.basename(source))
    else:  # ZeRO-1/2: rank 0 saved the whole module
        saved = torch.load(os.path.join(source, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=True)["module"]
    missing = sorted(n for n in frozen if n not in saved)
    if missing:
        raise CheckpointMismatchError(f"{source} has no saved value for the frozen parameter(s) {', '.join(missing)}")
    with torch.no_grad():
        for name, buf in buffers.items():
            if name in saved:  # persistent buffers only
                buf.copy_(saved[name].to(buf.dtype))
        if not frozen:
            return
        params = list(frozen.values())
        if engine.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                for name, p in frozen.items():
                    p.data.copy_(saved[name].to(p.dtype))
        else:
            for name, p in frozen.items():
                p.data.copy_(saved[name].to(p.dtype))


def to_universal(source: str, dest: str) -> None:
    """Convert DeepSpeed checkpoint folder ``source`` (one tag) to the universal format in ``dest``."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=dest, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # its prints and progress bars
        ds_to_universal.main(args)
    log.debug("ds_to_universal %s -> %s:\n%s", source, dest, out.getvalue()[-4000:])


def _inner_optimizer(engine: Any) -> Any:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (its param_groups carry our settings)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def seed_new_rank(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, step, rank): the streams of a rank new to the run."""
    value = int.from_bytes(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank, 0x5E5EED]).generate_state(2,
                           np.uint32).tobytes(), "little")
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)
    torch.manual_seed(value & 0x7FFFFFFFFFFFFFFF)

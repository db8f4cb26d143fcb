"""The training loop behind :func:`jobs.engine.train`: set-up, resume, steps, checkpoints, export.

:func:`train` is re-exported by :mod:`jobs.engine`; import it from there.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cluster.storage import Store
from dataprep.loader import StreamingLoader
from jobs._engine_config import (METHOD_STATE, StageContext, StepEnd, TrainConfig, TrainResult, build_optimizer,
                                 lr_at, make_accelerator, peak_lr)
from jobs._engine_watch import PreemptionWatch, peak_flops
from jobs._extensions import resume_expect
from jobs._grad_clip import clip_grad_per_param
from jobs._live import open_live
from jobs.checkpoint import CheckpointError, CheckpointManager, capture_rng_state, code_version, restore_rng_state
from jobs.layout import EXPORT_NAME, METRICS_NAME
from jobs.method import Method
from jobs.metrics import MetricsLog
from jobs.peft import param_counts
from jobs.reshard import ResumePlan, load_engine_state, resume_plan, seed_new_rank

log = logging.getLogger(__name__)


# ---- the loop -------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the loop touches, built once by :func:`_setup`."""

    cfg: TrainConfig
    ctx: StageContext
    method: Method
    accelerator: Any
    model: Any                 # the DeepSpeed engine (its forward scales the loss for accumulation)
    module: torch.nn.Module    # the method's own module inside it
    optimizer: Any
    loader: StreamingLoader
    ckpt: CheckpointManager
    metrics: MetricsLog
    store: Store
    total_steps: int
    warmup_steps: int
    peak_lr: float
    meta_expect: dict[str, Any]
    plan: ResumePlan
    step: int = 0
    resumed_from: int | None = None
    saved_step: int | None = None
    losses: list[float] = field(default_factory=list)
    val: StreamingLoader | None = None  # the val split, for a method with eval_step
    steps_per_epoch: int = 1
    live: Any = None  # rank 0's heartbeat + trackers (jobs/_live.py)
    params: dict[str, int] = field(default_factory=dict)  # trainable / total parameter counts
    on_step: Sequence[Callable[[StepEnd], None]] = ()  # step callbacks (tests install fault injection here)


def train(method: Method, cfg: TrainConfig, ctx: StageContext, watch: PreemptionWatch | None = None,
          plan: ResumePlan | None = None, on_step: Sequence[Callable[[StepEnd], None]] = ()) -> TrainResult:
    """Train ``method`` per ``cfg``; resume from the stage's newest committed checkpoint if any.

    Every rank calls it. Returns when the stage is done or preempted (after a synchronous
    checkpoint); raises on errors, leaving the last committed checkpoint to resume from.
    ``watch``: a caller that must catch stop requests earlier (during start-up) passes its own.
    ``plan``: the resume plan the caller built ``method`` from (:func:`jobs.reshard.resume_plan` of
    ``cfg``, the stage's config as written); computed here when not given.
    ``on_step``: callbacks called with a :class:`StepEnd` after each step is logged, before its
    checkpoint is decided (every rank calls them; e.g. a test's fault injection, ``jobs/_faults.py``).
    """
    watch = watch or PreemptionWatch(Store(ctx.stage_url, ctx.storage_options) if ctx.rank == 0 else None)
    try:
        run = _setup(method, cfg, ctx, plan)
        run.on_step = tuple(on_step)
        _resume(run)
        if ctx.rank == 0:
            run.live = open_live(run.store, cfg, ctx.stage_url, run.total_steps, run.step, run.resumed_from)
        state = _loop(run, watch)
        if run.live is not None:
            run.live.close(state)
        run.ckpt.close()
        if state == "done":
            _export(run)
        run.metrics.publish(sync=True)
        return TrainResult(state, run.step, run.total_steps, run.resumed_from, run.losses)
    finally:
        watch.close()


def _setup(method: Method, cfg: TrainConfig, ctx: StageContext, plan: ResumePlan | None) -> _Run:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every attempt
    digest = cfg.digest()  # of the config as written: a reshaped resume keeps its digest
    plan = plan or resume_plan(ctx.stage_url, ctx.storage_options, ctx.world_size, cfg)
    cfg = plan.shape(cfg)  # the per-worker batch that keeps the checkpoint's global batch
    accelerator = make_accelerator(cfg, ctx.world_size)
    method.setup(ctx)
    torch.manual_seed(cfg.seed)  # again: setup may draw (distill builds its teacher), the weights must not depend on it
    model = method.build_model()
    params = param_counts(model)
    optimizer = build_optimizer(model, cfg.optim, method.no_weight_decay(model), method.param_groups(model, cfg.optim))
    loader = StreamingLoader(ctx.data_url, split="train", batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size, transform=method.train_transform(),
                             num_workers=cfg.loader_workers, pin_memory=torch.cuda.is_available(), partial="drop",
                             storage_options=ctx.storage_options, subset=method.train_sample_ids(),
                             mix=method.train_mix())
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        model.compile()
    store = Store(ctx.stage_url, ctx.storage_options)
    ckpt = CheckpointManager(ctx.stage_url, cfg.checkpoint, rank=ctx.rank, world_size=ctx.world_size,
                             storage_options=ctx.storage_options)
    steps_per_epoch = loader.batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"stage {cfg.name!r}: {loader.num_samples} training samples give no full step of "
                         f"{cfg.batch_size} x {cfg.grad_accum} per worker on {ctx.world_size} workers; "
                         "lower batch_size or grad_accum")
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_epochs * steps_per_epoch)
    method.set_run_length(total, steps_per_epoch)
    expect = {"arch": method.arch(), "config_digest": digest}  # not world_size: see jobs/reshard.py
    if method.init_source is not None:  # the weights it started from: a resume never mixes two inits
        expect["init_digest"] = method.init_source.digest
    return _Run(cfg, ctx, method, accelerator, model, accelerator.unwrap_model(model), optimizer, loader, ckpt,
                MetricsLog(store, ctx.rank == 0), store, total, min(warmup, total), peak_lr(cfg, ctx.world_size), expect,
                plan, val=_val_loader(method, cfg, ctx, loader), steps_per_epoch=steps_per_epoch, params=params)


def _val_loader(method: Method, cfg: TrainConfig, ctx: StageContext, train: StreamingLoader) -> StreamingLoader | None:
    """The val split in a fixed order, padded so every rank runs the same number of (collective) forwards."""
    transform = method.eval_transform()
    if transform is None:
        return None
    if "val" not in train.manifest.splits:
        log.warning("stage %s: the manifest has no val split; no per-epoch evaluation", cfg.name)
        return None
    return StreamingLoader(ctx.data_url, split="val", batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                           world_size=ctx.world_size, transform=transform, shuffle=False,
                           num_workers=cfg.loader_workers, partial="pad", storage_options=ctx.storage_options,
                           persistent_workers=False)  # one pass per evaluation: no workers idle between them


def _resume(run: _Run) -> None:
    """Continue from the newest committed checkpoint, if there is one (every rank calls)."""
    info = run.plan.checkpoint
    if info is None:
        return
    log.info("resuming stage %s from %s", run.cfg.name, info.url)
    if info.world_size != run.ctx.world_size and run.ctx.rank == 0:
        log.warning("resuming %d-worker checkpoint step %d on %d workers: global batch %d kept as batch_size %d x "
                    "grad_accum %d per worker", info.world_size, info.step, run.ctx.world_size,
                    run.cfg.batch_size * run.cfg.grad_accum * run.ctx.world_size, run.cfg.batch_size,
                    run.cfg.grad_accum)
    metrics_text: list[str] = []

    def read(local_dir: str) -> None:
        load_engine_state(run.accelerator, run.model, os.path.join(local_dir, "engine"), info.world_size,
                          run.ctx.world_size)
        _load_method_state(run, local_dir)
        path = os.path.join(local_dir, METRICS_NAME)
        if os.path.exists(path):
            with open(path) as f:
                metrics_text.append(f.read())

    meta = run.ckpt.restore(read, info, expect=resume_expect(run.meta_expect, run.ctx.stage_url,
                                                           run.ctx.storage_options))
    run.loader.load_state_dict(meta["loader"])
    restore_rng_state(meta["rng"])
    run.step = run.resumed_from = run.saved_step = int(meta["step"])
    if run.ctx.rank >= info.world_size:  # no stream of its own in the checkpoint
        seed_new_rank(run.cfg.seed, run.step, run.ctx.rank)
    if metrics_text:
        run.metrics.restore(metrics_text[-1], run.step)  # the checkpoint restored (after any fallback)


def _loop(run: _Run, watch: PreemptionWatch) -> Literal["done", "preempted"]:
    bar = _progress_bar(run)
    try:
        batches = _micro_batches(run)
        while run.step < run.total_steps:
            loss, extra, seconds = _one_step(run, batches)
            run.step += 1
            stop, time_due = _all_agree(run, loss, watch.requested.is_set())
            if run.val is not None and (run.step % run.steps_per_epoch == 0 or run.step == run.total_steps):
                extra = {**extra, **_evaluate(run)}
            _log_step(run, extra, seconds)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run.losses[-1]:.4f}")
            _callbacks(run)
            if stop:
                _save(run, sync=True)
                return "preempted"
            if run.step < run.total_steps and run.ckpt.due(run.step, time_flag=time_due):
                _save(run, sync=False)
        if run.saved_step != run.step:
            _save(run, sync=True)
        return "done"
    finally:
        run.loader.close()  # its persistent workers are not needed past the last step (or a stop)
        if bar is not None:
            bar.close()


def _micro_batches(run: _Run) -> Iterator[dict[str, Any]]:
    """Endless micro-batches across epochs, starting at the loader's (possibly restored) position."""
    epoch = run.loader.epoch
    while True:
        run.loader.set_epoch(epoch)
        yield from run.loader
        epoch += 1


def _one_step(run: _Run, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float], float]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss (a tensor)."""
    lr = lr_at(run.step, run.total_steps, run.warmup_steps, run.peak_lr, run.cfg.optim.min_lr)
    wd = run.method.weight_decay_at(run.step)
    frozen = run.method.frozen_groups(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["frozen"] = group.get("name") in frozen  # FreezableAdamW skips the group entirely
        if wd is not None and group.setdefault("decayed", group["weight_decay"] > 0):  # no-decay groups stay 0
            group["weight_decay"] = wd
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    extra: dict[str, float] = {}
    run.model.train()
    data_wait = 0.0  # seconds this step waited for the loader (part of the step's time)
    for _ in range(run.cfg.grad_accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t_wait
        batch = _on_device(batch, run.module)
        with run.accelerator.accumulate(run.model):
            loss, extra = run.method.step(run.model, batch, run.step)
            _backward(run, loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        total += loss.detach().double().cpu()
    run.method.after_step(run.module, run.step)
    seconds = time.perf_counter() - start
    extra = {**extra, "lr": lr, "data_wait_s": data_wait}
    norm = getattr(run.model, "get_global_grad_norm", lambda: None)()
    if norm is not None:
        extra["grad_norm"] = float(norm)
    return total / run.cfg.grad_accum, extra, seconds


def _backward(run: _Run, loss: torch.Tensor) -> None:
    """Backward; at an accumulation boundary, DeepSpeed's step (``clip_grad_mode: global`` clips inside it).

    ``per_param`` clips each parameter's full gradient between DeepSpeed's backward (which reduces and
    partitions the gradients at the boundary) and its step — the two halves of ``accelerator.backward``.
    """
    optim = run.cfg.optim
    if optim.clip_grad is None or optim.clip_grad_mode == "global":
        run.accelerator.backward(loss)
        return
    engine, boundary = run.model, run.accelerator.sync_gradients
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss)
    if boundary:
        clip_grad_per_param(run.module.parameters(), optim.clip_grad)
        engine.step()


def _on_device(batch: Any, module: torch.nn.Module) -> Any:
    """``batch`` (tensors, lists and dicts of them) on ``module``'s device; floating tensors in its dtype."""
    p = next(module.parameters())
    if isinstance(batch, torch.Tensor):
        return batch.to(p.device, dtype=p.dtype if batch.is_floating_point() else None, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _on_device(v, module) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_on_device(v, module) for v in batch)
    return batch


def _all_agree(run: _Run, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """The step's one collective: the mean loss over ranks (appended to ``run.losses``), whether any rank
    must stop, and whether a timed checkpoint is due by rank 0's clock (``checkpoint.every_minutes``)."""
    time_due = run.ctx.rank == 0 and run.ckpt.schedule.time_due()
    mean, stop, due = agree(float(loss), stop_requested, time_due, run.ctx.world_size, run.accelerator.device)
    run.losses.append(mean)
    return stop, due


def agree(loss: float, stop_requested: bool, time_due: bool, world_size: int,
          device: torch.device | str = "cpu") -> tuple[float, bool, bool]:
    """(mean loss, any rank's stop request, any rank's ``time_due``) in one all-reduce over the gang
    (every rank calls it; only rank 0 passes a true ``time_due``: its clock decides for all)."""
    buf = torch.tensor([loss, float(stop_requested), float(time_due)], dtype=torch.float64, device=device)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(buf)
    return float(buf[0]) / world_size, bool(buf[1] > 0), bool(buf[2] > 0)


def _log_step(run: _Run, extra: dict[str, float], seconds: float) -> None:
    images = run.cfg.batch_size * run.cfg.grad_accum * run.ctx.world_size
    record = {"step": run.step, "epoch": run.loader.epoch, "loss": run.losses[-1], "step_time_s": seconds,
              "images_per_s": images / seconds if seconds > 0 else None, **extra}
    if run.step == 1:
        record.update(run.params)
    peak = peak_flops()
    flops = run.method.flops_per_sample() if peak and seconds > 0 else None
    if flops is not None:
        record["mfu"] = flops * images / seconds / (peak * run.ctx.world_size)
    run.metrics.add(record)
    if run.live is not None:
        run.live.on_step(record)


def _save(run: _Run, sync: bool) -> None:
    """Checkpoint after ``run.step`` (every rank calls; the upload is asynchronous unless ``sync``)."""
    step = run.step

    method_state = run.method.extra_state()

    def write(local_dir: str) -> None:
        run.accelerator.save_state(os.path.join(local_dir, "engine"))
        if method_state is not None and run.ctx.rank == 0:
            save_file(method_state, os.path.join(local_dir, METHOD_STATE))
        if run.ctx.rank == 0:  # the lines no chunk is known to hold yet (a resume republishes them)
            with open(os.path.join(local_dir, METRICS_NAME), "w") as f:
                f.write(run.metrics.unpublished_text())

    meta = {"step": step, "epoch": run.loader.epoch, "loader": run.loader.state_dict(), "rng": capture_rng_state(),
            "config": run.cfg.model_dump(mode="json"), "code_version": code_version(), **run.meta_expect,
            "world_size": run.ctx.world_size}
    run.ckpt.save(step, write, meta, sync=sync)
    run.saved_step = step
    run.metrics.publish(sync=False)
    if run.live is not None:
        run.live.checkpointed()


def _load_method_state(run: _Run, local_dir: str) -> None:
    """Hand a method its ``extra_state`` back (every rank reads rank 0's file)."""
    if not run.method.defines("load_extra_state"):
        return
    path = os.path.join(local_dir, METHOD_STATE)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint of stage {run.cfg.name!r} has no {METHOD_STATE}: it cannot resume "
                              f"this {type(run.method).__name__} exactly; start the stage afresh")
    run.method.load_extra_state(load_file(path))


def _evaluate(run: _Run) -> dict[str, float]:
    """The method's ``eval_step`` over the whole val split; sums over every rank, then means per sample.

    Every rank calls it (under ZeRO-3 each forward gathers parameters collectively).
    """
    sums: dict[str, float] = {}
    run.model.eval()
    with torch.no_grad():
        run.val.set_epoch(0)
        for batch in run.val:
            for key, value in run.method.eval_step(run.module, _on_device(batch, run.module)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    run.model.train()
    keys = sorted(sums)
    buf = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=run.accelerator.device)
    if dist.is_initialized() and run.ctx.world_size > 1:
        dist.all_reduce(buf)
    totals = dict(zip(keys, buf.tolist()))
    count = totals.pop("count", 0.0)
    return {"val_count": count, **{f"val_{k}": v / max(count, 1.0) for k, v in totals.items()}}


def _export(run: _Run) -> None:
    """The method's export to ``<stage>/export/`` (every rank calls: ZeRO-3 gathers)."""
    extra = {"stage": run.cfg.name, "step": run.step, "config_digest": run.meta_expect["config_digest"],
             "code_version": code_version()}
    if run.method.pool is not None:
        extra["pool"] = run.method.pool  # what eval pools by default
    run.method.export(run.module, run.store.url_of(EXPORT_NAME), rank=run.ctx.rank, storage_options=run.ctx.storage_options,
                      extra={**extra, **run.params})


def _progress_bar(run: _Run):
    show = run.cfg.progress if run.cfg.progress is not None else sys.stderr.isatty()
    if run.ctx.rank != 0 or not show:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.step, desc=run.cfg.name, unit="step", dynamic_ncols=True)


def _callbacks(run: _Run) -> None:
    """Hand this step's :class:`StepEnd` to every step callback."""
    if not run.on_step:
        return
    end = StepEnd(step=run.step, total_steps=run.total_steps, rank=run.ctx.rank, world_size=run.ctx.world_size,
                  resumed_from=run.resumed_from, saved_step=run.saved_step, checkpoints=run.ckpt)
    for callback in run.on_step:
        callback(end)

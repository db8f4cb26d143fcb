"""The one training loop every method runs: ``train(method, cfg, ctx)``.

A *method* (``jobs/mae.py``, …) supplies only what is special to it (see :class:`Method`): its
model, its ``step(model, batch, step) -> (loss, metrics)``, its transform, and optionally
``after_step``. The engine supplies everything else, once:

* DeepSpeed ZeRO 0–3 through ``accelerate`` (:func:`deepspeed_config`; a stage's ``deepspeed:``
  mapping is merged over ours), bf16 on GPU / fp32 on CPU, gradient accumulation, clipping;
  gloo on CPU, nccl on GPU. Under Ray Train the process group already exists; under ``torchrun``
  accelerate creates it from the environment.
* AdamW with no-decay groups; ``lr = base_lr * global_batch / 256``, linear warmup then cosine,
  a pure function of the global step (:func:`lr_at`): nothing to save, nothing to drift.
* Checkpoints through :class:`jobs.checkpoint.CheckpointManager` (engine state via accelerate, loader
  position, step, RNG, resolved config + digest, code version, metrics so far); resume from the
  newest committed one at the exact data position, refusing a different architecture or config.
* Preemption: SIGTERM/SIGINT (or a ``PREEMPT`` marker a driver writes in the stage directory)
  finishes the current step, saves synchronously and returns ``state="preempted"``.
* Metrics per step (loss, lr, grad norm, images/s, step time, MFU on GPU) to ``metrics.jsonl``
  by rank 0; a progress bar on rank 0 only on a terminal.

One *step* is one optimizer update (``grad_accum`` micro-batches); checkpoints fall on step
boundaries only, so the saved loader position is always exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from cluster.storage import Store
from dataprep.loader import StreamingLoader
from jobs.checkpoint import (CheckpointError, CheckpointManager, CheckpointPolicy, capture_rng_state, code_version,
                             json_digest, restore_rng_state)
from jobs.export import export_encoder
from jobs.models import ModelConfig

log = logging.getLogger(__name__)

PREEMPT_MARKER = "PREEMPT"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — a preempted stage continues on rerun
METHOD_STATE = "method_state.safetensors"  # a method's extra_state() inside each checkpoint


# ---- configuration ------------------------------------------------------------------------------


class OptimConfig(BaseModel):
    """AdamW and its schedule. ``lr = base_lr * global_batch / 256`` (Goyal et al. linear scaling)."""

    model_config = ConfigDict(extra="forbid")

    base_lr: float = Field(default=1.5e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0, description="overrides warmup_epochs")
    clip_grad: float | None = Field(default=None, gt=0, description="global grad-norm clipping")


class TrainConfig(BaseModel):
    """What every training stage has. Methods subclass it with their own fields and a ``kind``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: str = Field(description="an earlier stage's name, or a manifest URL / prep output directory")
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (overrides epochs)")
    batch_size: int = Field(default=64, ge=1, description="images per worker per micro-step")
    grad_accum: int = Field(default=1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = False
    compile: bool = False
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointPolicy = Field(default_factory=lambda: CheckpointPolicy(every_minutes=15.0))
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed settings merged over ours")
    seed: int = 0
    loader_workers: int = Field(default=2, ge=0)
    progress: bool | None = Field(default=None, description="progress bar on rank 0; default: only on a TTY")

    def digest(self) -> str:
        """Digest of everything that shapes the result (not how often we checkpoint or show progress)."""
        return json_digest(self.model_dump(mode="json", exclude={"checkpoint", "progress", "loader_workers"}))


@dataclass
class StageContext:
    """Where a worker runs: its rank and the stage's place in the store."""

    stage_url: str                    # <run_root>/stages/<name>
    data_url: str                     # resolved manifest URL
    rank: int = 0
    world_size: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    launcher: str = "torchrun"        # "ray" | "torchrun" | "local"
    kill_at_step: int | None = None   # fault injection (tests): SIGKILL self after this step
    kill_rank: int | None = None
    refs: dict[str, str] = field(default_factory=dict)  # resolved references, e.g. {"init": <export URL>}


@dataclass
class TrainResult:
    state: Literal["done", "preempted"]
    step: int
    total_steps: int
    resumed_from: int | None
    losses: list[float]


class Method(Protocol):
    """What a training method supplies to :func:`train`."""

    def build_model(self) -> torch.nn.Module: ...
    def train_transform(self) -> Callable: ...
    def step(self, model: torch.nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def arch(self) -> dict[str, Any]: ...
    def no_weight_decay(self, model: torch.nn.Module) -> set[str]: ...
    def flops_per_sample(self) -> float: ...  # training FLOPs (fwd + bwd) per image, for MFU

    # Optional hooks, called only when a method defines them (see jobs/dino.py):
    #   set_run_length(total_steps, steps_per_epoch)  once, before the first step (schedules in epochs)
    #   after_step(model, step)                      after each optimizer step (e.g. an EMA teacher)
    #   weight_decay_at(step) -> float               weight decay of the decayed param groups at ``step``
    #   extra_state() -> dict[str, Tensor]           replicated method state (rank 0 saves it as
    #   load_extra_state(state)                        method_state.safetensors); every rank loads it
    #   setup(ctx)                                   once, before build_model (reads ctx.refs, ctx.data_url)
    #   param_groups(model, optim) -> groups         instead of the two default AdamW groups; a group's
    #                                                  ``lr_scale`` multiplies the scheduled lr (layer decay)
    #   eval_transform() + eval_step(model, batch) -> sums with a "count" key: run over the manifest's
    #                                                  val split at every epoch end (every rank; padded
    #                                                  samples are the method's to skip), logged as val_<k>
    #   export(model, dest_url, rank=, storage_options=, extra=)   replaces the encoder export


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


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the rest (biases, norms, position embeddings, tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in no_decay_names or name.split(".")[-1] in no_decay_names
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, no_decay_names: set[str],
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay, no_decay_names)
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=cfg.betas, eps=cfg.eps)


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
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
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


# ---- preemption -----------------------------------------------------------------------------------


class PreemptionWatch:
    """Sets :attr:`requested` on SIGTERM/SIGINT (when we own the main thread) or when rank 0 sees
    ``<stage>/PREEMPT`` (written by a driver that was told to stop). Ranks agree in :func:`train`."""

    def __init__(self, store: Store | None, poll_s: float = 2.0) -> None:
        self.requested = threading.Event()
        self._saved: dict[int, Any] = {}
        self._stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._on_signal)
        self._thread = None
        if store is not None:
            self._thread = threading.Thread(target=self._poll, args=(store, poll_s), daemon=True,
                                            name="preempt-watch")
            self._thread.start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.warning("received %s: finishing this step, then checkpointing and exiting", signal.Signals(signum).name)
        self.requested.set()

    def _poll(self, store: Store, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                if store.exists(PREEMPT_MARKER):
                    log.warning("preemption requested through %s", store.url_of(PREEMPT_MARKER))
                    self.requested.set()
                    return
            except Exception as exc:  # the store being briefly away must not kill training
                log.debug("preempt marker check failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


# ---- metrics --------------------------------------------------------------------------------------


PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops() -> float | None:
    """Dense bf16 peak of this GPU (``VITFORGE_PEAK_TFLOPS`` overrides); None on CPU or unknown GPUs."""
    if os.environ.get("VITFORGE_PEAK_TFLOPS"):
        return float(os.environ["VITFORGE_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: kept in memory, shipped inside checkpoints and to the stage dir."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.store, self.enabled, self.lines = store, enabled, []
        self._upload: threading.Thread | None = None

    def restore(self, text: str, upto_step: int) -> None:
        self.lines = [ln for ln in text.splitlines() if ln and json.loads(ln)["step"] <= upto_step]

    def add(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.lines.append(json.dumps(record, sort_keys=True))

    def text(self) -> str:
        return "".join(ln + "\n" for ln in self.lines)

    def publish(self, sync: bool = False) -> None:
        """Upload ``metrics.jsonl`` to the stage directory (in the background unless ``sync``)."""
        if not self.enabled:
            return
        if self._upload is not None:
            self._upload.join()
        data = self.text().encode()
        if sync:
            self.store.put_bytes("metrics.jsonl", data)
            return
        self._upload = threading.Thread(target=self._put, args=(data,), daemon=True, name="metrics-upload")
        self._upload.start()

    def _put(self, data: bytes) -> None:
        try:
            self.store.put_bytes("metrics.jsonl", data)
        except Exception as exc:  # metrics are also inside every checkpoint; the next publish retries
            log.warning("could not upload metrics.jsonl: %s", exc)


# ---- the loop -------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the loop touches, built once by :func:`_setup`."""

    cfg: TrainConfig
    ctx: StageContext
    method: Method
    accelerator: Any
    model: Any
    optimizer: Any
    loader: StreamingLoader
    ckpt: CheckpointManager
    metrics: MetricsLog
    store: Store
    total_steps: int
    warmup_steps: int
    peak_lr: float
    meta_expect: dict[str, Any]
    step: int = 0
    resumed_from: int | None = None
    saved_step: int | None = None
    losses: list[float] = field(default_factory=list)
    val: StreamingLoader | None = None  # the val split, for a method with eval_step
    steps_per_epoch: int = 1


def train(method: Method, cfg: TrainConfig, ctx: StageContext, watch: PreemptionWatch | None = None) -> TrainResult:
    """Train ``method`` per ``cfg``; resume from the stage's newest committed checkpoint if any.

    Every rank calls it. Returns when the stage is done or preempted (after a synchronous
    checkpoint); raises on errors, leaving the last committed checkpoint to resume from.
    ``watch``: a caller that must catch stop requests earlier (during start-up) passes its own.
    """
    watch = watch or PreemptionWatch(Store(ctx.stage_url, ctx.storage_options) if ctx.rank == 0 else None)
    try:
        run = _setup(method, cfg, ctx)
        _resume(run)
        state = _loop(run, watch)
        run.ckpt.close()
        if state == "done":
            _export(run)
        run.metrics.publish(sync=True)
        return TrainResult(state, run.step, run.total_steps, run.resumed_from, run.losses)
    finally:
        watch.close()


def _setup(method: Method, cfg: TrainConfig, ctx: StageContext) -> _Run:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every attempt
    accelerator = make_accelerator(cfg, ctx.world_size)
    setup = getattr(method, "setup", None)
    if setup is not None:
        setup(ctx)
    model = method.build_model()
    groups = getattr(method, "param_groups", None)
    optimizer = build_optimizer(model, cfg.optim, method.no_weight_decay(model),
                                groups(model, cfg.optim) if groups is not None else None)
    loader = StreamingLoader(ctx.data_url, split="train", batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size, transform=method.train_transform(),
                             num_workers=cfg.loader_workers, pin_memory=torch.cuda.is_available(), partial="drop",
                             storage_options=ctx.storage_options)
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
    run_length = getattr(method, "set_run_length", None)
    if run_length is not None:
        run_length(total, steps_per_epoch)
    expect = {"arch": method.arch(), "config_digest": cfg.digest(), "world_size": ctx.world_size}
    return _Run(cfg, ctx, method, accelerator, model, optimizer, loader, ckpt, MetricsLog(store, ctx.rank == 0), store,
                total, min(warmup, total), peak_lr(cfg, ctx.world_size), expect, val=_val_loader(method, cfg, ctx, loader),
                steps_per_epoch=steps_per_epoch)


def _val_loader(method: Method, cfg: TrainConfig, ctx: StageContext, train: StreamingLoader) -> StreamingLoader | None:
    """The val split in a fixed order, padded so every rank runs the same number of (collective) forwards."""
    if getattr(method, "eval_step", None) is None:
        return None
    if "val" not in train.manifest.splits:
        log.warning("stage %s: the manifest has no val split; no per-epoch evaluation", cfg.name)
        return None
    return StreamingLoader(ctx.data_url, split="val", batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                           world_size=ctx.world_size, transform=method.eval_transform(), shuffle=False,
                           num_workers=cfg.loader_workers, partial="pad", storage_options=ctx.storage_options)


def _resume(run: _Run) -> None:
    """Continue from the newest committed checkpoint, if there is one (every rank calls)."""
    info = run.ckpt.latest()
    if info is None:
        return
    log.info("resuming stage %s from %s", run.cfg.name, info.url)
    metrics_text: list[str] = []

    def read(local_dir: str) -> None:
        run.accelerator.load_state(os.path.join(local_dir, "engine"))
        _load_method_state(run, local_dir)
        path = os.path.join(local_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                metrics_text.append(f.read())

    meta = run.ckpt.restore(read, info, expect=run.meta_expect)
    run.loader.load_state_dict(meta["loader"])
    restore_rng_state(meta["rng"])
    run.step = run.resumed_from = run.saved_step = int(meta["step"])
    if metrics_text:
        run.metrics.restore(metrics_text[0], run.step)


def _loop(run: _Run, watch: PreemptionWatch) -> Literal["done", "preempted"]:
    bar = _progress_bar(run)
    try:
        batches = _micro_batches(run)
        while run.step < run.total_steps:
            loss, extra, seconds = _one_step(run, batches)
            run.step += 1
            stop = _all_agree(run, loss, watch.requested.is_set())
            if run.val is not None and (run.step % run.steps_per_epoch == 0 or run.step == run.total_steps):
                extra = {**extra, **_evaluate(run)}
            _log_step(run, extra, seconds)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run.losses[-1]:.4f}")
            _maybe_fault(run)
            if stop:
                _save(run, sync=True)
                return "preempted"
            if run.step < run.total_steps and run.ckpt.due(run.step):
                _save(run, sync=False)
        if run.saved_step != run.step:
            _save(run, sync=True)
        return "done"
    finally:
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
    wd_at = getattr(run.method, "weight_decay_at", None)
    wd = wd_at(run.step) if wd_at is not None else None
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if wd is not None and group.setdefault("decayed", group["weight_decay"] > 0):  # no-decay groups stay 0
            group["weight_decay"] = wd
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    extra: dict[str, float] = {}
    run.model.train()
    for _ in range(run.cfg.grad_accum):
        batch = next(batches)
        with run.accelerator.accumulate(run.model):
            loss, extra = run.method.step(run.model, batch, run.step)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        total += loss.detach().double().cpu()
    after = getattr(run.method, "after_step", None)
    if after is not None:
        after(run.model, run.step)
    seconds = time.perf_counter() - start
    extra = {**extra, "lr": lr}
    norm = getattr(run.model, "get_global_grad_norm", lambda: None)()
    if norm is not None:
        extra["grad_norm"] = float(norm)
    return total / run.cfg.grad_accum, extra, seconds


def _all_agree(run: _Run, loss: torch.Tensor, stop_requested: bool) -> bool:
    """One collective per step: the mean loss over ranks, and whether any rank must stop."""
    device = run.accelerator.device
    buf = torch.tensor([float(loss), 1.0 if stop_requested else 0.0], dtype=torch.float64, device=device)
    if dist.is_initialized() and run.ctx.world_size > 1:
        dist.all_reduce(buf)
    run.losses.append(float(buf[0]) / run.ctx.world_size)
    return bool(buf[1] > 0)


def _log_step(run: _Run, extra: dict[str, float], seconds: float) -> None:
    images = run.cfg.batch_size * run.cfg.grad_accum * run.ctx.world_size
    record = {"step": run.step, "epoch": run.loader.epoch, "loss": run.losses[-1], "step_time_s": seconds,
              "images_per_s": images / seconds if seconds > 0 else None, **extra}
    peak = peak_flops()
    if peak and seconds > 0:
        record["mfu"] = run.method.flops_per_sample() * images / seconds / (peak * run.ctx.world_size)
    run.metrics.add(record)


def _save(run: _Run, sync: bool) -> None:
    """Checkpoint after ``run.step`` (every rank calls; the upload is asynchronous unless ``sync``)."""
    step = run.step

    extra = getattr(run.method, "extra_state", None)
    method_state = extra() if extra is not None else None

    def write(local_dir: str) -> None:
        run.accelerator.save_state(os.path.join(local_dir, "engine"))
        if method_state is not None and run.ctx.rank == 0:
            save_file(method_state, os.path.join(local_dir, METHOD_STATE))
        if run.ctx.rank == 0:
            with open(os.path.join(local_dir, "metrics.jsonl"), "w") as f:
                f.write(run.metrics.text())

    meta = {"step": step, "epoch": run.loader.epoch, "loader": run.loader.state_dict(), "rng": capture_rng_state(),
            "config": run.cfg.model_dump(mode="json"), "code_version": code_version(), **run.meta_expect}
    run.ckpt.save(step, write, meta, sync=sync)
    run.saved_step = step
    run.metrics.publish(sync=False)


def _load_method_state(run: _Run, local_dir: str) -> None:
    """Hand a method its ``extra_state`` back (every rank reads rank 0's file)."""
    load = getattr(run.method, "load_extra_state", None)
    if load is None:
        return
    path = os.path.join(local_dir, METHOD_STATE)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint of stage {run.cfg.name!r} has no {METHOD_STATE}: it cannot resume "
                              f"this {type(run.method).__name__} exactly; start the stage afresh")
    load(load_file(path))


def _evaluate(run: _Run) -> dict[str, float]:
    """The method's ``eval_step`` over the whole val split; sums over every rank, then means per sample.

    Every rank calls it (under ZeRO-3 each forward gathers parameters collectively).
    """
    sums: dict[str, float] = {}
    run.model.eval()
    with torch.no_grad():
        run.val.set_epoch(0)
        for batch in run.val:
            for key, value in run.method.eval_step(run.model, batch).items():
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
    """The trained encoder to ``<stage>/export/`` (every rank calls: ZeRO-3 gathers)."""
    custom = getattr(run.method, "export", None)
    if custom is not None:
        custom(run.model, run.store.url_of("export"), rank=run.ctx.rank, storage_options=run.ctx.storage_options,
               extra={"stage": run.cfg.name, "step": run.step, "config_digest": run.cfg.digest(),
                      "code_version": code_version()})
        return
    encoder = getattr(run.method, "encoder", None)
    if encoder is None:
        return
    export_encoder(encoder(run.model), run.cfg.model, run.store.url_of("export"), rank=run.ctx.rank,
                   storage_options=run.ctx.storage_options,
                   extra={"stage": run.cfg.name, "step": run.step, "config_digest": run.cfg.digest(),
                          "code_version": code_version()})


def _progress_bar(run: _Run):
    show = run.cfg.progress if run.cfg.progress is not None else sys.stderr.isatty()
    if run.ctx.rank != 0 or not show:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.step, desc=run.cfg.name, unit="step", dynamic_ncols=True)


def _maybe_fault(run: _Run) -> None:
    """Fault injection for tests: SIGKILL this worker once, right after step ``kill_at_step``."""
    ctx = run.ctx
    if ctx.kill_at_step is not None and run.step == ctx.kill_at_step and ctx.rank == (ctx.kill_rank or 0) \
            and run.resumed_from is None:
        run.ckpt.wait()
        deadline = time.monotonic() + 120
        while run.saved_step and time.monotonic() < deadline:
            latest = run.ckpt.latest()
            if latest is not None and latest.step >= run.saved_step:
                break
            time.sleep(0.2)
        log.warning("fault injection: SIGKILL rank %d after step %d", ctx.rank, run.step)
        os.kill(os.getpid(), signal.SIGKILL)


def stage_store(run_root: str, stage: str, storage_options: dict[str, Any] | None = None) -> Store:
    return Store(posixpath.join(run_root.rstrip("/"), "stages", stage), storage_options)

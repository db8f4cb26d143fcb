"""Per-worker entry of a training stage: build everything from a *stage job* and run the engine.

A stage job (:class:`StageJob`) is what the driver (``pipeline/run.py``, or ``pipeline/launch.py`` under
``torchrun``) resolves from the run spec; it travels as its JSON dump, once, and every worker
validates it once::

    {"stage": {...the stage's spec mapping, kind included...},
     "stage_url": "<run_root>/stages/<name>", "data_url": "<manifest URL>",
     "storage_options": {...}, "launcher": "ray" | "torchrun",
     "methods": ["my_lab.block_mae"],                     # plugin modules to import (the spec's methods:)
     "init_url": "<export URL>", "teacher_url": "...",    # resolved references, where the stage has them
     "fault": {"kill_rank": 1, "kill_at_step": 5}}        # optional, tests only

:func:`run_worker` is what every rank runs (a Ray Train worker or a torchrun process). Rank 0
keeps ``<stage>/STATUS.json`` current: ``running`` (attempts counted), then ``done`` or
``preempted``; a driver marks ``failed`` when the gang gives up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from cluster.housekeeping import failures as housekeeping_failures
from cluster.lease import install_fence
from cluster.storage import Store
from jobs._faults import FaultHooks
from jobs.checkpoint import code_version
from jobs.config.stage import REFERENCE_FIELDS, StageJob, stage_config_class  # noqa: F401
from jobs.engine import PreemptionWatch, StageContext, train
from jobs.layout import STATUS_NAME, StageStatus
from jobs.method import Method
from jobs.methods import import_methods, method_class
from jobs.reshard import resume_plan

log = logging.getLogger(__name__)

STATUS = STATUS_NAME


def make_method(cfg: Any, rank: int) -> Method:
    """The registered method of ``cfg.kind``, built from ``cfg``."""
    return method_class(cfg.kind)(cfg, rank=rank)


# ---- STATUS.json --------------------------------------------------------------------------------


def read_status(stage_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage's ``STATUS.json`` (``{}`` when there is none); see :class:`jobs.layout.StageStatus`."""
    return StageStatus(stage_url, storage_options).read()


def update_status(stage_url: str, storage_options: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``STATUS.json`` (one writer at a time: rank 0, or the driver when no gang runs)."""
    return StageStatus(stage_url, storage_options).update(**fields)


# ---- the worker -----------------------------------------------------------------------------------


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from the environment every launcher sets (Ray Train, torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_worker(job: dict[str, Any] | StageJob) -> str:
    """Run one rank of a stage job (its :meth:`StageJob.dump`, or the job); returns ``"done"`` or
    ``"preempted"``. Every rank calls it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = dist_rank_world()
    job = job if isinstance(job, StageJob) else StageJob.model_validate(job)
    install_fence(job.lease, job.storage_options)  # commits/STATUS refused once the lease is lost
    import_methods(job.methods)
    cfg = job.config()
    ctx = StageContext(stage_url=job.stage_url, data_url=job.data_url, rank=rank, world_size=world,
                       storage_options=job.storage_options, launcher=job.launcher, refs=job.refs)
    # stop requests are honoured from here on (start-up takes a while; a SIGTERM must not be lost)
    watch = PreemptionWatch(Store(ctx.stage_url, ctx.storage_options) if rank == 0 else None)
    nodes = _gather_node_ids(world)
    status = StageStatus(ctx.stage_url, ctx.storage_options)
    if rank == 0:
        status.start(kind=cfg.kind, name=cfg.name, world_size=world,
                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), worker_nodes=nodes,
                     launcher=ctx.launcher, config_digest=cfg.digest(), code_version=code_version())
    plan = resume_plan(ctx.stage_url, ctx.storage_options, world, cfg)
    # the method sees the per-worker batch it will train with; the engine keeps cfg's digest
    result = train(make_method(plan.shape(cfg), rank), cfg, ctx, watch, plan,
                   on_step=job.fault.callbacks() if job.fault else ())
    if rank == 0:
        status.finish(result.state, step=result.step, total_steps=result.total_steps, resumed_from=result.resumed_from,
                      **({"housekeeping_failures": hk} if (hk := housekeeping_failures()) else {}))
    # no rank leaves before STATUS.json is written: a launcher (torchrun) that sees one rank exit
    # with the preempted status tears the others down at once
    _barrier()
    log.info("stage %s %s at step %d/%d", cfg.name, result.state, result.step, result.total_steps)
    return result.state


def _gather_node_ids(world: int) -> list[str | None]:
    """Each rank's Ray node id (None outside Ray), gathered to every rank when a process group exists."""
    mine = os.environ.get("VITFORGE_NODE_ID")
    if not (dist.is_available() and dist.is_initialized()) or world == 1:
        return [mine]
    out: list[str | None] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

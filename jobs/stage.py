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
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from cluster.housekeeping import failures as housekeeping_failures
from cluster.lease import install_fence
from cluster.storage import Store
from jobs._faults import FaultHooks
from jobs.checkpoint import code_version
from jobs.engine import PreemptionWatch, StageContext, TrainConfig, train
from jobs.layout import STATUS_NAME, StageStatus
from jobs.method import Method
from jobs.methods import import_methods, method_class
from jobs.reshard import resume_plan

log = logging.getLogger(__name__)

STATUS = STATUS_NAME

# Stage fields that name an earlier stage's export (or an export URL); a stage job carries each one
# resolved as ``<field>_url`` (pipeline/spec.py), which reaches the method as ``ctx.refs[<field>]``.
REFERENCE_FIELDS = ("init", "teacher")


class StageJob(BaseModel):
    """One training stage, resolved for its workers (the module docstring shows its JSON form)."""

    model_config = ConfigDict(extra="forbid")

    stage: dict[str, Any] = Field(description="the stage's spec mapping; its method's Config validates it")
    stage_url: str
    data_url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    launcher: Literal["ray", "torchrun", "local"] = "torchrun"
    methods: list[str] = Field(default_factory=list, description="plugin modules that register methods")
    init_url: str | None = None
    teacher_url: str | None = None
    cache_url: str | None = Field(default=None, description="a distill stage's teacher_outputs cache (targets: cached)")
    fault: FaultHooks | None = Field(default=None, description="tests only: step callbacks that kill a worker")
    lease: dict[str, Any] | None = Field(default=None, description="the run lease's fence (cluster/lease.py)")

    @property
    def refs(self) -> dict[str, str]:
        """The resolved references by field (``{"init": <export URL>}``), as ``StageContext.refs``."""
        return {f: url for f in (*REFERENCE_FIELDS, "cache") if (url := getattr(self, f"{f}_url"))}

    def config(self) -> TrainConfig:
        """The stage's config, validated by its kind's method (import :attr:`methods` first)."""
        return stage_config_class(self.stage["kind"]).model_validate(self.stage)

    def dump(self) -> dict[str, Any]:
        """The JSON-able form that travels to the workers (unset references and faults left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def stage_config_class(kind: str) -> type:
    """The stage config class of training ``kind`` (its registered method's ``Config``)."""
    return method_class(kind).Config


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

"""Per-worker entry of a training stage: build everything from a *stage job* and run the engine.

A stage job is a JSON-able dict the driver (``pipeline/run.py``, or ``jobs/launch.py`` under
``torchrun``) resolves from the run spec::

    {"stage": {...the stage's spec mapping, kind included...},
     "stage_url": "<run_root>/stages/<name>", "data_url": "<manifest URL>",
     "storage_options": {...}, "launcher": "ray" | "torchrun",
     "methods": ["my_lab.block_mae"],                     # plugin modules to import (the spec's methods:)
     "fault": {"kill_rank": 1, "kill_at_step": 5}}        # optional, tests only

:func:`run_worker` is what every rank runs (a Ray Train worker or a torchrun process). Rank 0
keeps ``<stage>/STATUS.json`` current: ``running`` (attempts counted), then ``done`` or
``preempted``; a driver marks ``failed`` when the gang gives up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cluster.storage import Store
from jobs.checkpoint import code_version
from jobs.layout import STATUS_NAME, StageStatus
from jobs.method import Method
from jobs.methods import import_methods, method_class

log = logging.getLogger(__name__)

STATUS = STATUS_NAME

# Stage fields that name an earlier stage's export (or an export URL); a stage job carries each one
# resolved as ``<field>_url`` (pipeline/spec.py), which reaches the method as ``ctx.refs[<field>]``.
REFERENCE_FIELDS = ("init", "teacher")


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


def run_worker(job: dict[str, Any]) -> str:
    """Run one rank of a stage job; returns ``"done"`` or ``"preempted"``. Every rank calls it."""
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from jobs.engine import PreemptionWatch, StageContext, train

    rank, world = dist_rank_world()
    import_methods(job.get("methods") or ())
    cfg = stage_config_class(job["stage"]["kind"]).model_validate(job["stage"])
    fault = job.get("fault") or {}
    ctx = StageContext(stage_url=job["stage_url"], data_url=job["data_url"], rank=rank, world_size=world,
                       storage_options=job.get("storage_options") or {}, launcher=job.get("launcher", "torchrun"),
                       kill_at_step=fault.get("kill_at_step"), kill_rank=fault.get("kill_rank"),
                       refs={f: job[f"{f}_url"] for f in REFERENCE_FIELDS if job.get(f"{f}_url")})
    # stop requests are honoured from here on (start-up takes a while; a SIGTERM must not be lost)
    watch = PreemptionWatch(Store(ctx.stage_url, ctx.storage_options) if rank == 0 else None)
    nodes = _gather_node_ids(world)
    status = StageStatus(ctx.stage_url, ctx.storage_options)
    if rank == 0:
        status.start(kind=cfg.kind, name=cfg.name, world_size=world,
                     local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), worker_nodes=nodes,
                     launcher=ctx.launcher, config_digest=cfg.digest(), code_version=code_version())
    result = train(make_method(cfg, rank), cfg, ctx, watch)
    if rank == 0:
        status.finish(result.state, step=result.step, total_steps=result.total_steps, resumed_from=result.resumed_from)
    # no rank leaves before STATUS.json is written: a launcher (torchrun) that sees one rank exit
    # with the preempted status tears the others down at once
    _barrier()
    log.info("stage %s %s at step %d/%d", cfg.name, result.state, result.step, result.total_steps)
    return result.state


def _gather_node_ids(world: int) -> list[str | None]:
    """Each rank's Ray node id (None outside Ray), gathered to every rank when a process group exists."""
    import torch.distributed as dist

    mine = os.environ.get("VITFORGE_NODE_ID")
    if not (dist.is_available() and dist.is_initialized()) or world == 1:
        return [mine]
    out: list[str | None] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""Ray Train worker gangs: place N workers, give them a process group, restart the gang on failure.

Ray Train only *places and restarts* the workers. It initialises ``torch.distributed`` (gloo
on CPU, nccl on GPU) and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
``MASTER_PORT`` and ``ACCELERATE_TORCH_DEVICE`` in each worker, which accelerate and DeepSpeed
adopt. Checkpoints are not Ray's: the worker function saves to and resumes from our own store,
so after a worker dies ``FailureConfig(max_failures=k)`` restarts the whole gang and the
function itself continues from the last committed checkpoint. ``storage_path`` holds only Ray's
bookkeeping.

Errors that cannot clear are not retried: a worker whose function raises an exception marked
``permanent = True`` (permission denied, a missing bucket, clock skew, a lost run lease: see
``cluster/storage.py``) records its first cause in Ray's internal KV store before it dies; the
gang Ray Train restarts for it returns at once, and :func:`run_gang` raises
:class:`GangFatalError` with that cause (``FailureConfig`` is for lost workers, not for these).

Placement is bounded: a gang that cannot be placed (e.g. after a node was lost and the cluster
has too few CPUs/GPUs left) raises :class:`GangPlacementError` after ``start_timeout_s``
(``VITFORGE_GANG_START_TIMEOUT_S``, default 600 s) instead of waiting forever. Ray Train waits
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (default 60 s) per try and, by default, retries
without end; we cap its retries to fit the bound.

    run_gang(run_worker, job, GangSpec(workers=2, cpus_per_worker=1))
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


START_TIMEOUT_ENV = "VITFORGE_GANG_START_TIMEOUT_S"
RAY_START_TRY_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait per placement try
_RAY_START_TRY_DEFAULT_S = 60.0


class GangFailedError(RuntimeError):
    """The gang failed more often than ``max_failures`` allows."""


class GangFatalError(GangFailedError):
    """A worker failed with an error that cannot clear by restarting (its first cause is the message)."""


class GangPlacementError(GangFailedError):
    """The gang's workers could not be placed on the cluster within ``start_timeout_s``."""


@dataclass
class GangSpec:
    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_failures: int = 2
    name: str = "vitforge"
    storage_path: str | None = None     # Ray's bookkeeping; default: a local temp directory
    env: dict[str, str] = field(default_factory=dict)  # set in every worker before ``fn`` runs
    start_timeout_s: float = field(default_factory=lambda: float(os.environ.get(START_TIMEOUT_ENV, 600)))


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: apply the env, call the user function, report its result."""
    import ray.train

    os.environ.update(config["env"])
    context = ray.train.get_context()
    # placement, for STATUS.json (Ray Train's local ranks group workers by IP, which simulated
    # nodes on one machine share; the node id tells real placement)
    os.environ["VITFORGE_NODE_ID"] = ray.get_runtime_context().get_node_id()
    if not config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    fatal = _fatal_cause(config["fatal_key"])
    if fatal is not None:  # an earlier attempt hit an error that cannot clear: do not run again
        ray.train.report({"fatal": fatal, "rank": context.get_world_rank()})
        return
    try:
        result = config["fn"](config["job"])
    except BaseException as exc:
        if getattr(exc, "permanent", False):
            _record_fatal(config["fatal_key"], f"rank {context.get_world_rank()}: {type(exc).__name__}: {exc}")
        raise
    ray.train.report({"result": result, "rank": context.get_world_rank()})


def _fatal_cause(key: str) -> str | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key)
    return value.decode() if value else None


def _record_fatal(key: str, cause: str) -> None:
    """Keep the *first* permanent cause (later ranks' errors are usually its consequences)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, cause[-4000:].encode(), overwrite=False)


def run_gang(fn: Callable[[dict[str, Any]], Any], job: dict[str, Any], spec: GangSpec) -> Any:
    """Run ``fn(job)`` on every worker of a gang (connect to Ray first); return rank 0's result.

    Raises :class:`GangFailedError` when the gang failed ``max_failures + 1`` times.
    """
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import uuid

    from ray.experimental import internal_kv

    use_gpu = spec.gpus_per_worker > 0
    fatal_key = f"vitforge-gang-fatal-{uuid.uuid4().hex}"
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"fn": fn, "job": job, "env": dict(spec.env), "use_gpu": use_gpu, "fatal_key": fatal_key},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=spec.name, storage_path=spec.storage_path or _default_storage(),
                             failure_config=FailureConfig(max_failures=spec.max_failures,
                                                          controller_failure_limit=_placement_retries(spec))),
    )
    log.info("launching a gang of %d worker(s) (%s each) for %s", spec.workers, resources, spec.name)
    try:
        result = _fit_off_main_thread(trainer)
    except ray.train.TrainingFailedError as exc:
        if _is_placement_timeout(exc):
            raise GangPlacementError(_placement_message(spec, resources)) from exc
        if (fatal := _fatal_cause(fatal_key)) is not None:
            raise GangFatalError(f"gang {spec.name!r} stopped on an error that cannot clear: {fatal}") from None
        raise GangFailedError(f"gang {spec.name!r} failed {spec.max_failures + 1} time(s): {exc}") from exc
    finally:
        fatal = _fatal_cause(fatal_key)
        internal_kv._internal_kv_del(fatal_key)
    if fatal is not None:
        raise GangFatalError(f"gang {spec.name!r} stopped on an error that cannot clear: {fatal}")
    error = getattr(result, "error", None)
    if error is not None:
        raise GangFailedError(f"gang {spec.name!r} failed: {error}") from error
    return (result.metrics or {}).get("result")


def _fit_off_main_thread(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread, so the caller's signal handlers stay in charge.

    On the main thread Ray Train's ``fit()`` replaces the SIGINT handler with its own (which aborts the
    run without a checkpoint); off it, Ray leaves signals alone. The main thread waits in short joins,
    so a handler (the driver's: SIGINT/SIGTERM -> checkpoint and stop) runs within a fraction of a
    second, and an exception it raises (a second Ctrl-C: ``KeyboardInterrupt``) propagates from here.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _placement_retries(spec: GangSpec) -> int:
    """Ray Train's placement retries that fit ``spec.start_timeout_s`` (each try waits its own timeout)."""
    per_try = float(os.environ.get(RAY_START_TRY_ENV, _RAY_START_TRY_DEFAULT_S))
    return max(0, math.ceil(spec.start_timeout_s / max(per_try, 1e-3)) - 1)


def _is_placement_timeout(exc: BaseException) -> bool:
    cause = getattr(exc, "controller_failure", None)
    return cause is not None and type(cause).__name__ == "WorkerGroupStartupTimeoutError"


def _placement_message(spec: GangSpec, resources: dict[str, float]) -> str:
    import ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        have = ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in sorted(resources) if k in total)
    except Exception:  # the cluster itself may be the problem
        have = "unknown"
    need = ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))
    return (f"gang {spec.name!r}: {spec.workers} worker(s) of {need} each could not be placed within "
            f"{spec.start_timeout_s:.0f}s (cluster: {have or 'none of ' + ', '.join(resources)}). Add nodes, or "
            f"run with fewer workers (compute.workers; a training stage resumes from its last checkpoint on another "
            f"number of workers); {START_TIMEOUT_ENV} sets how long to wait.")


def _default_storage() -> str:
    return os.path.join(tempfile.gettempdir(), "vitforge-ray")

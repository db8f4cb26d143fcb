"""``vitforge run SPEC``: run a spec's stages in order, each training stage on a Ray Train gang.

Stages: ``prep`` (images -> shards, Ray tasks), training kinds (``mae``, ``dino``, ``distill``,
``finetune``: a Ray Train gang each) and ``eval`` (one Ray task). The run root gets::

    run.yaml                      the spec as first launched; a different spec is refused
    stages/<name>/STATUS.json     state: running | done | preempted | failed, attempts, history
                                  (per attempt: start, end, seconds, outcome), config digest
    stages/<name>/shards/…        prep stages (manifest.json last)
    stages/<name>/metrics/…       per-step metrics (rank 0), numbered append-only chunks
    stages/<name>/checkpoints/…   committed checkpoints (the stage resumes from the newest)
    stages/<name>/export/…        the trained model (timm-loadable; config.json last)
    stages/<name>/eval.json       eval stages

A stage whose STATUS says ``done`` for its config digest *and* whose output exists is skipped
(``pipeline/_plan.py``); an interrupted one resumes from its newest committed checkpoint, so
killing ``vitforge run`` at any moment and running it again redoes no finished stage. A changed
spec is refused unless ``--restart-from STAGE`` (that stage and its downstream are cleared).
SIGTERM or SIGINT while a gang runs asks it to stop (a ``PREEMPT`` marker in the stage
directory): the workers finish their step, checkpoint synchronously and the run ends
``preempted``; running the same command again continues.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.gang import GangFailedError, GangSpec, run_gang
from cluster.housekeeping import failures as housekeeping_failures
from cluster.access import check_access
from cluster.housekeeping import tolerate
from cluster.lease import Lease, fence_for
from cluster.runtime import ensure_ray
from cluster.storage import Store, StorageError
from jobs._trackers import tracker_env
from jobs.checkpoint import check_compatible, code_version
from jobs.engine import PREEMPT_MARKER
from jobs._extensions import resume_expect
from jobs._channel_check import check_stage_channels
from jobs.init import pin_init_hashes
from jobs.reshard import resume_plan
from jobs.layout import StageStatus
from jobs.stage import make_method, run_worker
from pipeline._modelcheck import check_models
from jobs.teacher_cache import (all_units, bytes_per_sample_epoch, pending_units, run_units, split_round_robin,
                                stage_job, write_manifest)
from pipeline._plan import (RUN_YAML, SHARDS, RunConflictError, check_restart_from, check_sources,  # noqa: F401
                            clear_stage, is_done, plan_run, record_extensions, record_spec)
from pipeline._progress import live_progress
from pipeline._stop import StopAborted, forward_stop_signals
from pipeline.spec import RunSpec, is_training_kind

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_root: str
    states: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)   # finished earlier (verified), not run again

    @property
    def preempted(self) -> bool:
        return "preempted" in self.states.values()


def run_spec(spec: RunSpec, address: str | None = None, fault: dict[str, Any] | None = None,
             restart_from: str | None = None) -> RunResult:
    """Run the stages of ``spec`` in order: finished ones are skipped, an interrupted one resumes.

    Before anything is written: remote inputs must exist, and the run root's ``run.yaml`` must hold
    the same spec (else :class:`RunConflictError` names the changed keys) unless ``restart_from``
    names a stage, which is then cleared and re-run with every stage downstream of it.
    Stops at the first stage that does not finish (``preempted``); raises when one fails.
    The run root's lease (``cluster/lease.py``) is held throughout: a second writer is refused
    (:class:`LeaseHeldError`) and a writer whose lease was taken over commits nothing. Before the lease,
    the identity's read, list, write and delete permissions under the run root are probed and any the
    run needs but lacks are named in one error (:func:`cluster.access.check_access`).
    """
    check_sources(spec)
    check_models(spec)  # timm refuses a model, or an init cannot fit its model: fails here, naming both
    check_stage_channels(spec)  # channels: a plain ViT cannot take fails here, naming the fix
    pin_init_hashes(spec)  # an init file's sha256 joins its stage's digest (and run.yaml)
    check_restart_from(spec, restart_from)  # a typo writes nothing, not even the lease
    check_access(Store(spec.run_root, spec.storage_options), access_needs(spec, restart_from), spec.storage_options)
    with Lease(Store(spec.run_root, spec.storage_options)).held():
        return _run_stages(spec, address, fault, restart_from)


def access_needs(spec: RunSpec, restart_from: str | None = None) -> dict[str, list[str]]:
    """Who in this run needs each storage permission under the run root (for the pre-flight's message)."""
    names = [s.name for s in spec.stages]
    training = [s.name for s in spec.stages if is_training_kind(s.kind)]
    delete = [f"{', '.join(training)} (checkpoint retention, stop markers)"] if training else []
    if restart_from:
        delete.append(f"--restart-from {restart_from} (clearing the stages it re-runs)")
    return {"read": names, "list": names, "write": ["the run's lease and record", *names], "delete": delete}


def _run_stages(spec: RunSpec, address: str | None, fault: dict[str, Any] | None,
                restart_from: str | None) -> RunResult:
    plan = plan_run(spec, restart_from)
    for note in plan.notes:
        log.warning("%s", note)
    for name in plan.reset:
        clear_stage(spec, name)
    record_extensions(spec, plan)
    record_spec(spec, replace=plan.changed)
    result = RunResult(spec.run_root)
    for stage in spec.stages:
        if stage.name in plan.done:
            log.info("stage %s (%s) is done; skipping", stage.name, stage.kind)
            result.states[stage.name] = "done"
            result.skipped.append(stage.name)
            continue
        state = _timed(spec, stage.name, lambda s=stage: _run_stage(spec, s, address, fault))
        result.states[stage.name] = state
        if state != "done":
            break
    return result


def _run_stage(spec: RunSpec, stage: Any, address: str | None, fault: dict[str, Any] | None) -> str:
    if stage.kind == "prep":
        return run_prep_stage(spec, stage.name, address=address)
    if stage.kind == "eval":
        return run_eval_stage(spec, stage.name, address=address)
    if stage.kind == "teacher_outputs":
        return run_teacher_outputs_stage(spec, stage.name, address=address)
    return run_training_stage(spec, stage.name, address=address, fault=fault)


def _timed(spec: RunSpec, name: str, fn: Any) -> str:
    """Run a stage; append ``{attempt, started_at, ended_at, seconds, state}`` to its STATUS ``history``."""
    t0 = time.time()
    state = "failed"
    try:
        state = fn()
        return state
    except StopAborted:
        state = "aborted"
        raise
    finally:
        try:
            StageStatus(spec.stage_url(name), spec.storage_options).record_attempt(
                t0, state, **({"driver_housekeeping_failures": hk} if (hk := housekeeping_failures()) else {}))
        except StorageError as exc:  # the stage's own outcome (or error) is what the user must see
            log.error("stage %s ended %s, but its STATUS history could not be written: %s", name, state, exc)


def run_prep_stage(spec: RunSpec, name: str, address: str | None = None) -> str:
    """Build a prep stage's shards at ``<stage>/shards`` (``run_prep`` resumes a half-built prep)."""
    from dataprep.prep import PrepOptions, run_prep

    stage, url, opts = spec.stage(name), spec.stage_url(name), spec.storage_options
    status = StageStatus(url, opts)
    status.start(kind="prep", name=name, config_digest=stage.digest(), code_version=code_version())
    options = PrepOptions.model_validate(stage.model_dump(include=set(PrepOptions.model_fields)))
    source = stage.source if "://" in stage.source else os.path.abspath(os.path.expanduser(stage.source))
    try:
        result = run_prep(source, spec.layout.stage(name).shards, options, address=address, storage_options=opts)
    except Exception as exc:
        record_failure(url, opts, exc)
        raise
    totals = result.manifest.totals
    status.finish("done", samples=totals.get("written"), rejected=totals.get("rejected"),
                  shards_built=result.shards_built)
    return "done"


def run_training_stage(spec: RunSpec, name: str, address: str | None = None,
                       fault: dict[str, Any] | None = None) -> str:
    """Run one training stage on a gang; ``done`` | ``preempted``. Raises when the gang gives up."""
    job = spec.stage_job(name, launcher="ray", fault=fault)
    stage_url, opts = job["stage_url"], spec.storage_options
    if is_done(spec, name):
        log.info("stage %s is done; skipping", name)
        return "done"
    status = StageStatus(stage_url, opts)
    before = status.read()
    if before.get("state") in ("running", "preempted", "failed"):
        log.info("stage %s was interrupted (%s, attempt %s); resuming from its newest committed checkpoint",
                 name, before.get("state"), before.get("attempts"))
    _preflight(spec, name)
    store = Store(stage_url, opts)
    tolerate("stop-marker clean-up", store.delete, PREEMPT_MARKER)  # a stop request belongs to its attempt
    job["lease"] = fence_for(spec.run_root, opts)  # workers fence their commits and STATUS writes with it
    ensure_ray(address)
    gang = GangSpec(workers=spec.compute.workers, cpus_per_worker=spec.compute.cpus_per_worker,
                    gpus_per_worker=spec.compute.gpus_per_worker, max_failures=spec.compute.max_failures,
                    name=f"{spec.name}-{name}", env=tracker_env())
    with forward_stop_signals(store, name), live_progress(store, name):
        try:
            state = run_gang(run_worker, job, gang)  # rank 0's outcome: done | preempted
        except GangFailedError as exc:
            record_failure(stage_url, opts, exc)
            raise
        except StopAborted as exc:  # resumable from the last committed checkpoint, like a preemption
            status.update(state="preempted", aborted=f"{exc} at {time.ctime()}")
            raise
    # Ray Train hands back no metrics under a Ray Jobs submission (tests/test_submit.py): there,
    # rank 0's STATUS.json is still the record
    return state or status.read().get("state", "failed")


def run_eval_stage(spec: RunSpec, name: str, address: str | None = None) -> str:
    """Run an eval stage as one Ray task with one gang worker's resources (see ``jobs/evaluate.py``)."""
    import ray

    from jobs.evaluate import format_table, run_eval

    job = spec.eval_job(name)
    if is_done(spec, name):
        log.info("stage %s is done; skipping", name)
        return "done"
    ensure_ray(address)
    task = ray.remote(run_eval).options(num_cpus=spec.compute.cpus_per_worker, num_gpus=spec.compute.gpus_per_worker,
                                        max_retries=spec.compute.max_failures, name=f"{spec.name}-{name}")
    try:
        report = ray.get(task.remote(job))
    except ray.exceptions.RayError as exc:  # the task's own error, or its worker died
        record_failure(job["stage_url"], spec.storage_options, exc)
        raise GangFailedError(f"eval stage {name!r} failed: {exc}") from exc
    log.info("stage %s (%s/eval.json):\n%s", name, job["stage_url"], format_table(report))
    return StageStatus(job["stage_url"], spec.storage_options).read().get("state", "failed")


def run_teacher_outputs_stage(spec: RunSpec, name: str, address: str | None = None,
                              fault: dict[str, Any] | None = None) -> str:
    """Compute the stage's missing units as ``compute.workers`` Ray tasks, then write its manifest."""
    import ray

    if is_done(spec, name):
        return "done"
    stage, url, opts = spec.stage(name), spec.stage_url(name), spec.storage_options
    job = stage_job(spec, name, fault)
    store = Store(job["cache_url"], opts)
    units = all_units(stage, job["data_url"], opts)
    pending = pending_units(store, units)
    status = StageStatus(url, opts)
    status.start(kind=stage.kind, name=name, config_digest=stage.digest(), code_version=code_version(),
                 units=len(units), pending_units=len(pending))
    try:
        if pending:
            ensure_ray(address)
            task = ray.remote(run_units).options(num_cpus=spec.compute.cpus_per_worker,
                                                 num_gpus=spec.compute.gpus_per_worker,
                                                 max_retries=spec.compute.max_failures, name=f"{spec.name}-{name}")
            refs = [task.remote(job, part) for part in split_round_robin(pending, spec.compute.workers)]
            ray.wait(refs, num_returns=len(refs))  # every task ends before the stage reports (no writer left behind)
            ray.get(refs)
        manifest = write_manifest(stage, store, units, job["data_url"], opts, job["data_digest"])
    except Exception as exc:
        record_failure(url, opts, exc)
        if isinstance(exc, ray.exceptions.RayError):
            raise GangFailedError(f"teacher_outputs stage {name!r} failed: {exc}") from exc
        raise
    status.finish("done", units=len(units), computed_units=len(pending), bytes=manifest["bytes"],
                  bytes_per_sample_epoch=round(bytes_per_sample_epoch(manifest), 2))
    return "done"


def record_failure(stage_url: str, opts: dict[str, Any], exc: BaseException) -> None:
    """STATUS ``failed`` with the first cause; when the store itself refuses (the usual reason a stage
    failed on storage), say so on stderr instead of hiding the cause behind the STATUS write's error."""
    cause = str(exc) if isinstance(exc, GangFailedError) else f"{type(exc).__name__}: {exc}"
    try:
        StageStatus(stage_url, opts).fail(cause)
    except StorageError as write_exc:
        log.error("stage %s failed: %s -- and STATUS.json could not be updated to say so: %s", stage_url,
                  cause[-2000:], write_exc)


def _preflight(spec: RunSpec, name: str) -> None:
    """Refuse, before any gang starts, to resume a checkpoint of another architecture or config, or one
    whose global batch this many workers cannot split (another number of workers is fine otherwise)."""
    stage, workers = spec.stage(name), spec.compute.workers
    plan = resume_plan(spec.stage_url(name), spec.storage_options, workers, stage)
    info = plan.checkpoint
    if info is None:
        return
    expect = {"arch": make_method(plan.shape(stage), 0).arch(), "config_digest": stage.digest()}
    check_compatible(info.meta, resume_expect(expect, spec.stage_url(name), spec.storage_options),
                     where=f"checkpoint {info.url}")
    if plan.reshaped:
        log.info("stage %s: resuming %d-worker checkpoint step %d on %d workers (batch_size %d x grad_accum %d "
                 "per worker keeps its global batch)", name, info.world_size, info.step, workers, plan.batch_size,
                 plan.grad_accum)

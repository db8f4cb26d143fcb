"""``vitforge run SPEC``: run a spec's stages, each training stage on a Ray Train gang.

For now a spec whose stages are training stages reading a manifest URL (prep stages are
validated but run by the multi-stage runner of a later issue). The run root gets::

    run.yaml                      the spec as first launched; a different spec is refused
    stages/<name>/STATUS.json     state: running | done | preempted | failed, attempts, digests
    stages/<name>/metrics.jsonl   per-step metrics (rank 0)
    stages/<name>/checkpoints/…   committed checkpoints (the stage resumes from the newest)
    stages/<name>/export/…        the trained encoder (timm-loadable)

A stage whose ``STATUS.json`` says ``done`` with the same config digest is skipped. SIGTERM or
SIGINT while a gang runs asks it to stop (a ``PREEMPT`` marker in the stage directory): the
workers finish their step, checkpoint synchronously and the run ends ``preempted``; running the
same command again continues.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml

from cluster.gang import GangFailedError, GangSpec, run_gang
from cluster.runtime import ensure_ray
from cluster.storage import Store, read_latest
from jobs.checkpoint import check_compatible
from jobs.engine import PREEMPT_MARKER
from jobs.stage import make_method, read_status, run_worker, update_status
from pipeline.spec import TRAINING_KINDS, RunSpec, SpecError, dump_spec

log = logging.getLogger(__name__)

RUN_YAML = "run.yaml"


class RunConflictError(SpecError):
    """The run root already holds a different spec."""


@dataclass
class RunResult:
    run_root: str
    states: dict[str, str] = field(default_factory=dict)

    @property
    def preempted(self) -> bool:
        return "preempted" in self.states.values()


def record_spec(spec: RunSpec) -> None:
    """Write ``run.yaml`` on first launch; refuse a later, different spec for the same run root."""
    store = Store(spec.run_root, spec.storage_options)
    text = dump_spec(spec)
    if store.exists(RUN_YAML):
        old = yaml.safe_load(store.get_bytes(RUN_YAML))
        if old != yaml.safe_load(text):
            changed = sorted(k for k in set(old) | set(yaml.safe_load(text)) if old.get(k) != yaml.safe_load(text).get(k))
            raise RunConflictError(
                f"{store.url_of(RUN_YAML)} holds a different spec (differs in: {', '.join(changed)}). "
                "Use a new run name, or delete the run root to start over.")
        return
    store.put_bytes(RUN_YAML, text.encode())


def run_spec(spec: RunSpec, address: str | None = None, fault: dict[str, Any] | None = None) -> RunResult:
    """Run every stage of ``spec`` in order (skipping finished ones). Returns each stage's state."""
    unsupported = [s.name for s in spec.stages if s.kind not in (*TRAINING_KINDS, "eval")]
    if unsupported:
        raise SpecError(f"stages {unsupported} are prep stages: this runner takes training stages reading a "
                        "manifest URL; run `vitforge prep SRC DEST` first and give `data: DEST`")
    record_spec(spec)
    result = RunResult(spec.run_root)
    for stage in spec.stages:
        if stage.kind == "eval":
            state = run_eval_stage(spec, stage.name, address=address)
        else:
            state = run_training_stage(spec, stage.name, address=address, fault=fault)
        result.states[stage.name] = state
        if state != "done":
            break
    return result


def run_training_stage(spec: RunSpec, name: str, address: str | None = None,
                       fault: dict[str, Any] | None = None) -> str:
    """Run one training stage on a gang; ``done`` | ``preempted``. Raises when the gang gives up."""
    job = spec.stage_job(name, launcher="ray")
    stage_url, opts = job["stage_url"], spec.storage_options
    status = read_status(stage_url, opts)
    digest = spec.stage(name).digest()
    if status.get("state") == "done" and status.get("config_digest") == digest:
        log.info("stage %s is done; skipping", name)
        return "done"
    _preflight(spec, name)
    store = Store(stage_url, opts)
    store.delete(PREEMPT_MARKER)  # a stop request belongs to the attempt it was made for
    if fault:
        job["fault"] = fault
    ensure_ray(address)
    gang = GangSpec(workers=spec.compute.workers, cpus_per_worker=spec.compute.cpus_per_worker,
                    gpus_per_worker=spec.compute.gpus_per_worker, max_failures=spec.compute.max_failures,
                    name=f"{spec.name}-{name}")
    with _forward_stop_signals(store):
        try:
            run_gang(run_worker, job, gang)
        except GangFailedError as exc:
            update_status(stage_url, opts, state="failed", error=str(exc)[-2000:])
            raise
    return read_status(stage_url, opts).get("state", "failed")


def run_eval_stage(spec: RunSpec, name: str, address: str | None = None) -> str:
    """Run an eval stage as one Ray task with one gang worker's resources (see ``jobs/evaluate.py``)."""
    import ray

    from jobs.evaluate import format_table, run_eval

    job = spec.eval_job(name)
    status = read_status(job["stage_url"], spec.storage_options)
    if status.get("state") == "done" and status.get("config_digest") == spec.stage(name).digest():
        log.info("stage %s is done; skipping", name)
        return "done"
    ensure_ray(address)
    task = ray.remote(run_eval).options(num_cpus=spec.compute.cpus_per_worker, num_gpus=spec.compute.gpus_per_worker,
                                        max_retries=spec.compute.max_failures, name=f"{spec.name}-{name}")
    try:
        report = ray.get(task.remote(job))
    except ray.exceptions.RayError as exc:  # the task's own error, or its worker died
        update_status(job["stage_url"], spec.storage_options, state="failed", error=str(exc)[-2000:])
        raise GangFailedError(f"eval stage {name!r} failed: {exc}") from exc
    log.info("stage %s (%s/eval.json):\n%s", name, job["stage_url"], format_table(report))
    return read_status(job["stage_url"], spec.storage_options).get("state", "failed")


def _preflight(spec: RunSpec, name: str) -> None:
    """Refuse, before any gang starts, to resume a checkpoint of another architecture or config."""
    store = Store(spec.stage_url(name), spec.storage_options).child("checkpoints")
    latest = read_latest(store, "", "step-")
    if latest is None:
        return
    stage = spec.stage(name)
    saved = store.get_json(f"{latest}/COMMITTED").get("meta", {})
    expect = {"arch": make_method(stage, 0).arch(), "config_digest": stage.digest(), "world_size": spec.compute.workers}
    check_compatible(saved, expect, where=f"checkpoint {store.url_of(latest)}")


class _forward_stop_signals:
    """While a gang runs, SIGTERM/SIGINT write the stage's PREEMPT marker instead of killing us."""

    def __init__(self, store: Store) -> None:
        self.store, self.saved = store, {}

    def _handler(self, signum: int, _frame: Any) -> None:
        log.warning("%s: asking the gang to checkpoint and stop", signal.Signals(signum).name)
        threading.Thread(target=self.store.put_bytes, args=(PREEMPT_MARKER, b"stop\n"), daemon=True).start()

    def __enter__(self) -> "_forward_stop_signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

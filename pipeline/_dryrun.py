"""``vitforge validate SPEC`` / ``vitforge run SPEC --dry-run``: the resolved spec and what a run would do.

    plan for s3://bucket/runs/mae-digits (started before):
      data      prep      skip: done
      pretrain  mae       resume: from checkpoint step 96 (was preempted)
      probe     finetune  run

Reads the store only (``run.yaml``, each stage's ``STATUS.json`` and newest checkpoint): no lease,
no ``run.yaml``, no STATUS is written, so it is safe beside a running run. A spec the run root would
refuse (changed since ``run.yaml``) raises the same :class:`pipeline._plan.RunConflictError` as a run.
"""

from __future__ import annotations

from typing import Any

from jobs._init_files import pin_init_hashes
from jobs.layout import StageStatus
from pipeline._plan import Plan, check_sources, plan_run
from pipeline.spec import RunSpec, is_training_kind


def plan_lines(spec: RunSpec, restart_from: str | None = None) -> list[str]:
    """What ``vitforge run`` would do with ``spec``, one line per stage, after any notes on changes."""
    check_sources(spec)
    pin_init_hashes(spec)  # as a run does: the init's hash is part of its stage's digest
    plan = plan_run(spec, restart_from)
    lines = [f"plan for {spec.run_root} ({'a new run' if plan.first_launch else 'started before'}):"]
    lines += [f"  note: {note}" for note in plan.notes]
    width = max(len(s.name) for s in spec.stages)
    kinds = max(len(s.kind) for s in spec.stages)
    for stage in spec.stages:
        lines.append(f"  {stage.name:<{width}}  {stage.kind:<{kinds}}  {stage_action(spec, stage, plan)}")
    return lines


def stage_action(spec: RunSpec, stage: Any, plan: Plan) -> str:
    """``skip: done``, ``clear and rerun``, ``extend: …``, ``resume: …`` or ``run``."""
    if stage.name in plan.done:
        return "skip: done"
    if stage.name in plan.reset:
        return "clear and rerun"
    status = StageStatus(spec.stage_url(stage.name), spec.storage_options).read()
    step = _checkpoint_step(spec, stage)
    if stage.name in plan.extended:
        return f"extend: continue from checkpoint step {step} to the new length" if step is not None else \
            "extend: run (no checkpoint yet)"
    if step is not None:
        return f"resume: from checkpoint step {step} (was {status.get('state', 'interrupted')})"
    if status.get("state"):
        return f"run (was {status['state']}" + (": reuses finished shards)" if stage.kind == "prep" else ")")
    return "run"


def _checkpoint_step(spec: RunSpec, stage: Any) -> int | None:
    if not is_training_kind(stage.kind):
        return None
    from jobs.checkpoint import latest_committed

    info = latest_committed(spec.stage_url(stage.name), spec.storage_options)
    return None if info is None else info.step

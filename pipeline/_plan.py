"""What a run must do, decided from the store before anything is written.

For every stage: *done* (``STATUS.json`` says ``done`` for this config digest and its outputs
verify) is skipped; anything else runs (an interrupted training stage resumes from its newest
committed checkpoint). A spec that differs from the run's ``run.yaml``, or a finished stage whose
config changed, is refused with the changed keys named, unless ``--restart-from STAGE`` names a
stage: that stage and everything downstream of it (stages reading it, transitively) are cleared and
re-run.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from cluster.storage import CorruptRecordError, Store
from dataprep.manifest import MANIFEST
from jobs.layout import (CACHE_MANIFEST_NAME, CACHE_NAME, EVAL_JSON_NAME, EXPORT_CONFIG_NAME, EXPORT_NAME, RUN_YAML_NAME,
                         SHARDS_NAME, STATUS_NAME, StageStatus)
from pipeline._changes import classify, describe, stamped
from pipeline.spec import RunSpec, SpecError, dump_spec, input_paths, is_training_kind, stage_inputs

log = logging.getLogger(__name__)

RUN_YAML = RUN_YAML_NAME
SHARDS = SHARDS_NAME   # a prep stage's output folder
EXPORT = EXPORT_NAME   # a training stage's output folder
# spec keys that only say where stages run: they may change between launches of one run (a training
# stage then resumes on another number of workers, see jobs/reshard.py); gpus_per_worker is not among
# them (it changes the precision a stage trains in)
PLACEMENT = ("compute.workers", "compute.cpus_per_worker", "compute.max_failures")
# how the store is reached (fsspec options, the endpoint in them) may change too: not the run's identity
ACCESS = ("storage_options",)


class RunConflictError(SpecError):
    """The run root holds a different spec, or a finished stage whose config changed."""


@dataclass
class Plan:
    done: set[str] = field(default_factory=set)        # verified finished: skipped
    reset: list[str] = field(default_factory=list)     # cleared, then re-run (--restart-from, or an extension)
    first_launch: bool = True
    notes: list[str] = field(default_factory=list)     # changes since run.yaml that were taken
    extended: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> extension record (_changes.py)

    @property
    def changed(self) -> bool:
        """run.yaml is rewritten: stages were cleared or changes taken."""
        return bool(self.reset or self.notes)


def output_of(kind: str) -> str:
    """The file whose presence proves a finished stage's output (each is written last)."""
    if kind == "prep":
        return posixpath.join(SHARDS, MANIFEST)
    if kind == "eval":
        return EVAL_JSON_NAME
    if kind == "teacher_outputs":
        return posixpath.join(CACHE_NAME, CACHE_MANIFEST_NAME)
    return posixpath.join(EXPORT, EXPORT_CONFIG_NAME)


def is_done(spec: RunSpec, name: str, status: dict[str, Any] | None = None) -> bool:
    """STATUS says done for this config digest, and the stage's output exists."""
    stage = spec.stage(name)
    status = StageStatus(spec.stage_url(name), spec.storage_options).read() if status is None else status
    if status.get("state") != "done" or status.get("config_digest") != stage.digest():
        return False
    return _record_ok(Store(spec.stage_url(name), spec.storage_options), output_of(stage.kind))


def _record_ok(store: Store, rel: str) -> bool:
    """The stage's final record exists and parses (a corrupt one means the stage is not done: it reruns)."""
    try:
        store.get_json(rel)
        return True
    except FileNotFoundError:
        return False
    except CorruptRecordError as exc:
        log.warning("%s; the stage runs again", exc)
        return False


def downstream(spec: RunSpec, name: str) -> list[str]:
    """``name`` and every stage that reads it, directly or through others, in spec order."""
    hit = {name}
    for stage in spec.stages:
        if any(ref in hit for ref in stage_inputs(stage)):
            hit.add(stage.name)
    return [s.name for s in spec.stages if s.name in hit]


def check_restart_from(spec: RunSpec, restart_from: str | None) -> None:
    """Refuse ``--restart-from`` naming no stage of ``spec`` (a pure check: before the run's lease is taken)."""
    names = [s.name for s in spec.stages]
    if restart_from is not None and restart_from not in names:
        raise SpecError(f"--restart-from {restart_from!r}: no such stage; stages: {', '.join(names)}")


def plan_run(spec: RunSpec, restart_from: str | None = None) -> Plan:
    """Decide what to skip and what to clear; raise :class:`RunConflictError` on a changed spec. Reads only."""
    check_restart_from(spec, restart_from)
    store = Store(spec.run_root, spec.storage_options)
    old = _read_run_yaml(store)
    new = yaml.safe_load(dump_spec(spec))
    plan = Plan(first_launch=old is None, reset=downstream(spec, restart_from) if restart_from else [])
    changed = spec_diff(old, new) if old is not None else []
    moved = [k for k in changed if k in PLACEMENT or k.split(".")[0] in ACCESS]
    if moved:
        log.info("%s changed since the run started (%s): only where stages run or how the store is reached; an interrupted training stage "
                 "continues from its checkpoint on the new gang", store.url_of(RUN_YAML), _fmt(moved))
        changed = [k for k in changed if k not in moved]
    if changed and restart_from is None:
        changed = _take_safe_changes(plan, old, spec, changed)
    if changed and restart_from is None:
        raise RunConflictError(
            f"{store.url_of(RUN_YAML)} holds a different spec; changed: {_fmt(changed)}.\n"
            "Finished stages are never redone silently: pass --restart-from STAGE to re-run STAGE and every "
            "stage downstream of it with the new spec, or give the run a new name.")
    for stage in spec.stages:
        status = StageStatus(spec.stage_url(stage.name), spec.storage_options).read()
        if stage.name in plan.reset or stage.name in plan.extended:
            continue
        if is_done(spec, stage.name, status):
            plan.done.add(stage.name)
        elif status.get("state") == "done" and status.get("config_digest") != stage.digest():
            keys = [k for k in changed if k.startswith(f"stages.{stage.name}.")] or ["its config digest"]
            raise RunConflictError(
                f"stage {stage.name!r} finished with another config; changed: {_fmt(keys)}.\n"
                f"Pass --restart-from {stage.name} to re-run it and every stage downstream of it.")
    return plan


def _take_safe_changes(plan: Plan, old: dict[str, Any], spec: RunSpec, changed: list[str]) -> list[str]:
    """Take the changes outside the stages' digests and the extensions into ``plan``; the rest stays refused."""
    split = classify(old, spec, changed, is_training_kind, lambda name: started(spec, name))
    if split.refused:
        return changed  # refused as a whole: the message names every changed key
    if split.safe:
        plan.notes.append(f"changed since the last launch, outside the stages' digests: {_fmt(split.safe)}")
    if split.unstarted:
        plan.notes.append(f"changed since the last launch, in stages that never started: {_fmt(split.unstarted)}")
    plan.extended = split.extended
    for name, record in split.extended.items():
        plan.notes.append(describe(name, record))
        plan.reset += [d for d in downstream(spec, name)[1:] if d not in plan.reset]
    return []


def started(spec: RunSpec, name: str) -> bool:
    """Whether stage ``name`` has written anything (STATUS, a checkpoint, an output) to its directory."""
    return bool(Store(spec.stage_url(name), spec.storage_options).ls(""))


def record_extensions(spec: RunSpec, plan: Plan) -> None:
    """Append each extension to its stage's STATUS ``extensions`` (a stage that never started has no STATUS)."""
    for name, record in plan.extended.items():
        status = StageStatus(spec.stage_url(name), spec.storage_options)
        before = status.read()
        if before.get("state"):
            status.update(extensions=[*before.get("extensions", []), stamped(record, before)])


def clear_stage(spec: RunSpec, name: str) -> None:
    """Remove a stage's outputs, checkpoints and status. STATUS goes first, so a crash half-way never
    leaves a stage that looks finished."""
    store = Store(spec.stage_url(name), spec.storage_options)
    store.delete(STATUS_NAME)
    store.delete(output_of(spec.stage(name).kind))
    store.delete("", recursive=True)
    log.info("cleared stage %s (%s)", name, store.url)


def record_spec(spec: RunSpec, replace: bool = False) -> None:
    """Write ``run.yaml`` (the spec as launched); ``replace`` after a ``--restart-from``."""
    store = Store(spec.run_root, spec.storage_options)
    if replace or not store.exists(RUN_YAML):
        store.put_bytes(RUN_YAML, dump_spec(spec).encode())


def check_sources(spec: RunSpec) -> None:
    """Every input that is not an earlier stage (a local path, ``s3://…``, ``file://…``) exists.

    Checked by the runner before the run writes anything, not by spec validation: a spec validated
    on one machine (``vitforge submit``) may name paths that exist only on the cluster.
    """
    missing = [f"  {where}: {url} does not exist (or is empty)" for where, url in input_paths(spec)
               if not _input_exists(url, spec.storage_options)]
    if missing:
        raise SpecError("the spec names missing inputs (fix the path or URL, or run the stage that makes them):\n"
                        + "\n".join(missing))


def _input_exists(url: str, storage_options: dict[str, Any]) -> bool:
    if "://" in url:
        return _url_exists(url, storage_options)
    return os.path.exists(os.path.expanduser(url))


def spec_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted key paths that differ (stages addressed by name: ``stages.pretrain.epochs``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += spec_diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if prefix == "stages" and isinstance(old, list) and isinstance(new, list):
        return _stages_diff(old, new)
    return [] if old == new else [prefix or "(spec)"]


def _stages_diff(old: list, new: list) -> list[str]:
    by_name = lambda items: {s.get("name"): s for s in items if isinstance(s, dict)}  # noqa: E731
    o, n = by_name(old), by_name(new)
    out = []
    for name in [*o, *(k for k in n if k not in o)]:
        if name not in n or name not in o:
            out.append(f"stages.{name} ({'removed' if name not in n else 'added'})")
        else:
            out += spec_diff(o[name], n[name], f"stages.{name}")
    if not out and [s.get("name") for s in old] != [s.get("name") for s in new]:
        out.append("stages (order)")
    return out


def _fmt(keys: list[str]) -> str:
    return ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")


def _read_run_yaml(store: Store) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(store.get_bytes(RUN_YAML))
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else None


def _url_exists(url: str, storage_options: dict[str, Any]) -> bool:
    store = Store(url, storage_options)
    if store.ls(""):
        return True
    parent, base = posixpath.split(url.rstrip("/"))
    return bool(base) and Store(parent, storage_options).exists(base)

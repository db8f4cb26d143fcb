"""Which changes to a started run's spec are safe, and which extend a training stage.

A relaunch with another spec than ``run.yaml`` is refused unless every changed key is one of:

* **in a stage that never started** (nothing in its directory: no ``STATUS.json``, no checkpoint, no
  output; e.g. downstream of a stage that was preempted): any change, taken with a note, since the
  stage has computed nothing the change could contradict;
* **outside its stage's digest** (``checkpoint``, ``loader_workers``, ``trackers``, ``progress`` of a
  training stage, a prep stage's ``workers``, an eval stage's ``batch_size``): taken, with a note;
* **a longer training stage**: ``epochs`` (or ``max_steps``) raised, nothing else in the digest
  changed. The stage continues from its newest checkpoint, finished or not, and every stage
  downstream of it is cleared and rerun. The length is given in the same field as before (from
  ``epochs`` to ``max_steps`` is refused: the driver cannot compare them before the data is read).

What an extension means for the schedules: the remaining steps follow the schedules of the new
length, as if the stage had been planned that long; steps already taken keep what they had. The lr
is the half-cosine from the peak to ``min_lr`` over the *new* total, evaluated from the resume step
on: a running stage's lr steps up a little, a finished one (lr at ``min_lr``) restarts at the value
the longer cosine has at that step, a warm restart as in SGDR (Loshchilov & Hutter), then decays to
``min_lr`` at the new end. A method's own schedules (DINO's teacher momentum and temperature) are
stretched the same way. Each extension is recorded in the stage's ``STATUS.json`` under
``extensions`` (old and new length, state, step, both digests), and a checkpoint written under the
old digest is accepted for the new one through that record (:func:`jobs._extensions.accepted_digests`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

LENGTH_FIELDS = ("epochs", "max_steps")


@dataclass
class StageChanges:
    safe: list[str] = field(default_factory=list)                  # outside the digests: taken as they are
    unstarted: list[str] = field(default_factory=list)             # in stages that never started: taken too
    extended: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its extension record
    refused: list[str] = field(default_factory=list)               # change what a stage computes


def classify(old_spec: dict[str, Any], spec: Any, changed: list[str], is_training: Callable[[str], bool],
             started: Callable[[str], bool]) -> StageChanges:
    """Split ``changed`` (keys of :func:`pipeline._plan.spec_diff`) by what they do to their stage;
    ``started(name)``: whether stage ``name`` has written anything yet."""
    old_stages = {s.get("name"): s for s in old_spec.get("stages") or [] if isinstance(s, dict)}
    names = {s.name for s in spec.stages}
    by_stage: dict[str, list[str]] = {}
    out = StageChanges()
    for key in changed:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "stages" and parts[1] in names and parts[1] in old_stages:
            by_stage.setdefault(parts[1], []).append(key)
        else:
            out.refused.append(key)
    for name, keys in by_stage.items():
        if not started(name):
            out.unstarted += keys
            continue
        stage = spec.stage(name)
        verdict = _verdict(old_stages[name], stage, is_training(stage.kind))
        if verdict == "safe":
            out.safe += keys
        elif verdict == "longer":
            out.extended[name] = _record(old_stages[name], stage)
            out.safe += [k for k in keys if k.split(".")[2] not in LENGTH_FIELDS]
        else:
            out.refused += keys
    return out


def _verdict(old: dict[str, Any], stage: Any, training: bool) -> str:
    """``safe`` (same digest), ``longer`` (only the length grew) or ``refused``."""
    try:
        before = type(stage).model_validate(old)
    except ValidationError:
        return "refused"
    if before.digest() == stage.digest():
        return "safe"
    if not training:
        return "refused"
    same_length = type(stage).model_validate({**old, **{f: getattr(stage, f) for f in LENGTH_FIELDS}})
    if same_length.digest() != stage.digest():
        return "refused"
    if before.max_steps is not None and stage.max_steps is not None:
        return "longer" if stage.max_steps > before.max_steps else "refused"
    if before.max_steps is None and stage.max_steps is None:
        return "longer" if stage.epochs > before.epochs else "refused"
    return "refused"


def _record(old: dict[str, Any], stage: Any) -> dict[str, Any]:
    before = type(stage).model_validate(old)
    return {"from": {f: getattr(before, f) for f in LENGTH_FIELDS}, "to": {f: getattr(stage, f) for f in LENGTH_FIELDS},
            "from_digest": before.digest(), "to_digest": stage.digest()}


def describe(name: str, record: dict[str, Any]) -> str:
    field_ = "max_steps" if record["to"]["max_steps"] is not None else "epochs"
    return (f"stage {name} is extended: {field_} {record['from'][field_]} -> {record['to'][field_]}; it continues "
            "from its newest checkpoint (the cosine lr over the new length from there on), and the stages "
            "downstream of it rerun")


def stamped(record: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The record as stored in STATUS ``extensions``: with the stage's state and step when it was extended."""
    return {**record, "state": status.get("state"), "step": status.get("step"), "at": time.time()}

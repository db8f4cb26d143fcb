"""The run store's layout: the one place its names are spelled, and the one writer of ``STATUS.json``.

    <run_root>/                       RunLayout(root)
      run.yaml                          .run_yaml
      report/                           .report
      stages/<name>/                    .stage(name) -> StageLayout
        STATUS.json                       .status      (StageStatus writes it)
        PREEMPT                           .preempt     (a driver's stop request)
        shards/ manifest.json             .shards      (prep)
        metrics/00000000.jsonl ...        .metrics     (training: numbered append-only chunks,
                                                        metrics_chunk_name(i); jobs/metrics.py)
        metrics.jsonl                     .metrics_legacy  (runs written before chunks)
        checkpoints/step-00001200/        .checkpoints, checkpoint_name(step)
        export/                           .export      (training)
        eval.json                         .eval_json   (eval)
        cache/units/ manifest.json        .cache       (teacher_outputs)

Every property is a URL; the ``*_NAME`` constants are the same names relative to their folder, for
code that holds a :class:`~cluster.storage.Store` of the folder already.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from cluster.storage import CorruptRecordError, Store

log = logging.getLogger(__name__)

RUN_YAML_NAME = "run.yaml"
REPORT_NAME = "report"
STAGES_NAME = "stages"
STATUS_NAME = "STATUS.json"
PREEMPT_NAME = "PREEMPT"
SHARDS_NAME = "shards"
METRICS_NAME = "metrics.jsonl"   # the one-file format of older runs; also the metrics file inside a checkpoint
METRICS_DIR_NAME = "metrics"     # metrics/00000012.jsonl: chunk 12
METRICS_CHUNK_SUFFIX = ".jsonl"
CHECKPOINTS_NAME = "checkpoints"
EXPORT_NAME = "export"
EXPORT_CONFIG_NAME = "config.json"  # export/config.json: written last, so it proves the export
EXPORT_WEIGHTS_NAME = "model.safetensors"  # an export's weights (jobs/export.py)
EVAL_JSON_NAME = "eval.json"
CACHE_NAME = "cache"
CACHE_MANIFEST_NAME = "manifest.json"  # cache/manifest.json: written last, so it proves the cache
CHECKPOINT_PREFIX = "step-"   # checkpoints/step-00001200/


def checkpoint_name(step: int) -> str:
    """``step-00001200``: the folder of the checkpoint after ``step`` (zero-padded, so names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder name (``ValueError`` for anything else)."""
    if not name.startswith(CHECKPOINT_PREFIX):
        raise ValueError(f"{name!r} is not a checkpoint name ({CHECKPOINT_PREFIX}XXXXXXXX)")
    return int(name[len(CHECKPOINT_PREFIX):])


def metrics_chunk_name(index: int) -> str:
    """``metrics/00000012.jsonl``: chunk ``index`` of a stage's metrics (zero-padded, so names sort by index)."""
    return f"{METRICS_DIR_NAME}/{index:08d}{METRICS_CHUNK_SUFFIX}"


def metrics_chunk_index(name: str) -> int | None:
    """The index of a chunk's file name under ``metrics/`` (``00000012.jsonl`` -> 12); None for anything else."""
    stem = name[:-len(METRICS_CHUNK_SUFFIX)] if name.endswith(METRICS_CHUNK_SUFFIX) else ""
    return int(stem) if stem.isdigit() and len(stem) == 8 else None


def _join(url: str, *names: str) -> str:
    return posixpath.join(url.rstrip("/"), *names)


@dataclass(frozen=True)
class StageLayout:
    """Where one stage's files are (``<run_root>/stages/<name>``)."""

    url: str

    @property
    def status(self) -> str:
        return _join(self.url, STATUS_NAME)

    @property
    def preempt(self) -> str:
        return _join(self.url, PREEMPT_NAME)

    @property
    def shards(self) -> str:
        return _join(self.url, SHARDS_NAME)

    @property
    def metrics(self) -> str:
        """The folder of the numbered metrics chunks (:func:`metrics_chunk_name`)."""
        return _join(self.url, METRICS_DIR_NAME)

    @property
    def metrics_legacy(self) -> str:
        """The single ``metrics.jsonl`` of runs written before chunks (still read, never written)."""
        return _join(self.url, METRICS_NAME)

    @property
    def checkpoints(self) -> str:
        return _join(self.url, CHECKPOINTS_NAME)

    @property
    def export(self) -> str:
        return _join(self.url, EXPORT_NAME)

    @property
    def eval_json(self) -> str:
        return _join(self.url, EVAL_JSON_NAME)

    @property
    def cache(self) -> str:
        return _join(self.url, CACHE_NAME)


@dataclass(frozen=True)
class RunLayout:
    """Where a run's files are, under its run root (any fsspec URL)."""

    root: str

    @property
    def run_yaml(self) -> str:
        return _join(self.root, RUN_YAML_NAME)

    @property
    def report(self) -> str:
        return _join(self.root, REPORT_NAME)

    @property
    def stages(self) -> str:
        return _join(self.root, STAGES_NAME)

    def stage(self, name: str) -> StageLayout:
        return StageLayout(_join(self.root, STAGES_NAME, name))


class StageStatus:
    """The one writer of a stage's ``STATUS.json``: read, start, finish, fail, and the attempt history.

    One writer at a time: rank 0 of a gang, the eval task, or the driver when no gang runs.
    """

    def __init__(self, stage_url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = Store(stage_url, storage_options)

    def read(self) -> dict[str, Any]:
        try:
            return dict(self.store.get_json(STATUS_NAME))
        except FileNotFoundError:
            return {}
        except CorruptRecordError as exc:  # not done, whatever it said: the stage runs again and rewrites it
            log.warning("%s", exc)
            return {"state": "corrupt", "error": str(exc)}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the status (``updated_at`` set)."""
        status = self.read()
        status.update(fields, updated_at=time.time())
        self.store.check_fence(STATUS_NAME, "write")  # a writer that lost the run's lease (cluster/lease.py) writes nothing
        self.store.put_json(STATUS_NAME, status)
        return status

    def start(self, **fields: Any) -> dict[str, Any]:
        """A new attempt: ``state: running``, ``attempts`` counted up, ``started_at``, plus ``fields``
        (kind, name, config_digest, code_version, placement)."""
        attempts = int(self.read().get("attempts", 0)) + 1
        return self.update(state="running", **fields, attempts=attempts, started_at=time.time())

    def finish(self, state: str = "done", **fields: Any) -> dict[str, Any]:
        """The attempt ended ``state`` (``done`` also sets ``finished_at``)."""
        return self.update(state=state, **fields, **({"finished_at": time.time()} if state == "done" else {}))

    def fail(self, error: str) -> dict[str, Any]:
        return self.update(state="failed", error=error[-2000:])

    def record_attempt(self, started_at: float, state: str, **fields: Any) -> dict[str, Any]:
        """Append ``{attempt, started_at, ended_at, seconds, state}`` of the attempt just ended to ``history``."""
        status = self.read()
        now = time.time()
        history = [*status.get("history", []), {"attempt": status.get("attempts"), "started_at": started_at,
                                                "ended_at": now, "seconds": round(now - started_at, 3),
                                                "state": state}]
        return self.update(history=history, **fields)

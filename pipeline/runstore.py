"""A read-only view of a run root in the store, for ``status``, ``report`` and ``export``.

It reads what the writers leave (names from ``jobs/layout.py``) and never writes::

    run.yaml                              stage order and kinds (read as plain YAML, not validated)
    stages/<name>/STATUS.json             state, attempts, timings (jobs/layout.py StageStatus)
    stages/<name>/metrics/                one record per step, in numbered chunks (jobs/metrics.py;
                                          an older run's single metrics.jsonl is read too)
    stages/<name>/checkpoints/latest      newest committed checkpoint (checked against COMMITTED)
    stages/<name>/export/config.json      written last by an export: its presence means finished
    stages/<name>/eval.json               eval stages (jobs/evaluate.py)
    stages/<name>/shards/manifest.json    prep stages (written last); _progress/ while building

Works on any fsspec URL the :class:`~cluster.storage.Store` speaks (``file://``, paths, ``s3://``).
"""

from __future__ import annotations

import logging
import posixpath
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from cluster.storage import CorruptRecordError, Store, read_latest
from jobs._live import HEARTBEAT
from jobs.checkpoint import latest_committed
from jobs.layout import EVAL_JSON_NAME, EXPORT_NAME, RUN_YAML_NAME, SHARDS_NAME, STAGES_NAME, STATUS_NAME
from jobs.metrics import read_metrics
from pipeline._heartbeat import apply_heartbeat

log = logging.getLogger(__name__)

RUN_YAML = RUN_YAML_NAME
STATUS = STATUS_NAME
EVAL_JSON = EVAL_JSON_NAME
EXPORT = EXPORT_NAME
EXPORT_CONFIG = "config.json"
SHARDS = SHARDS_NAME
STATES = ("done", "running", "preempted", "failed", "pending")
_TAIL_BYTES = 64 * 1024


class RunNotFoundError(LookupError):
    """The URL holds no run (no ``run.yaml`` and no ``stages/``)."""


class ExportNotReadyError(LookupError):
    """The stage has no finished export."""


@dataclass
class StageView:
    """What ``vitforge status`` shows for one stage (JSON-able with :meth:`as_dict`)."""

    name: str
    kind: str | None
    state: str
    url: str
    attempts: int = 0
    step: int | None = None
    total_steps: int | None = None
    shards: int | None = None
    total_shards: int | None = None
    checkpoint: str | None = None
    checkpoint_url: str | None = None
    duration_s: float | None = None
    last_loss: float | None = None
    images_per_s: float | None = None
    val_top1: float | None = None
    eval: dict[str, dict[str, float]] = field(default_factory=dict)   # model -> {knn_top1, linear_top1}
    samples: int | None = None
    rejected: int | None = None
    export_url: str | None = None
    error: str | None = None
    heartbeat_age_s: float | None = None   # training: seconds since rank 0's last heartbeat (running, stale)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunView:
    """The run at ``run_root``. Raises :class:`RunNotFoundError` when there is none."""

    def __init__(self, run_root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = Store(run_root, storage_options)
        self.storage_options = storage_options
        self.url = self.store.url
        self.spec = self._read_spec()
        self._dirs = self.store.ls(STAGES_NAME)
        if self.spec is None and not self._dirs:
            raise RunNotFoundError(self._not_found_message())

    # ---- the run --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str((self.spec or {}).get("name") or posixpath.basename(self.url.rstrip("/")))

    def stage_names(self) -> list[str]:
        """Stages in spec order, then any stage directory the spec does not name."""
        named = [s.get("name") for s in self._spec_stages() if s.get("name")]
        return named + [d for d in self._dirs if d not in named]

    def stage_spec(self, name: str) -> dict[str, Any]:
        return next((s for s in self._spec_stages() if s.get("name") == name), {})

    def stage_store(self, name: str) -> Store:
        return self.store.child(posixpath.join(STAGES_NAME, name))

    def stages(self) -> list[StageView]:
        evals = self.eval_reports()
        return [self.stage(name, evals) for name in self.stage_names()]

    # ---- one stage ------------------------------------------------------------------------
    def stage(self, name: str, evals: dict[str, dict[str, Any]] | None = None) -> StageView:
        store = self.stage_store(name)
        try:
            status = store.get_json(STATUS)
        except FileNotFoundError:
            status = {}
        except CorruptRecordError as exc:
            status = {"state": "corrupt", "error": str(exc)}
        kind = status.get("kind") or self.stage_spec(name).get("kind")
        view = StageView(name=name, kind=kind, state=status.get("state") or "pending", url=store.url,
                         attempts=int(status.get("attempts") or 0), error=status.get("error"))
        view.duration_s = _duration(status)
        if kind == "prep":
            self._fill_prep(view, store)
        elif kind == "eval":
            view.eval = _eval_models(_get_json(store, EVAL_JSON))
        else:
            self._fill_training(view, store, status)
        for report in (evals if evals is not None else self.eval_reports()).values():
            if name in _eval_models(report) and kind != "eval":
                view.eval[name] = _eval_models(report)[name]
        return view

    def _fill_training(self, view: StageView, store: Store, status: dict[str, Any]) -> None:
        records = read_metrics(store, tail_bytes=_TAIL_BYTES)
        latest = latest_committed(store.url, self.storage_options)
        ckpt_step = latest.step if latest else None
        steps = [s for s in (status.get("step"), records[-1].get("step") if records else None, ckpt_step) if s is not None]
        view.step = max(steps) if steps else None
        view.total_steps = status.get("total_steps") or self.stage_spec(view.name).get("max_steps")
        if latest:
            view.checkpoint, view.checkpoint_url = latest.name, latest.url
        if records:
            view.last_loss = records[-1].get("loss")
            rates = [r["images_per_s"] for r in records[-50:] if r.get("images_per_s")]
            view.images_per_s = statistics.median(rates) if rates else None
            tops = [r["val_top1"] for r in records if r.get("val_top1") is not None]
            view.val_top1 = tops[-1] if tops else None
        if store.exists(posixpath.join(EXPORT, EXPORT_CONFIG)):
            view.export_url = store.url_of(EXPORT)
        apply_heartbeat(view, status, _get_json(store, HEARTBEAT) if view.state == "running" else None)

    def _fill_prep(self, view: StageView, store: Store) -> None:
        shards = store.child(SHARDS)
        manifest = _get_json(shards, "manifest.json")
        if manifest is not None:
            count = sum(len(s.get("shards", [])) for s in manifest.get("splits", {}).values())
            view.shards = view.total_shards = count
            view.samples = manifest.get("totals", {}).get("written")
            view.rejected = manifest.get("totals", {}).get("rejected")
            if view.state == "pending":  # a prep stage's output without a STATUS (prepped by `vitforge prep`)
                view.state = "done"
        else:
            built = [n for n in shards.ls("_progress") if "-shard-" in n]
            view.shards = len(built) if built else None

    # ---- metrics, evals, exports -----------------------------------------------------------
    def metrics(self, name: str) -> list[dict[str, Any]]:
        """Every step record of stage ``name``, one per step, in order (empty when there is none)."""
        return read_metrics(self.stage_store(name))

    def eval_reports(self) -> dict[str, dict[str, Any]]:
        """``eval.json`` of every stage that has one: stage name -> document."""
        reports = {}
        for name in self.stage_names():
            if self.stage_spec(name).get("kind", "eval") != "eval":
                continue
            doc = _get_json(self.stage_store(name), EVAL_JSON)
            if doc is not None:
                reports[name] = doc
        return reports

    def export_store(self, name: str) -> Store:
        """The finished export of stage ``name``; :class:`ExportNotReadyError` names why there is none."""
        if name not in self.stage_names():
            raise ExportNotReadyError(f"run {self.url} has no stage {name!r}; stages: {', '.join(self.stage_names())}")
        kind = self.stage_spec(name).get("kind")
        if kind in ("prep", "eval"):
            raise ExportNotReadyError(f"stage {name!r} is a {kind} stage; it exports no model (name a training stage)")
        export = self.stage_store(name).child(EXPORT)
        if not export.exists(EXPORT_CONFIG):
            view = self.stage(name, evals={})
            where = f"{view.step}/{view.total_steps or '?'} steps" if view.step is not None else "not started"
            raise ExportNotReadyError(
                f"stage {name!r} has no export yet (state: {view.state}, {where}); a training stage exports "
                f"when it finishes. Run `vitforge status {self.url}` to follow it.")
        return export

    # ---- internals ------------------------------------------------------------------------
    def _read_spec(self) -> dict[str, Any] | None:
        try:
            doc = yaml.safe_load(self.store.get_bytes(RUN_YAML))
        except FileNotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    def _spec_stages(self) -> list[dict[str, Any]]:
        stages = (self.spec or {}).get("stages") or []
        return [s for s in stages if isinstance(s, dict)]

    def _not_found_message(self) -> str:
        runs = [n for n in self.store.ls("") if self.store.exists(posixpath.join(n, RUN_YAML))][:10]
        hint = (f" It holds runs: {', '.join(runs)} (RUN_ROOT is <storage>/<name>)." if runs
                else " RUN_ROOT is the spec's <storage>/<name>.")
        return f"no run at {self.url}: it has no {RUN_YAML} and no stages/.{hint}"


def copy_export(view: RunView, stage: str, dest: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Copy stage ``stage``'s finished export to ``dest`` (any URL or path); ``config.json`` last.

    Returns the copied file names. Refuses a stage without a finished export.
    """
    src = view.export_store(stage)
    dst = Store(dest, storage_options)
    names = sorted(_walk(src), key=lambda n: (n == EXPORT_CONFIG, n))
    for name in names:
        with src.open_read(name) as f:
            dst.put_fileobj(name, f)
        if dst.size(name) != src.size(name):
            raise OSError(f"copy of {src.url_of(name)} to {dst.url_of(name)} is incomplete; run the export again")
    return names


def _walk(store: Store, rel: str = "") -> list[str]:
    names = []
    for name in store.ls(rel):
        path = posixpath.join(rel, name) if rel else name
        children = store.ls(path)
        names.extend(_walk(store, path) if children else [path])
    return names


def _get_json(store: Store, rel: str) -> Any:
    try:
        return store.get_json(rel)
    except FileNotFoundError:
        return None
    except CorruptRecordError as exc:  # writes are whole-object: never "being written"
        log.warning("%s; ignoring it", exc)
        return None


def _duration(status: dict[str, Any]) -> float | None:
    start = status.get("started_at")
    if start is None:
        return None
    end = status.get("finished_at") if status.get("state") == "done" else None
    if end is None:
        end = time.time() if status.get("state") == "running" else status.get("updated_at")
    return max(0.0, float(end) - float(start)) if end is not None else None


def _eval_models(report: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    if not report:
        return {}
    return {name: {k: r[k] for k in ("knn_top1", "linear_top1") if r.get(k) is not None}
            for name, r in (report.get("models") or {}).items()}

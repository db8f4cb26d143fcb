"""Experiment trackers for a training stage (rank 0): TensorBoard by default, MLflow and W&B opt-in.

A stage's ``trackers`` list names them (``[tensorboard]`` by default; ``[tensorboard, mlflow, wandb]``).
Each is accelerate's own tracker class (``accelerate.tracking``), started on rank 0 only, and gets
every step's scalars: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/images_per_s``,
``train/step_time_s``, ``train/mfu`` (GPU), and ``val/<metric>`` at each evaluation.

* **tensorboard** writes event files to ``<stage>/tensorboard/``. On a local run root they are
  written there directly (``tensorboard --logdir <run_root>/stages``); on object storage they are
  written to a local folder and uploaded at every heartbeat and at the end, and
  ``vitforge tensorboard RUN_ROOT`` mirrors them back to a local folder. A resumed attempt starts
  a new event file with ``purge_step`` at its checkpoint, so TensorBoard drops the replayed steps.
* **mlflow** logs to ``MLFLOW_TRACKING_URI`` (a server, or ``file:/path`` for a local file store),
  experiment ``MLFLOW_EXPERIMENT_NAME`` or the run's name, one MLflow run per stage that every
  attempt continues (its id is kept in ``<stage>/trackers.json``).
* **wandb** logs to project ``WANDB_PROJECT`` or the run's name, one W&B run per stage (id kept
  likewise); ``WANDB_API_KEY`` / ``WANDB_MODE=offline`` as usual.

Credentials come from those packages' own environment variables, never from the spec; the driver
forwards ``MLFLOW_*`` / ``WANDB_*`` to the gang's workers (:func:`tracker_env`). A tracker that
fails while training is dropped with a warning: it must not stop the training it watches.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import threading
from typing import Any

from cluster.storage import Store

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under the stage directory
TRACKER_STATE = "trackers.json"  # the MLflow / W&B run ids every attempt of a stage continues
ENV_PREFIXES = ("MLFLOW_", "WANDB_", "DATABRICKS_")
_NOT_SCALARS = {"step", "epoch", "val_count"}
_EXTRA = "pip install 'vitforge[trackers]'"


def tracker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The trackers' own settings and credentials in this environment, for the gang's workers."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as tracker scalars: ``val_x`` -> ``val/x``, everything else -> ``train/x``."""
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return out


class Trackers:
    """The stage's open trackers (rank 0 only). ``log`` every step; ``sync`` and ``close`` upload."""

    def __init__(self, names: list[str], store: Store, stage: str, run: str, resumed_from: int | None,
                 config: dict[str, Any] | None = None) -> None:
        self.store, self.items, self._mirror = store, [], None
        self._lock = threading.Lock()
        state = _read_state(store)
        for name in dict.fromkeys(names):
            self.items.append((name, self._open(name, stage, run, resumed_from, state)))
        for name, tracker in self.items:
            if config and name != "tensorboard":
                self._guard(name, tracker.store_init_configuration, _flat(config))
        _write_state(store, state)

    def _open(self, name: str, stage: str, run: str, resumed_from: int | None, state: dict[str, Any]) -> Any:
        from accelerate import tracking

        if name == "tensorboard":
            logdir = self.store.path(TENSORBOARD_DIR) if self.store.protocol == "file" else None
            if logdir is None:
                self._mirror = logdir = tempfile.mkdtemp(prefix=f"vf-tb-{stage}-")
            os.makedirs(logdir, exist_ok=True)
            kwargs = {"purge_step": resumed_from + 1} if resumed_from else {}
            tracker = tracking.TensorBoardTracker("", logdir, **kwargs)
        elif name == "mlflow":
            _need("mlflow")
            tracker = tracking.MLflowTracker(experiment_name=run, run_id=state.get("mlflow_run_id"), run_name=stage,
                                             tags={"vitforge.run": run, "vitforge.stage": stage})
        elif name == "wandb":
            _need("wandb")
            kwargs = {"name": stage, "id": state.get("wandb_id"), "resume": "allow", "dir": tempfile.mkdtemp()}
            tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", run), **kwargs)
        else:
            raise ValueError(f"unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        tracker.start()
        if name == "mlflow":
            state["mlflow_run_id"] = tracker.tracker.info.run_id
        elif name == "wandb":
            state["wandb_id"] = tracker.tracker.id
        return tracker

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for name, tracker in list(self.items):
            self._guard(name, tracker.log, values, step=int(record["step"]))

    def sync(self) -> None:
        """Flush the TensorBoard events; on object storage, upload them. The heartbeat calls it, and so
        does every checkpoint (so the events of every committed step survive a kill)."""
        with self._lock:
            for name, tracker in list(self.items):
                if name == "tensorboard":
                    self._guard(name, tracker.writer.flush)
            if self._mirror is not None:
                self._upload()

    def _upload(self) -> None:
        try:
            for file in os.listdir(self._mirror):
                self.store.put_file(os.path.join(self._mirror, file), posixpath.join(TENSORBOARD_DIR, file))
        except Exception as exc:  # the next sync retries; metrics.jsonl keeps every value anyway
            log.warning("could not upload TensorBoard events to %s: %s", self.store.url_of(TENSORBOARD_DIR), exc)

    def close(self) -> None:
        for name, tracker in self.items:
            self._guard(name, tracker.finish)
        self.sync()
        self.items = []

    def _guard(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("tracker %s failed (%s: %s); training goes on without it", name, type(exc).__name__, exc)
            self.items = [(n, t) for n, t in self.items if n != name]


def _need(package: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ImportError(f"the {package} tracker needs the {package} package: {_EXTRA}") from None


def _read_state(store: Store) -> dict[str, Any]:
    try:
        return dict(store.get_json(TRACKER_STATE))
    except FileNotFoundError:
        return {}


def _write_state(store: Store, state: dict[str, Any]) -> None:
    if state:
        store.put_json(TRACKER_STATE, state)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``a.b.c -> value`` (trackers take flat hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


def mirror_events(run_root: str, dest: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Copy every stage's ``tensorboard/`` event files under ``run_root`` to ``dest/<stage>/``; the files copied."""
    root = Store(run_root, storage_options)
    copied = []
    for stage in root.ls("stages"):
        events = root.child(posixpath.join("stages", stage, TENSORBOARD_DIR))
        for name in events.ls():
            local = os.path.join(dest, stage, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            events.get_file(name, local)
            copied.append(local)
    return copied

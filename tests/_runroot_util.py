"""Test helper: a run root with stages in every state, written the way the writers write it.

STATUS.json fields as ``jobs/stage.py`` and ``jobs/evaluate.py`` write them, metrics records as
``jobs/engine.py`` logs them (in chunks by ``jobs.metrics.MetricsLog``, or an older run's single
``metrics.jsonl`` with ``metrics="legacy"``), checkpoints committed with ``cluster.storage.commit`` and
``write_latest``, an export with ``config.json`` last, a prep manifest, an ``eval.json``. Real
runs are covered by tests/test_submit.py; this one gives status/report every state cheaply.
"""

from __future__ import annotations

import json
import time

import yaml

from cluster.storage import Store, commit, write_latest
from jobs.metrics import MetricsLog

T0 = 1_700_000_000.0


def metrics_lines(steps: int, loss0: float = 2.0, val_every: int | None = None) -> str:
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "epoch": (s - 1) // 10, "loss": loss0 * 0.97 ** s, "step_time_s": 0.1,
               "images_per_s": 640.0 + s, "lr": 1e-3, "grad_norm": 1.0}
        if val_every and s % val_every == 0:
            rec.update(val_loss=loss0 * 0.98 ** s, val_top1=0.5 + s / 1000, val_count=100.0)
        lines.append(json.dumps(rec, sort_keys=True))
    return "".join(ln + "\n" for ln in lines)


def checkpoint(stage: Store, step: int) -> None:
    ckpt = stage.child("checkpoints")
    name = f"step-{step:08d}"
    ckpt.put_bytes(f"{name}/engine/model.pt", b"weights")
    commit(ckpt, name, {"step": step, "world_size": 1, "files": {"engine/model.pt": {"size": 7, "rank": 0}}})
    write_latest(ckpt, "", name)


def write_metrics(stage: Store, text: str, layout: str = "chunks", chunk_lines: int = 5) -> None:
    """``text``'s records as the engine's writer publishes them (chunks of ``chunk_lines``), or ``legacy``."""
    if layout == "legacy":
        stage.put_bytes("metrics.jsonl", text.encode())
        return
    writer = MetricsLog(stage, enabled=True, chunk_lines=chunk_lines)
    for line in text.splitlines():
        writer.add(json.loads(line))
    writer.publish(sync=True)


def make_run(root: str, name: str = "demo", metrics: str = "chunks") -> Store:
    """``data`` (prep, done), ``pretrain`` (mae, done), ``probe`` (finetune, running), ``student``
    (distill, failed), ``tune`` (finetune, preempted), ``later`` (finetune, pending), ``eval`` (done)."""
    run = Store(root)
    stages = [
        {"name": "data", "kind": "prep", "source": "./imgs"},
        {"name": "pretrain", "kind": "mae", "data": "data", "max_steps": 30},
        {"name": "probe", "kind": "finetune", "data": "data", "init": "pretrain"},
        {"name": "student", "kind": "distill", "data": "data", "teacher": "pretrain"},
        {"name": "tune", "kind": "finetune", "data": "data", "init": "pretrain", "max_steps": 40},
        {"name": "later", "kind": "finetune", "data": "data", "init": "student", "max_steps": 10},
        {"name": "eval", "kind": "eval", "data": "data", "models": ["pretrain", "probe"]},
    ]
    run.put_bytes("run.yaml", yaml.safe_dump({"name": name, "storage": "x", "stages": stages}).encode())
    st = lambda n: run.child(f"stages/{n}")  # noqa: E731

    shards = st("data").child("shards")
    shards.put_json("manifest.json", {"format": "vitforge-shards/1", "splits": {
        "train": {"shards": [{"name": f"train/shard-{i:06d}.tar", "samples": 40, "bytes": 1, "sha256": "x"} for i in range(3)]},
        "val": {"shards": [{"name": "val/shard-000000.tar", "samples": 10, "bytes": 1, "sha256": "x"}]}},
        "totals": {"inputs": 132, "written": 130, "rejected": 2, "duplicates": 0}})
    st("data").put_json("STATUS.json", {"state": "done", "kind": "prep", "attempts": 1, "started_at": T0,
                                        "finished_at": T0 + 41, "updated_at": T0 + 41})

    _training(st("pretrain"), "mae", "done", steps=30, total=30, ckpt=30, export=True, attempts=2, metrics=metrics)
    _training(st("probe"), "finetune", "running", steps=12, total=None, ckpt=10, val_every=5, metrics=metrics)
    _training(st("student"), "distill", "failed", steps=3, total=None, ckpt=None, metrics=metrics,
              error="Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory")
    _training(st("tune"), "finetune", "preempted", steps=16, total=40, ckpt=16, metrics=metrics)

    st("eval").put_json("eval.json", {"stage": "eval", "knn": {"k": 20, "temperature": 0.07}, "label_fraction": 1.0,
                                      "models": {"pretrain": {"architecture": "vit_tiny_patch16_224", "feature_dim": 64,
                                                              "knn_top1": 0.812, "linear_top1": 0.853},
                                                 "probe": {"architecture": "vit_tiny_patch16_224", "feature_dim": 64,
                                                           "knn_top1": 0.901, "linear_top1": 0.922,
                                                           "reconstruction": None}}})
    st("eval").put_json("STATUS.json", {"state": "done", "kind": "eval", "attempts": 1, "started_at": T0,
                                        "finished_at": T0 + 5, "updated_at": T0 + 5})
    return run


def _training(stage: Store, kind: str, state: str, steps: int, total: int | None, ckpt: int | None,
              export: bool = False, attempts: int = 1, val_every: int | None = None, error: str | None = None,
              metrics: str = "chunks") -> None:
    write_metrics(stage, metrics_lines(steps, val_every=val_every), metrics)
    if ckpt:
        checkpoint(stage, ckpt)
    if export:
        stage.put_bytes("export/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        stage.put_json("export/config.json", {"architecture": "vit_tiny_patch16_224", "model_args": {}})
    status = {"state": state, "kind": kind, "attempts": attempts, "started_at": T0, "updated_at": T0 + 90}
    if state in ("done", "preempted"):
        status.update(step=steps, total_steps=total)
    if state == "done":
        status["finished_at"] = T0 + 90
    if state == "running":
        status["started_at"] = time.time() - 75
    if error:
        status["error"] = error
    stage.put_json("STATUS.json", status)

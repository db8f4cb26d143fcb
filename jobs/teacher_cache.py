"""Cached teacher outputs (``kind: teacher_outputs``): a frozen teacher's sparse targets, written once.

    - {name: targets, kind: teacher_outputs, data: data, teacher: finetune, epochs: 3, topk: 10,
       img_size: 32, crop_scale: [0.2, 1.0], seed: 0, temperature: 4.0, features: false}
    - {name: student, kind: distill, data: data, targets: cached, cache: targets, epochs: 3,
       model: {arch: vit_tiny_patch16_224, img_size: 32}, loss: {temperature: 4.0}}

The teacher (an earlier stage's export, an export URL, or ``{arch, weights}``, loaded as ``distill``
loads it) sees every train sample of every epoch in ``[epoch_start, epoch_start + epochs)`` under
the student's augmentation: the loader's transform seeded by (seed, epoch, sample id), so the
student stage replays the identical crop for that (epoch, sample) on any number of workers. Per
sample it keeps the top-``topk`` *temperature-T log-probabilities* ``log softmax(z / T)`` (fp16)
and their class indices (the smallest of uint8 / int16 / int32 that holds the classes), stored in
class order with the indices delta-coded and every array as deflated byte planes: lossless, about
2 bytes per stored logit (``jobs/_cache_codec.py``); when ``topk`` is every class, all of them in
class order and no indices. Optionally the pooled feature (fp16).

With ``mixup`` / ``cutmix`` (the student's settings, compared as part of the recipe) the loader mixes
each (epoch, sample) with its partner from the same shard under the per-sample lambda of
``dataprep/mixing.py`` (functions of (seed, epoch, sample id) only), so the teacher's targets are
those of the very mixed image the student replays; the student needs no lambdas from the cache.

Units of work are (epoch, shard): ``cache/units/e00002-s00007.npz`` holds the rows of shard 7's
contiguous sample ids for epoch 2, and ``…s00007.json`` beside it commits it (its sha256, counts,
the teacher's hash); a unit without a commit record that matches is redone, one with it never is.
Units run as Ray tasks (``compute.workers`` of them, each loads the teacher once). When every unit
exists, ``cache/manifest.json`` is written last: counts, k, dtypes, teacher hash, recipe digest,
data digest, epoch range.

**Merging epoch ranges from several clusters.** Run the same stage (same data, teacher, recipe and
k) with ``epoch_start``/``epochs`` covering each cluster's part, then copy the ``cache/units/``
folders of every part into one stage directory and run a stage whose range is the union (e.g.
``epoch_start: 0, epochs: 6`` over parts 0-2 and 3-5): every unit is found committed, none is
recomputed, and the manifest is written over the union. Units from another teacher, recipe or data
are refused when the manifest is assembled, naming the unit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from typing import Any

import numpy as np
import torch

from cluster.storage import CorruptRecordError, Store
from dataprep.loader import StreamingLoader
from dataprep.manifest import load_manifest
from dataprep.mixing import Mix, MixFields
from dataprep.transforms import mae_transform
from jobs._cache_codec import FORMAT as CODEC_FORMAT, decode_unit, encode_unit
from jobs._ckpt_state import json_digest
from jobs._distill_parts import load_teacher, teacher_forward
from jobs.config.teacher_outputs import (TeacherOutputsConfig, check_cache_reference,  # noqa: F401  (re-exported)
                                         student_recipe)
from jobs.layout import CACHE_MANIFEST_NAME, StageLayout
from jobs.models import split_features

log = logging.getLogger(__name__)

UNITS = "units"
MANIFEST = CACHE_MANIFEST_NAME
CACHE_FORMAT = CODEC_FORMAT  # 2: byte planes + deflate, indices delta-coded (jobs/_cache_codec.py)


def data_digest(data_url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Digest of the train split's shards (names, counts, sha256): the samples the ids refer to."""
    manifest, _ = load_manifest(data_url, storage_options)
    return json_digest([[s.name, s.samples, s.sha256] for s in manifest.split("train").shards])


def teacher_hash(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's state dict (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer dtype that holds class indices ``< num_classes``."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 32767 else np.int32)


def unit_name(epoch: int, shard: int) -> str:
    return f"e{epoch:05d}-s{shard:05d}"


def cache_url(stage_url: str) -> str:
    return StageLayout(stage_url).cache


# ---- one unit ----------------------------------------------------------------------------------------


class _Teacher:
    """The frozen teacher of a cache stage, on this task's device."""

    def __init__(self, cfg: TeacherOutputsConfig, teacher_url: str | None, opts: dict[str, Any]) -> None:
        self.model, self.classes, self.size = load_teacher(cfg.teacher, teacher_url, cfg.img_size, opts)
        if self.classes < 1:
            raise ValueError(f"stage {cfg.name!r}: the teacher has no classifier (num_classes 0); cached "
                             "targets are top-k class log-probabilities")
        if cfg.topk > self.classes:
            raise ValueError(f"stage {cfg.name!r}: topk {cfg.topk} is more than the teacher's {self.classes} classes")
        self.hash = teacher_hash(self.model)
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else torch.float32
        self.model.to("cuda" if cuda else "cpu", dtype=dtype)

    def __call__(self, imgs: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = next(self.model.parameters())
        feats = teacher_forward(self.model, imgs.to(p.device, dtype=p.dtype), self.size)
        with torch.no_grad():
            logits = self.model.forward_head(feats).float()
            pooled = split_features(self.model, feats)[0].float() if features else None
        return logits, pooled


def compute_unit(cfg: TeacherOutputsConfig, teacher: _Teacher, data_url: str, opts: dict[str, Any],
                 epoch: int, shard: int) -> dict[str, np.ndarray]:
    """The arrays of unit (epoch, shard): ``logprobs [n, k]`` fp16, ``indices [n, k]``, ``feature [n, D]``."""
    manifest, _ = load_manifest(data_url, opts)
    counts = [s.samples for s in manifest.split("train").shards]
    first, n = int(sum(counts[:shard])), counts[shard]
    loader = StreamingLoader(data_url, split="train", batch_size=cfg.batch_size, seed=cfg.seed,
                             transform=mae_transform(cfg.img_size, scale=cfg.crop_scale), shuffle=False,
                             subset=np.arange(first, first + n), partial="pad", on_error="fail",
                             storage_options=opts, num_workers=0, mix=cfg.mix(cfg.seed))
    loader.set_epoch(epoch)
    logprobs = np.zeros((n, cfg.topk), np.float16)
    indices = np.zeros((n, cfg.topk), index_dtype(teacher.classes))
    feature: np.ndarray | None = None
    seen = np.zeros(n, bool)
    for batch in loader:
        logits, pooled = teacher(batch["image"], cfg.features)
        lp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        if cfg.topk == teacher.classes:  # every class: in class order, no indices
            top, idx = lp, torch.zeros(0)
        else:
            top, idx = lp.topk(cfg.topk, dim=-1, largest=True, sorted=True)
        rows = (batch["index"] - first).numpy()
        keep = ~batch["pad"].numpy()
        logprobs[rows[keep]] = top.numpy()[keep].astype(np.float16)
        if idx.numel():
            indices[rows[keep]] = idx.numpy()[keep]
        if pooled is not None:
            feature = np.zeros((n, pooled.shape[1]), np.float16) if feature is None else feature
            feature[rows[keep]] = pooled.numpy()[keep].astype(np.float16)
        seen[rows[keep]] = True
    if not seen.all():
        raise RuntimeError(f"unit {unit_name(epoch, shard)}: samples {np.flatnonzero(~seen)[:5] + first} never served")
    out = {"logprobs": logprobs}
    if cfg.topk < teacher.classes:
        out["indices"] = indices
    if feature is not None:
        out["feature"] = feature
    return out


def commit_unit(store: Store, name: str, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write the unit's arrays, then its commit record (the unit counts only once that exists and matches)."""
    blob = encode_unit(arrays)
    store.put_bytes(f"{UNITS}/{name}.npz", blob)
    store.put_json(f"{UNITS}/{name}.json", {**record, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                                            "samples": int(arrays["logprobs"].shape[0])})


def read_commit(store: Store, name: str) -> dict[str, Any] | None:
    """The unit's commit record, or None when the unit is not (validly) committed."""
    try:
        record = store.get_json(f"{UNITS}/{name}.json")
    except (FileNotFoundError, CorruptRecordError, ValueError):
        return None
    return record if isinstance(record, dict) and "sha256" in record else None


# ---- a Ray task: a list of units ----------------------------------------------------------------------


def run_units(job: dict[str, Any], units: list[tuple[int, int]]) -> list[str]:
    """Compute and commit ``units`` ((epoch, shard) pairs) with one teacher load; returns their names.

    ``job``: ``{"stage", "cache_url", "data_url", "storage_options", "teacher_url", "fault"}``; the
    test-only ``fault: {"kill_after_units": n}`` SIGKILLs this process after its n-th commit.
    """
    cfg = TeacherOutputsConfig.model_validate(job["stage"])
    opts = job.get("storage_options") or {}
    store = Store(job["cache_url"], opts)
    teacher = _Teacher(cfg, job.get("teacher_url"), opts)
    record = {"format": CACHE_FORMAT, "teacher_hash": teacher.hash, "recipe": cfg.recipe(), "topk": cfg.topk,
              "temperature": cfg.temperature, "num_classes": teacher.classes, "data_digest": job["data_digest"]}
    kill_after = (job.get("fault") or {}).get("kill_after_units")
    done = []
    for epoch, shard in units:
        name = unit_name(epoch, shard)
        if read_commit(store, name) is not None:  # a retried task: what an earlier attempt committed stays
            continue
        arrays = compute_unit(cfg, teacher, job["data_url"], opts, epoch, shard)
        commit_unit(store, name, arrays, {**record, "epoch": epoch, "shard": shard})
        done.append(name)
        if kill_after is not None and len(done) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return done


def all_units(cfg: TeacherOutputsConfig, data_url: str, opts: dict[str, Any]) -> list[tuple[int, int]]:
    manifest, _ = load_manifest(data_url, opts)
    shards = len(manifest.split("train").shards)
    return [(e, s) for e in range(cfg.epoch_start, cfg.epoch_start + cfg.epochs) for s in range(shards)]


def pending_units(store: Store, units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The units without a valid commit record (a finished unit is never redone)."""
    return [u for u in units if read_commit(store, unit_name(*u)) is None]


def write_manifest(cfg: TeacherOutputsConfig, store: Store, units: list[tuple[int, int]], data_url: str,
                   opts: dict[str, Any], data_dig: str) -> dict[str, Any]:
    """Check that every unit is committed by one teacher, recipe and data; write ``manifest.json`` last."""
    manifest, _ = load_manifest(data_url, opts)
    counts = [s.samples for s in manifest.split("train").shards]
    want = {"format": CACHE_FORMAT, "recipe": cfg.recipe(), "topk": cfg.topk, "temperature": cfg.temperature,
            "data_digest": data_dig}
    records = {}
    for u in units:
        rec = read_commit(store, unit_name(*u))
        if rec is None:
            raise RuntimeError(f"cache unit {unit_name(*u)} is not committed; run the stage again to compute it")
        for key, value in want.items():
            if rec.get(key) != value:
                raise ValueError(f"cache unit {unit_name(*u)} was made with {key}={rec.get(key)!r}, this stage has "
                                 f"{value!r}: remove that unit (or the stage) to recompute it")
        records[unit_name(*u)] = rec
    hashes = {r["teacher_hash"] for r in records.values()}
    if len(hashes) != 1:
        raise ValueError(f"cache units were made by {len(hashes)} different teachers ({sorted(hashes)}): merge "
                         "only parts computed with the same teacher weights")
    first = next(iter(records.values()))
    out = {"format": CACHE_FORMAT, "teacher": cfg.teacher_ref(), "teacher_hash": hashes.pop(), **want,
           "recipe_digest": json_digest(cfg.recipe()), "num_classes": first["num_classes"],
           "epochs": [cfg.epoch_start, cfg.epoch_start + cfg.epochs], "shard_samples": counts,
           "samples": int(sum(counts)), "dtypes": _dtypes(cfg.topk, first["num_classes"], cfg.features),
           "features": cfg.features, "feature_dim": _feature_dim(store, units[0]) if cfg.features else None,
           "bytes": int(sum(r["bytes"] for r in records.values())),
           "units": {name: r["sha256"] for name, r in records.items()}}
    store.put_json(MANIFEST, out)
    return out


def _dtypes(topk: int, classes: int, features: bool) -> dict[str, str]:
    out = {"logprobs": "float16"}
    if topk < classes:
        out["indices"] = index_dtype(classes).name
    if features:
        out["feature"] = "float16"
    return out


def _feature_dim(store: Store, unit: tuple[int, int]) -> int:
    return int(decode_unit(store.get_bytes(f"{UNITS}/{unit_name(*unit)}.npz"))["feature"].shape[1])


def bytes_per_sample_epoch(manifest: dict[str, Any]) -> float:
    """Stored bytes per (sample, epoch), container overhead included."""
    epochs = manifest["epochs"][1] - manifest["epochs"][0]
    return manifest["bytes"] / max(1, manifest["samples"] * epochs)


def split_round_robin(units: list[Any], parts: int) -> list[list[Any]]:
    """``units`` dealt into at most ``parts`` non-empty lists."""
    return [units[i::parts] for i in range(min(parts, len(units))) if units[i::parts]]


# ---- the stage's job (pipeline/run.py runs it as Ray tasks, then writes the manifest) ---------------------------------------------------------


def stage_job(spec: Any, name: str, fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able job every task of cache stage ``name`` of ``spec`` (a RunSpec) runs."""
    stage, opts = spec.stage(name), spec.storage_options
    data_url = spec.data_url(stage)
    return {"stage": stage.model_dump(mode="json"), "cache_url": spec.layout.stage(name).cache,
            "data_url": data_url, "storage_options": opts, "data_digest": data_digest(data_url, opts),
            "teacher_url": spec.export_url(stage.teacher) if isinstance(stage.teacher, str) else None,
            **({"fault": fault} if fault else {})}



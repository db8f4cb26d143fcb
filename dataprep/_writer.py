"""One output shard: a pure function of its planned inputs, written locally, uploaded whole.

Tar headers carry fixed metadata (mtime 0, uid/gid 0, no owner names, mode 0644, USTAR), so the
same inputs and options give the same bytes on every run and every machine with the same
libraries. After the tar is uploaded a progress record ``_progress/<split>-shard-XXXXXX.json``
is written: it names the plan the shard was built from, so a rerun knows the shard is finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from cluster._digest import file_sha256 as _sha256_file
from cluster.storage import Store, StorageError, local_staging

from ._arrays import ArraySpec, process_array
from ._images import UNREADABLE, ImageSpec, Reject, process
from ._masks import MASK_EXT, image_size, output_size, process_mask
from ._refs import RefReader, row_group_cache
from ._sources import read_url, store_at
from ._stats import ChannelStats

PROGRESS = "_progress"


@dataclass(frozen=True)
class ShardPlan:
    """What one Ray task builds. ``items`` are (key, source name, ref, label) in output order;
    ``masks``: each item's segmentation mask URL (empty: no masks)."""

    split: str
    index: int
    items: tuple[tuple[str, str, tuple, int | None], ...]
    digest: str  # of the options and the items: the shard's identity across reruns
    masks: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def record(self) -> str:
        return f"{PROGRESS}/{self.split}-shard-{self.index:06d}.json"


def plan_digest(options_digest: str, split: str, index: int, items: list[tuple], masks: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(f"{options_digest}\0{split}\0{index}".encode())
    for key, name, _, label in items:
        h.update(f"\0{key}\0{name}\0{label}".encode())
    for url in masks:
        h.update(f"\1{url}".encode())
    return h.hexdigest()


def finished_records(store: Store, plans: Sequence[ShardPlan]) -> list[dict[str, Any] | None]:
    """For each plan, its progress record when that shard is finished (see :func:`is_finished`).
    ``plans`` may make each plan on access (:class:`dataprep._plan.Shards`): one is held at a time per thread."""
    present = set(posixpath.basename(p) for p in store.ls(PROGRESS))
    if not present:
        return [None] * len(plans)

    def one(i: int) -> dict[str, Any] | None:
        plan = plans[i]
        return is_finished(store, plan) if posixpath.basename(plan.record) in present else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, range(len(plans))))


def is_finished(store: Store, plan: ShardPlan) -> dict[str, Any] | None:
    """The progress record of ``plan`` when its shard was uploaded from this very plan, else None."""
    try:
        record = store.get_json(plan.record)
    except (FileNotFoundError, ValueError):
        return None
    if record.get("digest") != plan.digest:
        return None
    try:
        return record if store.size(plan.name) == record["shard"]["bytes"] else None
    except FileNotFoundError:
        return None


def build_shard(plan: ShardPlan, dest: str, spec: ImageSpec | ArraySpec,
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Process, tar, upload and record one shard. Returns its progress record."""
    start = time.monotonic()
    row_group_cache().scope(dest)  # a worker keeps Parquet row groups for one output at a time
    stats = ChannelStats(spec.channels, spec.dtype) if isinstance(spec, ArraySpec) and spec.channels else None
    sizes: dict[str, tuple[int, int]] = {}
    outputs, rejects = _process_all(plan, spec, stats if plan.split == "train" else None, sizes)
    masks, mask_max = _masks_of(plan, outputs, rejects, sizes)
    store = store_at(dest, storage_options)  # one S3 client per worker process: creating one costs ~0.1 s
    with local_staging("vitforge-shard-") as tmp:
        local = os.path.join(tmp, "shard.tar")
        samples = write_tar(local, plan, outputs, spec.ext, masks)
        size, sha = os.path.getsize(local), _sha256_file(local)
        store.put_file(local, plan.name)
    record = {
        "digest": plan.digest,
        "shard": {"name": plan.name, "samples": samples, "bytes": size, "sha256": sha},
        "rejects": sorted(rejects, key=lambda r: r["input"]),
        **({"mask_max": mask_max} if plan.masks else {}),
        **({"stats": stats.to_json()} if stats is not None and plan.split == "train" else {}),
        "seconds": round(time.monotonic() - start, 3),
        "written_at": time.time(),
    }
    store.put_json(plan.record, record)
    return record


def _process_all(plan: ShardPlan, spec: ImageSpec | ArraySpec, stats: ChannelStats | None = None,
                 sizes: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, bytes], list[dict[str, str]]]:
    """Encoded image per key. Inputs are read in ref order (tar offsets, Parquet row groups).
    ``npy``: every array written is also counted into ``stats`` (train shards). With masks, each
    image input's (H, W) as shown goes to ``sizes`` (its mask must match it)."""
    reader, outputs, rejects = RefReader(), {}, []
    try:
        for key, name, ref, _ in sorted(plan.items, key=lambda it: it[2]):
            try:
                if isinstance(spec, ArraySpec):
                    outputs[key], arr = process_array(reader.read_parts(ref), spec)
                    if stats is not None:
                        stats.add(arr)
                else:
                    data = reader.read(ref)
                    outputs[key] = process(data, spec)
                    if plan.masks and sizes is not None:
                        sizes[key] = image_size(data)
            except Reject as r:
                rejects.append({"input": name, "reason": r.reason, "detail": r.detail})
            except OSError as exc:  # the file vanished or became unreadable since the scan
                rejects.append({"input": name, "reason": UNREADABLE, "detail": f"{type(exc).__name__}: {exc}"})
    finally:
        reader.close()
    return outputs, sorted(rejects, key=lambda r: r["input"])


def _masks_of(plan: ShardPlan, outputs: dict[str, bytes], rejects: list[dict[str, str]],
              sizes: dict[str, tuple[int, int]]) -> tuple[dict[str, bytes], int]:
    """Each written sample's mask PNG (NEAREST-resized to its image); an input whose mask is unusable
    is dropped from ``outputs`` and rejected (``mask``). Returns the masks and the largest class."""
    masks, largest = {}, 0
    for (key, name, _, _), url in zip(plan.items, plan.masks):
        if key not in outputs:
            continue
        out_hw = output_size(outputs[key])
        source_hw = sizes.get(key, out_hw)  # npy: the array as written (prep refuses masks with resize)
        try:
            try:
                data = read_url(url)
            except (OSError, StorageError):
                data = None
            masks[key], top = process_mask(data, source_hw, out_hw, url)
            largest = max(largest, top)
        except Reject as r:
            del outputs[key]
            rejects.append({"input": name, "reason": r.reason, "detail": r.detail})
    return masks, largest


def write_tar(path: str, plan: ShardPlan, outputs: dict[str, bytes], ext: str,
              masks: dict[str, bytes] | None = None) -> int:
    """Write the samples of ``plan`` that have an output, in plan order; returns how many."""
    n = 0
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, name, _, label in plan.items:
            if key not in outputs:
                continue
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode())
            _add(tar, f"{key}.{ext}", outputs[key])
            if masks:
                _add(tar, f"{key}.{MASK_EXT}", masks[key])
            _add(tar, f"{key}.json", json.dumps({"src": name}, ensure_ascii=False, sort_keys=True).encode())
            n += 1
    return n


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


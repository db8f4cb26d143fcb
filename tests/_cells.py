"""A synthetic "cell painting" dataset that only a multi-channel, full-bit-depth pipeline keeps.

Each sample is ``[6, S, S]`` uint16: a background of ~1000 counts with Poisson noise, blobs 150-300
counts above it (less than one 8-bit level after ``// 257``); the class is which pair of channels
co-localise a blob, distractor blobs sit in single channels elsewhere. Written in every source
layout the prep reads: a multi-page TIFF, a multi-sample TIFF, one file per channel listed in a
CSV, and float32 ``.npy`` with negative values.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tarfile

import numpy as np
import tifffile

from cluster.storage import Store
from dataprep._arrays import encode_npy
from dataprep._stats import ChannelStats
from dataprep.manifest import ChannelInfo, Manifest, ShardInfo, SplitInfo, save_manifest

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito", "BF"]
PAIRS = [(0, 1), (2, 3), (4, 5), (0, 3), (1, 4), (2, 5)]  # class -> the two channels sharing a blob


def cells(per_class: int = 10, classes: int = 3, size: int = 32, seed: int = 0,
          expectation: bool = False) -> list[tuple[np.ndarray, int]]:
    """``[(uint16 [6, size, size], label)]``, classes interleaved; ``expectation``: each sample also with its
    noiseless float64 image (the Poisson mean: what no model can beat on these pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(per_class * classes):
        label = i % classes
        noise = rng.poisson(1000, (len(CHANNELS), size, size)).astype(np.float64) - 1000
        mean = np.full((len(CHANNELS), size, size), 1000.0)
        cy, cx = rng.integers(6, size - 6, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        for c in PAIRS[label]:
            mean[c] += rng.uniform(150, 300) * blob
        d = rng.integers(0, len(CHANNELS))  # a distractor in one channel, elsewhere
        dy, dx = (cy + size // 2) % size, (cx + size // 2) % size
        mean[d] += rng.uniform(150, 300) * np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / 8.0)
        img = np.clip(np.rint(mean + noise), 0, 65535).astype(np.uint16)
        out.append((img, label, mean) if expectation else (img, label))
    return out


def tiff_bytes(arr: np.ndarray, layout: str) -> bytes:
    """``multipage``: one page per channel; ``multisample``: one page of ``[H, W, C]`` samples."""
    buf = io.BytesIO()
    if layout == "multipage":
        with tifffile.TiffWriter(buf) as tif:
            for plane in arr:
                tif.write(plane, metadata=None)  # plain pages, no tifffile shape metadata
    else:
        tifffile.imwrite(buf, np.ascontiguousarray(arr.transpose(1, 2, 0)), photometric="minisblack",
                         planarconfig="contig")
    return buf.getvalue()


def write_tiff_folder(root: str, samples: list[tuple[np.ndarray, int]], layout: str) -> dict[str, np.ndarray]:
    """An ImageFolder ``root/<label>/cell-XXXX.tif``; returns relative name -> source array."""
    out = {}
    for i, (arr, label) in enumerate(samples):
        rel = f"{label}/cell-{i:04d}.tif"
        _write(os.path.join(root, rel), tiff_bytes(arr, layout))
        out[rel] = arr
    return out


def write_channel_list(root: str, samples: list[tuple[np.ndarray, int]]) -> tuple[str, dict[str, np.ndarray]]:
    """One single-page TIFF per channel and a ``cells.csv`` naming them (columns CHANNELS + label).

    Returns the CSV's path and sample name (its first channel's path) -> source array."""
    out, rows = {}, []
    for i, (arr, label) in enumerate(samples):
        paths = [f"plate1/w{i:04d}_{name}.tif" for name in CHANNELS]
        for plane, rel in zip(arr, paths):
            buf = io.BytesIO()
            tifffile.imwrite(buf, plane)
            _write(os.path.join(root, rel), buf.getvalue())
        rows.append(paths + [str(label)])
        out[paths[0]] = arr
    path = os.path.join(root, "cells.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CHANNELS + ["label"])
        w.writerows(rows)
    return path, out


def write_float_npy(root: str, samples: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    """SAR-like float32 ``[C, H, W]`` .npy files with negative values (dB around 0)."""
    out = {}
    for i, (arr, label) in enumerate(samples):
        f = (10 * np.log10(arr.astype(np.float32) / 1100.0)).astype(np.float32)  # negative where below 1100
        rel = f"{label}/sar-{i:04d}.npy"
        buf = io.BytesIO()
        np.save(buf, f)
        _write(os.path.join(root, rel), buf.getvalue())
        out[rel] = f
    return out


def write_npy_shards(dest: str, arrays: list[np.ndarray], per_shard: int = 10, labels: list[int] | None = None,
                     val: list[tuple[np.ndarray, int]] | None = None, names: list[str] | None = None) -> ChannelInfo:
    """Shards of ``<key>.npy`` + ``<key>.cls`` and a manifest with the train arrays' channel statistics,
    written directly (no Ray): stands in for prep in loader and training tests. ``labels`` default to
    ``i % 3``; ``val``: (array, label) pairs of a val split; ``names``: the channels' (default c0, c1, …)."""
    labels = [i % 3 for i in range(len(arrays))] if labels is None else labels
    stats = ChannelStats(arrays[0].shape[0], arrays[0].dtype.name)
    for a in arrays:
        stats.add(a)
    splits = {"train": SplitInfo(shards=_npy_split(dest, "train", list(zip(arrays, labels)), per_shard))}
    if val:
        splits["val"] = SplitInfo(shards=_npy_split(dest, "val", val, per_shard))
    info = ChannelInfo.build(names or [f"c{i}" for i in range(stats.channels)], stats.dtype, stats.summary())
    classes = [str(c) for c in range(max(labels + [lb for _, lb in val or []]) + 1)]
    save_manifest(Store(dest), Manifest(splits=splits, classes=classes, image_ext="npy", channels=info))
    return info


def _npy_split(dest: str, split: str, samples: list[tuple[np.ndarray, int]], per_shard: int) -> list[ShardInfo]:
    os.makedirs(os.path.join(dest, split), exist_ok=True)
    shards, prefix = [], "" if split == "train" else split  # train keys: the sample's index
    for s in range(0, len(samples), per_shard):
        name = f"{split}/shard-{s // per_shard:06d}.tar"
        with tarfile.open(os.path.join(dest, name), "w") as tar:
            for i in range(s, min(s + per_shard, len(samples))):
                arr, label = samples[i]
                key = f"{prefix}{i:05d}"
                for member, data in ((f"{key}.npy", encode_npy(arr)), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path = os.path.join(dest, name)
        shards.append(ShardInfo(name=name, samples=min(per_shard, len(samples) - s), bytes=os.path.getsize(path),
                                sha256=hashlib.sha256(open(path, "rb").read()).hexdigest()))
    return shards


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

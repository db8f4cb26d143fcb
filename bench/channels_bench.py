"""Loader throughput: 6-channel uint16 ``.npy`` shards vs the RGB JPEG path, side by side in one run.

Both go through the same ``StreamingLoader`` with the MAE transform at 224 px (RandomResizedCrop,
flips; the ``.npy`` path is bound to the manifest's channels: per-channel normalisation, 90-degree
rotations), in one process (``--workers 0``) or DataLoader workers, on local shards:

    rgb_jpeg   the JPEGs of bench/loader_bench.py (shorter side 256, cut from scikit-learn's photos)
    npy_u16    6 x 256 x 256 uint16 synthetic cells (tests/_cells.py), shards written as prep does

Reported per path: samples/s, shard bytes read per second, both per core (processes doing the
work). The issue's target: npy bytes/s at least 50% of the JPEG path's. The last line is JSON.

    python bench/channels_bench.py --samples 400 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]

from _cells import cells, write_npy_shards  # noqa: E402
from loader_bench import make_jpegs, write_datasets  # noqa: E402

from dataprep.loader import StreamingLoader  # noqa: E402
from dataprep.transforms import mae_transform  # noqa: E402

WORK = os.path.join(ROOT, "bench", "_work", "channels")


def run_once(shards: str, workers: int, batch: int) -> tuple[float, float]:
    """(samples/s, bytes/s) of one epoch."""
    loader = StreamingLoader(shards, batch_size=batch, seed=0, transform=mae_transform(224), num_workers=workers,
                             partial="drop", window_shards=4)
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in loader)
    seconds = time.perf_counter() - start
    return n / seconds, loader.stats["bytes_read"] / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    jpeg_shards, _ = write_datasets(make_jpegs(args.samples), shard_size=100)
    npy_shards = os.path.join(WORK, "npy")
    write_npy_shards(npy_shards, [a for a, _ in cells(per_class=-(-args.samples // 3), classes=3, size=256)
                                  ][:args.samples], per_shard=100)
    cores = max(1, args.workers)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.passes):  # interleaved rounds, best of each: load from elsewhere hits both alike
        for name, shards in (("rgb_jpeg", jpeg_shards), ("npy_u16", npy_shards)):
            r = run_once(shards, args.workers, args.batch)
            best[name] = max(best.get(name, (0.0, 0.0)), r)
    out = {name: {"samples_per_s_per_core": round(s / cores, 1), "MB_per_s_per_core": round(b / cores / 1e6, 2)}
           for name, (s, b) in best.items()}
    out["npy_bytes_vs_jpeg"] = round(best["npy_u16"][1] / best["rgb_jpeg"][1], 2)
    for name, row in out.items():
        print(f"{name:10s} {row}")
    print(json.dumps({"samples": args.samples, "workers": args.workers, "batch": args.batch, **out}))


if __name__ == "__main__":
    main()

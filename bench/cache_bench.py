"""Student step time with cached teacher targets vs an online teacher, side by side; cache bytes.

    python bench/cache_bench.py [--steps 20] [--classes 1000] [--topk 100] [--head-scale 1]

On the digits (32 px): a ViT teacher ~6x the student's parameters writes a ``teacher_outputs``
cache (top-k of ``--classes``) for one epoch; then, over the same pre-loaded batches, one training
step (forward, backward, SGD) of the student is timed three ways: online distillation (teacher
forward each step), cached targets (cache lookup + soft targets, no teacher), and plain supervised
cross-entropy on the labels. Prints the medians, the ratios, and the cache's bytes per
sample-epoch and per stored logit next to TinyViT's (16 GB / (1.28 M x 300) ~ 42 B per
sample-epoch, i.e. k = 10 with 2 B values, 2 B indices and a 4 B seed), and the read cost of one
unit (fetch + sha256 + decode, a fresh reader each time) per sample. The random-init teacher's
distribution is nearly flat, which compresses better than a trained one: ``--head-scale 40``
multiplies its head weights for a peaked one (top-1 probability near 1, a long tail).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _train_util import write_digit_shards  # noqa: E402

from cluster.storage import Store  # noqa: E402
from dataprep.loader import StreamingLoader  # noqa: E402
from jobs._cache_reader import CacheReader  # noqa: E402
from jobs.distill import DistillConfig, DistillMethod  # noqa: E402
from jobs.engine import StageContext  # noqa: E402
from jobs.teacher_cache import (TeacherOutputsConfig, all_units, bytes_per_sample_epoch, data_digest,  # noqa: E402
                                run_units, write_manifest)

VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}
STUDENT = {**VIT, "depth": 2, "embed_dim": 64, "num_heads": 2}
TEACHER = {"patch_size": 4, "depth": 3, "embed_dim": 128, "num_heads": 4, "img_size": 32}


def build(tmp: str, classes: int, topk: int, head_scale: float) -> tuple[str, dict, str, float]:
    data = write_digit_shards(os.path.join(tmp, "data"), images=256, per_shard=64)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=classes, **TEACHER)
    with torch.no_grad():
        teacher.head.weight.mul_(head_scale)
    save_file(teacher.state_dict(), os.path.join(tmp, "t.safetensors"))
    ratio = sum(p.numel() for p in teacher.parameters()) / sum(
        p.numel() for p in timm.create_model("vit_tiny_patch16_224", num_classes=classes,
                                             **{k: v for k, v in STUDENT.items() if k != "arch"}).parameters())
    ref = {"arch": "vit_tiny_patch16_224", "weights": os.path.join(tmp, "t.safetensors"), "num_classes": classes,
           "args": dict(TEACHER)}
    cfg = TeacherOutputsConfig(name="targets", data="data", teacher=ref, epochs=1, topk=topk, img_size=32, temperature=4.0)
    url, dig = os.path.join(tmp, "cache"), data_digest(data)
    units = all_units(cfg, data, {})
    run_units({"stage": cfg.model_dump(mode="json"), "cache_url": url, "data_url": data, "data_digest": dig}, units)
    write_manifest(cfg, Store(url), units, data, {}, dig)
    return data, ref, url, ratio


def method(data: str, **fields) -> DistillMethod:
    m = DistillMethod(DistillConfig(name="s", data="data", model=STUDENT, crop_scale=(0.2, 1.0), **fields))
    m.setup(StageContext(stage_url="/unused", data_url=data, refs={"cache": fields.get("cache", "")}))
    return m


def timed(step, model, batches: list, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def unit_read_seconds(url: str, repeats: int = 5) -> tuple[float, int]:
    """Median seconds to fetch, verify and decode one unit with a fresh reader; the unit's samples."""
    times = []
    for _ in range(repeats):
        reader = CacheReader(url)
        t0 = time.perf_counter()
        arrays = reader._unit(0, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), int(arrays["logprobs"].shape[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--head-scale", type=float, default=1.0, help="teacher head weights x this (peaked outputs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        data, ref, url, ratio = build(tmp, args.classes, args.topk, args.head_scale)
        online, cached = method(data, teacher=ref), method(data, targets="cached", cache=url)
        loader = StreamingLoader(data, batch_size=32, seed=0, transform=online.train_transform(), partial="drop")
        batches = list(loader)
        torch.manual_seed(0)
        model = online.build_model()
        t_online = timed(lambda m, b: online.step(m, b, 0)[0], model, batches, args.steps)
        t_cached = timed(lambda m, b: cached.step(m, b, 0)[0], model, batches, args.steps)
        t_plain = timed(lambda m, b: F.cross_entropy(m(b["image"], None)["logits"], b["label"]), model, batches,
                        args.steps)
        manifest = cached.cache.manifest
        read_s, unit_samples = unit_read_seconds(url)
    per_sample = bytes_per_sample_epoch(manifest)
    print(f"teacher/student parameters: {ratio:.1f}x; batch 32, 32 px, 1 thread, median of {args.steps - 2} steps")
    print(f"step  online teacher {t_online * 1e3:7.1f} ms | cached targets {t_cached * 1e3:7.1f} ms | "
          f"plain supervised {t_plain * 1e3:7.1f} ms")
    print(f"ratio online/cached {t_online / t_cached:.2f}x; cached/plain {t_cached / t_plain:.3f}x (target <= 1.15)")
    print(f"cache k={args.topk} of {args.classes}: {per_sample:.1f} B per sample-epoch "
          f"({per_sample / args.topk:.2f} B per stored logit, index included; dtypes {manifest['dtypes']}); "
          f"TinyViT ~42 B per sample-epoch (k=10: 4.4 B per logit)")
    print(f"unit read (fetch + sha256 + decode, local disk): {read_s * 1e3:.2f} ms for {unit_samples} samples "
          f"({read_s / unit_samples * 1e6:.1f} us per sample); head scale {args.head_scale}")


if __name__ == "__main__":
    main()

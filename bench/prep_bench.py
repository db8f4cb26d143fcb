"""prep throughput: ``run_prep`` on Ray against a single-process plain-PIL loop, plus the fast paths.

    python bench/prep_bench.py                # 2,000 JPEGs 640x480 -> shorter side 256, quality 90
    python bench/prep_bench.py --n 300        # smaller, for a busy machine

Generates N photo-like JPEGs once (cached under bench/_work/prep), then times, each a
decode-resize-encode-tar loop in this one process:

* ``plain_pil``     Image.open + full decode + convert RGB + BICUBIC resize + PIL JPEG encode
* ``pil_draft``     the same with ``Image.draft()`` (libjpeg DCT-domain scaling in PIL)
* ``simplejpeg``    simplejpeg scaled decode (``min_width/min_height``) + PIL resize + simplejpeg encode
* ``vitforge``      ``dataprep._images.process``: what every prep shard task runs (the simplejpeg path
                    plus EXIF, mode checks and validation)

and ``run_prep`` with 2 Ray workers (embedded Ray, 2 CPUs), cold (first tasks start the worker
processes) and warm. Quality: PSNR of each output against a full-decode LANCZOS reference.
Prints images/s per core and the ratios; the last line is JSON. Throughput is given two ways: per
core of wall time (what the issue asks; meaningless on a machine others are loading) and per
CPU-second actually spent (this process and all its descendants, so every Ray process counts),
which stays comparable under contention.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataprep._images import ImageSpec, process  # noqa: E402

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "prep")


def make_images(n: int, w: int, h: int, folder: str) -> list[str]:
    """Photo-like JPEGs (smooth colour fields + texture), quality 90; cached between runs."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        if not os.path.exists(path):
            rng = np.random.default_rng(i)
            low = Image.fromarray(rng.integers(0, 255, (h // 32, w // 32, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            arr = np.asarray(low, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def target_size(w: int, h: int, short: int) -> tuple[int, int]:
    return (short, round(h * short / w)) if w <= h else (round(w * short / h), short)


def plain_pil(data: bytes, short: int, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize(target_size(*im.size, short), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pil_draft(data: bytes, short: int, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    size = target_size(*im.size, short)
    im.draft("RGB", size)
    im = im.convert("RGB").resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def simplejpeg_scaled(data: bytes, short: int, quality: int) -> bytes:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    size = target_size(w, h, short)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1])
    im = Image.fromarray(arr).resize(size, Image.BICUBIC)
    return simplejpeg.encode_jpeg(np.asarray(im), quality=quality, colorspace="RGB", colorsubsampling="420")


def vitforge(data: bytes, short: int, quality: int) -> bytes:
    return process(data, ImageSpec(ext="jpg", resize=short, quality=quality))


METHODS = {"plain_pil": plain_pil, "pil_draft": pil_draft, "simplejpeg": simplejpeg_scaled, "vitforge": vitforge}


def cpu_seconds(include_self: bool = True) -> float:
    """CPU time (user + system) of this process and all its descendants: with embedded Ray that is
    the GCS, the raylet, the workers and the driver, so Ray's own overhead is counted too.
    ``include_self=False`` counts the descendants only (Ray's processes apart from the driver)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)] if include_self else me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def time_loop(fn, paths: list[str], short: int, quality: int, tar_path: str) -> tuple[float, float]:
    """(images/s of wall time, images per CPU-second) of read -> fn -> tar in this process."""
    start, cpu = time.perf_counter(), time.process_time()
    with tarfile.open(tar_path, "w") as tar:
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                out = fn(f.read(), short, quality)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(out)
            tar.addfile(info, io.BytesIO(out))
    return len(paths) / (time.perf_counter() - start), len(paths) / (time.process_time() - cpu)


def psnr(fn, paths: list[str], short: int, quality: int) -> float:
    """Mean PSNR (dB) of fn's output against a full-decode LANCZOS resize (no re-encode)."""
    values = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        ref_im = Image.open(io.BytesIO(data)).convert("RGB")
        ref = np.asarray(ref_im.resize(target_size(*ref_im.size, short), Image.LANCZOS), dtype=np.float64)
        out = np.asarray(Image.open(io.BytesIO(fn(data, short, quality))).convert("RGB"), dtype=np.float64)
        mse = float(np.mean((out - ref) ** 2))
        values.append(10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))


def time_ray(paths: list[str], short: int, quality: int, workers: int, tag: str) -> dict:
    """One ``run_prep`` with ``workers`` tasks in flight; images/s (Ray start excluded) and in-task rate."""
    from dataprep.prep import PrepOptions, run_prep

    src = os.path.dirname(paths[0])
    options = PrepOptions(resize=short, quality=quality, workers=workers, shard_size=max(1, len(paths) // 8))
    dest = os.path.join(WORK, f"out-{tag}")
    shutil.rmtree(dest, ignore_errors=True)
    cpu = cpu_seconds()
    result = run_prep(src, dest, options, progress=False)
    cpu = cpu_seconds() - cpu
    assert result.manifest.totals["written"] == len(paths), result.manifest.totals
    work = result.seconds - result.timings.get("ray", 0.0)  # the embedded cluster's start is not prep work
    progress = os.path.join(dest, "_progress")
    task_s = sum(json.load(open(os.path.join(progress, f)))["seconds"] for f in os.listdir(progress) if "shard" in f)
    return {"run": tag, "workers": workers, "images_per_s_per_core": round(len(paths) / work / workers, 1),
            "images_per_cpu_s": round(len(paths) / cpu, 1),
            "in_task_images_per_s": round(len(paths) / task_s, 1), "seconds": round(work, 3),
            "timings": result.timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    args = ap.parse_args()

    from cluster.runtime import ensure_ray

    paths = make_images(args.n, args.width, args.height, os.path.join(WORK, f"src-{args.n}-{args.width}x{args.height}"))
    tar_path = os.path.join(WORK, "loop.tar")
    for fn in METHODS.values():  # warm-up: first-use imports (torch) are not per-image work
        time_loop(fn, paths[:5], args.resize, args.quality, tar_path)
    ensure_ray(num_cpus=args.workers)
    runs = [time_ray(paths, args.resize, args.quality, args.workers, "cold")]
    loops: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):  # interleaved rounds, best of each: other load on the machine only slows things
        for name, fn in METHODS.items():
            rate = time_loop(fn, paths, args.resize, args.quality, tar_path)
            loops[name] = tuple(max(a, b) for a, b in zip(loops.get(name, rate), rate))  # type: ignore[assignment]
        runs.append(time_ray(paths, args.resize, args.quality, args.workers, f"warm-{r}"))
    runs.append(time_ray(paths, args.resize, args.quality, 1, "warm-1-worker"))
    quality = {name: round(psnr(fn, paths[:40], args.resize, args.quality), 2) for name, fn in METHODS.items()}
    warm = max(runs[1:-1], key=lambda r: r["images_per_s_per_core"])
    warm_cpu = max(r["images_per_cpu_s"] for r in runs[1:-1])

    for name, (rate, cpu_rate) in loops.items():
        print(f"{name:>11}: {rate:7.1f} images/s/core (wall), {cpu_rate:7.1f} images/CPU-s   "
              f"PSNR vs LANCZOS reference {quality[name]:.2f} dB")
    for r in runs:
        print(f"  run_prep {r['run']:>13}: {r['images_per_s_per_core']:7.1f} images/s/core (wall), "
              f"{r['images_per_cpu_s']:7.1f} images/CPU-s (all Ray processes) ({r['workers']} workers, {r['seconds']} s, "
              f"in-task {r['in_task_images_per_s']} images/s; steps {r['timings']})")
    plain, ours = loops["plain_pil"], loops["vitforge"]
    result = {
        "n": args.n, "size": f"{args.width}x{args.height}", "resize": args.resize, "quality": args.quality,
        "workers": args.workers, "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "loop_images_per_s_per_core": {k: round(v[0], 1) for k, v in loops.items()},
        "loop_images_per_cpu_s": {k: round(v[1], 1) for k, v in loops.items()},
        "psnr_db": quality,
        "ray_runs": runs,
        "fast_path_vs_plain_pil_cpu": round(ours[1] / plain[1], 3),
        "fast_path_vs_plain_pil_wall": round(ours[0] / plain[0], 3),
        "ray_vs_same_loop_cpu": round(warm_cpu / ours[1], 3),
        "ray_vs_same_loop_wall_per_core": round(warm["images_per_s_per_core"] / ours[0], 3),
        "ray_vs_plain_pil_cpu": round(warm_cpu / plain[1], 3),
        "ray_vs_plain_pil_wall_per_core": round(warm["images_per_s_per_core"] / plain[0], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

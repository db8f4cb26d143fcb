"""Cost as the work grows: prep of N small generated images on Ray, then the loader on the result.

For each N (default 10k and 100k) a fresh child process (so peak RSS is that N's alone) runs
``run_prep`` (embedded Ray, 2 workers, shards of 1,000, PNG kept) over Parquet files of 10,000
distinct 16x16 PNGs each (generated once into bench/_work/scale, not timed), then:

    prep wall / CPU per image   driver process and Ray processes (raylet, GCS, workers) apart
    driver peak RSS             ru_maxrss of the child, which is the prep driver
    planning time               make_plan (inside the "scan" lap) and every lap of run_prep
    manifest bytes              manifest.json as written
    loader start-up             StreamingLoader(...) construction + first batch (in-process)
    loader state bytes          json of state_dict() at 10 % and 50 % of epoch 0, and 50 % of epoch 1
    checkpoint meta bytes       the engine's meta minus the run config: step, epoch, loader state, RNG states

Then a linear fit in N (two points) extrapolates driver memory and manifest size to 10^9 images.

    python bench/scale_bench.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prep_bench import cpu_seconds  # noqa: E402  (bench/ is on sys.path when run as a script)

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "scale")
ROWS_PER_FILE = 10_000


def make_source(n: int) -> str:
    """N distinct 16x16 PNGs (the index is written into the pixels) in Parquet files; reused if present."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    src = os.path.join(WORK, f"src-{n}")
    if os.path.exists(src + ".done"):
        return src
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for f in range(0, n, ROWS_PER_FILE):
        images, labels = [], []
        for i in range(f, min(n, f + ROWS_PER_FILE)):
            arr = base.copy()
            arr[0, :4, :] = np.frombuffer(i.to_bytes(12, "little"), np.uint8).reshape(4, 3)  # distinct content
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
            images.append(buf.getvalue())
            labels.append(i % 10)
        pq.write_table(pa.table({"image": images, "label": labels}), os.path.join(src, f"part-{f // ROWS_PER_FILE:05d}.parquet"))
    open(src + ".done", "w").close()
    return src


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_descendants() -> float:
    return cpu_seconds(include_self=False)


def one(n: int, workers: int, batch: int) -> dict:
    """Prep + loader for one N; runs in its own process."""
    import dataprep.prep as prep_mod
    from cluster.runtime import ensure_ray
    from dataprep.prep import PrepOptions, run_prep

    src = os.path.join(WORK, f"src-{n}")
    dest = os.path.join(WORK, f"shards-{n}")
    shutil.rmtree(dest, ignore_errors=True)
    plan_s = []
    real_plan = prep_mod.make_plan

    def timed_plan(*a, **kw):
        t = time.perf_counter()
        try:
            return real_plan(*a, **kw)
        finally:
            plan_s.append(time.perf_counter() - t)

    prep_mod.make_plan = timed_plan
    ensure_ray(None, num_cpus=workers)  # Ray's start is not prep work
    time.sleep(2)
    c_drv, c_ray, t0 = _cpu_self(), _cpu_descendants(), time.perf_counter()
    result = run_prep(src, dest, PrepOptions(workers=workers, shard_size=1000, format="png"), progress=False)
    wall = time.perf_counter() - t0
    drv, ray_cpu = _cpu_self() - c_drv, _cpu_descendants() - c_ray
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    written = int(result.manifest.totals.get("written", n))
    import ray

    ray.shutdown()
    out = {"n": n, "written": written, "prep_wall_s": round(wall, 2),
           "prep_wall_ms_per_image": round(1e3 * wall / written, 4),
           "driver_cpu_ms_per_image": round(1e3 * drv / written, 4),
           "ray_procs_cpu_ms_per_image": round(1e3 * ray_cpu / written, 4),
           "driver_peak_rss_mb": round(rss_mb, 1), "plan_s": round(sum(plan_s), 3), "laps_s": result.timings,
           "manifest_bytes": os.path.getsize(os.path.join(dest, "manifest.json")),
           "shards": len(result.manifest.split("train").shards)}
    out.update(loader_costs(dest, batch))
    out["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return out


def loader_costs(dest: str, batch: int) -> dict:
    from dataprep.loader import StreamingLoader
    from jobs._ckpt_state import capture_rng_state

    t0 = time.perf_counter()
    loader = StreamingLoader(dest, batch_size=batch, seed=0, num_workers=0, partial="drop")
    built = time.perf_counter() - t0
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    per_epoch = loader.batches_per_epoch
    sizes = {}
    for epoch in range(2):
        if epoch == 1:
            loader.set_epoch(1)
            it = iter(loader)
            next(it)
        done = 1
        for mark in ((0.1, 0.5) if epoch == 0 else (0.5,)):
            while done < int(per_epoch * mark):
                next(it)
                done += 1
            sizes[f"epoch{epoch}_{int(mark * 100)}pct"] = len(json.dumps(loader.state_dict()).encode())
        it.close()
    meta = {"step": per_epoch + done, "epoch": loader.epoch, "loader": loader.state_dict(), "rng": capture_rng_state()}
    return {"loader_construct_s": round(built, 3), "loader_first_batch_s": round(first, 3),
            "loader_state_bytes": sizes, "ckpt_meta_bytes_wo_config": len(json.dumps(meta).encode())}


def extrapolate(rows: list[dict], target: int = 10**9) -> dict:
    a, b = rows[0], rows[-1]
    out = {}
    for key in ("driver_peak_rss_mb", "manifest_bytes", "plan_s"):
        slope = (b[key] - a[key]) / (b["n"] - a["n"])
        out[key] = {"per_image": slope, "at_1e9": round(b[key] + slope * (target - b["n"]), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.workers, args.batch)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        make_source(n)
        env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--workers", str(args.workers),
                               "--batch", str(args.batch)], capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"N={n} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"rows": rows}
    if len(rows) > 1:
        summary["extrapolated"] = extrapolate(rows)
        summary["prep_cpu_per_image_ratio_last_vs_first"] = round(
            (rows[-1]["driver_cpu_ms_per_image"] + rows[-1]["ray_procs_cpu_ms_per_image"])
            / (rows[0]["driver_cpu_ms_per_image"] + rows[0]["ray_procs_cpu_ms_per_image"]), 3)
        summary["prep_wall_per_image_ratio_last_vs_first"] = round(
            rows[-1]["prep_wall_ms_per_image"] / rows[0]["prep_wall_ms_per_image"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""One-GPU check: MAE ViT-B/16 and DINO ViT-S/16 through the real engine, GPU JPEG decode, data wait.

Run by ``bench/gpu_check.sh`` (which bounds the whole run to 8 minutes). Writes one JSON:

    mae_vitb16      images/s and MFU as the engine logs them (metrics.jsonl; bf16, batch 128)
    dino_vits16     images/s with 2x224 + 10x96 crops (batch 64)
    gpu_decode      torchvision.io.decode_jpeg(device="cuda") + RandomResizedCrop on the GPU, images/s
    data_wait_pct   the loader's share of step time (engine-logged data_wait_s / step_time_s), per method

Each training part is ``torchrun --nproc-per-node 1 -m pipeline.launch --spec SPEC --stage NAME`` (no Ray) on
JPEG shards generated here; steps after the first ``--warmup`` are summarised (median). Nothing
is installed or downloaded. ``--dry``: every part for one step on the CPU with tiny models, so a
test can run it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from cluster.storage import Store  # noqa: E402  (after the path set-up above)
from jobs.metrics import read_metrics  # noqa: E402

FULL = {
    "mae": {"kind": "mae", "model": {"arch": "vit_base_patch16_224"}, "batch_size": 128, "precision": "bf16",
            "loader_workers": 8},
    "dino": {"kind": "dino", "model": {"arch": "vit_small_patch16_224"}, "local_crops": 10, "batch_size": 64,
             "precision": "bf16", "loader_workers": 8},
}
DRY = {
    "mae": {"kind": "mae", "model": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1,
                                     "embed_dim": 96}, "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 2},
            "batch_size": 4, "loader_workers": 0},
    "dino": {"kind": "dino", "model": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1,
                                       "embed_dim": 96}, "head": {"out_dim": 64}, "local_crops": 10, "batch_size": 4,
             "loader_workers": 0},
}


def write_spec(work: str, data: str, dry: bool, steps: int) -> str:
    import yaml

    stages = []
    for name, cfg in (DRY if dry else FULL).items():
        stages.append({"name": name, "data": data, "max_steps": steps, "zero_stage": 0,
                       "checkpoint": {"every_steps": 10**6, "keep_last": 1}, **cfg})
    spec = {"name": "gpu-check", "storage": os.path.join(work, "runs"),
            "compute": {"workers": 1, "gpus_per_worker": 0 if dry else 1, "cpus_per_worker": 1 if dry else 8},
            "stages": stages}
    path = os.path.join(work, "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_part(spec: str, work: str, stage: str, warmup: int, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(_free_port()),
           "-m", "pipeline.launch", "--spec", spec, "--stage", stage]  # torchrun: the process group the engine expects
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    out: dict = {"wall_s": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
    if proc.returncode:
        out["error"] = proc.stderr[-1500:]
        return out
    rows = read_metrics(Store(os.path.join(work, "runs", "gpu-check", "stages", stage)))
    steps = [r for r in rows if "images_per_s" in r and r.get("images_per_s")]
    use = steps[warmup:] or steps[-1:]
    med = lambda k: statistics.median(r[k] for r in use) if use and all(k in r for r in use) else None  # noqa: E731
    out.update(steps=len(steps), summarised=len(use), images_per_s=med("images_per_s"), mfu=med("mfu"),
               step_time_s=med("step_time_s"), data_wait_s=med("data_wait_s"))
    if out["data_wait_s"] is not None and out["step_time_s"]:
        out["data_wait_pct"] = round(100 * out["data_wait_s"] / out["step_time_s"], 2)
    return out


def gpu_decode(jpegs: list[bytes], dry: bool, batch: int = 128, passes: int = 3) -> dict:
    """Batched decode_jpeg on the device + a per-image RandomResizedCrop(224) + flip there; images/s."""
    import random

    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from dataprep.transforms import random_resized_crop_params

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    size = 32 if dry else 224

    def run() -> int:
        rng = random.Random(0)
        for s in range(0, len(datas), batch):
            imgs = decode_jpeg(datas[s:s + batch], device=device)
            crops = []
            for img in imgs:
                top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], (0.08, 1.0), (3 / 4, 4 / 3), rng)
                out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
                crops.append(F.horizontal_flip(out) if rng.random() < 0.5 else out)
            torch.stack(crops)
        if device == "cuda":
            torch.cuda.synchronize()
        return len(datas)

    run()  # warm-up (CUDA context, nvjpeg handles)
    best = 0.0
    for _ in range(1 if dry else passes):
        t0 = time.perf_counter()
        n = run()
        best = max(best, n / (time.perf_counter() - t0))
    return {"images_per_s": round(best, 1), "images": len(datas), "device": device, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="one step of each part on the CPU, tiny models")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "_work", "gpu_check.json"))
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "_work", "gpu_check"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    import shutil

    import torch

    import loader_bench
    from loader_bench import make_jpegs, write_datasets

    steps, warmup, n = (1, 0, 16) if args.dry else (args.steps, args.warmup, args.images)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    t0 = time.perf_counter()
    jpegs = make_jpegs(n)
    loader_bench.WORK = os.path.join(args.work, "data")  # shards under --work, not bench/_work/loader
    shards, _ = write_datasets(jpegs, 250 if not args.dry else 8)
    spec = write_spec(args.work, shards, args.dry, steps)
    res: dict = {"dry": args.dry, "torch": torch.__version__,
                 "device": "cpu" if args.dry else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
                 "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "steps": steps, "warmup_steps": warmup}
    res["gpu_decode"] = gpu_decode(jpegs, args.dry)
    res["mae_vitb16"] = train_part(spec, args.work, "mae", warmup, 120 if args.dry else 220)
    res["dino_vits16"] = train_part(spec, args.work, "dino", warmup, 120 if args.dry else 180)
    res["data_wait_pct"] = {k: res[k].get("data_wait_pct") for k in ("mae_vitb16", "dino_vits16")}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    failed = [k for k in ("mae_vitb16", "dino_vits16") if res[k].get("exit")] + \
        (["gpu_decode"] if "error" in res["gpu_decode"] else [])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

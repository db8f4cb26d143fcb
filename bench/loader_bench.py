"""Loader throughput: our streaming shard reader vs a bare loop (the ceiling) vs a per-file DataLoader.

Every path does the same work per image: JPEG decode + RandomResizedCrop(224) + horizontal flip
+ normalize, on the same JPEGs (shorter side 256). The images are cut from the two real photos
that ship with scikit-learn (random crops, flips, colour shifts), so JPEG decode costs what it
costs on photos, not on synthetic noise.

    ours      StreamingLoader over WebDataset shards (local disk), shuffle window, per-sample seeded
              augmentation, DataLoader workers: decode with torchvision.io + tensor crop.
    bare      one process, one core, a plain loop over the same bytes already in memory, doing the
              same decode + augment (no tar, no shuffle, no DataLoader, no collation): the ceiling.
    per_file  torch DataLoader over the same images as individual files (ImageFolder layout), as
              usually written: torchvision.datasets.ImageFolder (PIL decode) + torchvision v2
              RandomResizedCrop / flip / normalize. Also measured with the fast decode
              (per_file_fast) so the two effects (format vs decode path) can be told apart.

Images/s per core = images/s / processes doing the work (DataLoader workers, or 1 in-process).
The last line printed is JSON. On a CUDA machine ``--gpu`` adds batched ``decode_jpeg`` on the GPU.

    python bench/loader_bench.py --images 3000 --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dataprep._decode import decode  # noqa: E402
from dataprep.loader import StreamingLoader  # noqa: E402
from dataprep.manifest import Manifest, ShardInfo, SplitInfo, save_manifest  # noqa: E402
from dataprep.transforms import MAETransform  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from cluster.storage import Store  # noqa: E402

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "loader")


def crop_flip_normalize(size: int = 224) -> MAETransform:
    """RandomResizedCrop(size, scale (0.08, 1), bilinear) + flip + normalize: torchvision's defaults."""
    return MAETransform(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR)


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs, 320x256 or 256x320, cut from scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        photo = photos[rng.randrange(2)]
        w, h = (320, 256) if rng.random() < 0.7 else (256, 320)
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.randrange(photo.width - cw + 1), rng.randrange(photo.height - ch + 1)
        img = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img).astype(np.int16) + np.array([rng.randint(-20, 20) for _ in range(3)])
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_datasets(jpegs: list[bytes], shard_size: int) -> tuple[str, str]:
    """The same images as WebDataset shards + manifest, and as an ImageFolder. Returns both roots."""
    shards, folder = os.path.join(WORK, "shards"), os.path.join(WORK, "folder")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(os.path.join(shards, "train"))
    infos = []
    for s in range(0, len(jpegs), shard_size):
        name = f"train/shard-{s // shard_size:06d}.tar"
        path = os.path.join(shards, name)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, data in enumerate(jpegs[s:s + shard_size], start=s):
                key = hashlib.sha256(data).hexdigest()[:24]
                for ext, blob in (("jpg", data), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                cls_dir = os.path.join(folder, str(i % 10))
                os.makedirs(cls_dir, exist_ok=True)
                with open(os.path.join(cls_dir, f"{key}.jpg"), "wb") as f:
                    f.write(data)
        with open(path, "rb") as f:
            blob = f.read()
        infos.append(ShardInfo(name=name, samples=len(jpegs[s:s + shard_size]), bytes=len(blob),
                               sha256=hashlib.sha256(blob).hexdigest()))
    save_manifest(Store(shards), Manifest(splits={"train": SplitInfo(shards=infos)},
                                          classes=[str(c) for c in range(10)]))
    return shards, folder


def rate(fn) -> float:
    """Images/s of one run of ``fn`` (which returns the number of images it did)."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def bare_loop(jpegs: list[bytes]):
    t = crop_flip_normalize()

    def run() -> int:
        for i, data in enumerate(jpegs):
            t(decode(data, "jpg"), random.Random(i))
        return len(jpegs)

    return run


def ours(shards: str, workers: int, batch: int, verify: bool = True):
    loader = StreamingLoader(shards, batch_size=batch, seed=0, transform=crop_flip_normalize(), num_workers=workers,
                             partial="drop", window_shards=4, verify_shards=verify)
    return lambda: sum(len(b["key"]) for b in loader)  # each run is the next epoch


def per_file(folder: str, workers: int, batch: int, fast: bool):
    import torchvision
    from torchvision.transforms import v2

    if fast:
        def load(path: str):
            with open(path, "rb") as f:
                return decode(f.read(), "jpg")

        crop = crop_flip_normalize()
        ds = torchvision.datasets.ImageFolder(folder, loader=load, transform=lambda img: crop(img))
    else:
        tf = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406],
                                                                            [0.229, 0.224, 0.225])])
        ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return lambda: sum(len(y) for _, y in loader)


def gpu_decode(jpegs: list[bytes], batch: int, passes: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    from torchvision.io import decode_jpeg

    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    decode_jpeg(datas[:batch], device="cuda")
    torch.cuda.synchronize()

    def run() -> int:
        for s in range(0, len(datas), batch):
            decode_jpeg(datas[s:s + batch], device="cuda")
        torch.cuda.synchronize()
        return len(datas)

    return max(rate(run) for _ in range(passes))


def verify_cost(shards: str, args: argparse.Namespace) -> None:
    """Images/s of the one-process loader with shard verification on and off (best of ``passes``,
    interleaved so load from elsewhere hits both alike), and the cost of verifying in percent."""
    runners = {"verify": ours(shards, 0, args.batch, True), "no_verify": ours(shards, 0, args.batch, False)}
    best = dict.fromkeys(runners, 0.0)
    for _ in range(args.passes):
        for name, run in runners.items():
            best[name] = max(best[name], rate(run))
    res = {"images": args.images, "passes": args.passes, "load_avg_1m": os.getloadavg()[0],
           "verify_img_s": best["verify"], "no_verify_img_s": best["no_verify"],
           "verify_cost_pct": 100 * (1 - best["verify"] / best["no_verify"])}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="also time batched decode_jpeg on CUDA")
    ap.add_argument("--verify-cost", action="store_true",
                    help="only: one-process StreamingLoader with and without shard sha256 checks, interleaved")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per process in every path

    jpegs = make_jpegs(args.images)
    shards, folder = write_datasets(jpegs, args.shard_size)
    if args.verify_cost:
        verify_cost(shards, args)
        return
    w = max(1, args.workers)
    runners = {
        "bare": bare_loop(jpegs),
        "ours": ours(shards, args.workers, args.batch),
        "ours_1proc": ours(shards, 0, args.batch),
        "per_file": per_file(folder, args.workers, args.batch, fast=False),
        "per_file_fast": per_file(folder, args.workers, args.batch, fast=True),
    }
    best = dict.fromkeys(runners, 0.0)
    for _ in range(args.passes):  # rounds interleave the paths, so load from elsewhere hits all alike
        for name, run in runners.items():
            best[name] = max(best[name], rate(run))
    res: dict[str, float | int | str | None] = {"images": args.images, "workers": args.workers, "batch": args.batch,
                                               "passes": args.passes, "cores": os.cpu_count(),
                                               "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__}
    res["bare_img_s_per_core"] = best["bare"]
    res["ours_img_s"] = best["ours"]
    res["ours_img_s_per_core"] = best["ours"] / w
    res["ours_1proc_img_s_per_core"] = best["ours_1proc"]
    res["per_file_img_s"] = best["per_file"]
    res["per_file_img_s_per_core"] = best["per_file"] / w
    res["per_file_fast_img_s_per_core"] = best["per_file_fast"] / w
    res["ratio_ours_vs_bare"] = res["ours_img_s_per_core"] / res["bare_img_s_per_core"]
    res["ratio_ours_1proc_vs_bare"] = res["ours_1proc_img_s_per_core"] / res["bare_img_s_per_core"]
    res["ratio_ours_vs_per_file"] = best["ours"] / best["per_file"]
    res["ratio_ours_vs_per_file_fast"] = best["ours"] / best["per_file_fast"]
    if args.gpu:
        res["gpu_decode_img_s"] = gpu_decode(jpegs, args.batch, args.passes)
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()

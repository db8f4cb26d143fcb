"""Helpers for the prep tests: tiny images of every kind, bad inputs, reading shards back."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil

import numpy as np
from PIL import Image

from cluster.storage import Store
from dataprep.manifest import Manifest


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def jpeg(w: int = 40, h: int = 30, seed: int = 0, **kw) -> bytes:
    return encode(noise(w, h, seed), "JPEG", **kw)


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A 20000x20000 1-bit PNG: ~50 KB on disk, 400 M pixels (over PIL's decompression-bomb limit)."""
    return encode(Image.new("1", (20000, 20000)), "PNG")


def odd_but_good() -> dict[str, bytes]:
    """Valid images in awkward modes and names: each must become one RGB sample."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 40x30, shown 30x40
    rgb = noise(40, 30, 7)
    sixteen = np.random.default_rng(3).integers(0, 65535, (30, 40)).astype(np.uint16)
    return {
        "rotated exif.jpg": encode(rgb, "JPEG", exif=exif.tobytes()),
        "cmyk.jpg": encode(noise(40, 30, 8).convert("CMYK"), "JPEG"),
        "gray.jpg": encode(noise(40, 30, 9).convert("L"), "JPEG"),
        "sixteen bit.png": encode(Image.fromarray(sixteen), "PNG"),
        "alpha.png": encode(noise(40, 30, 10).convert("RGBA"), "PNG"),
        "palette.png": encode(noise(40, 30, 11).convert("P"), "PNG"),
        "ünïcødé 图像.jpg": jpeg(seed=12),
        "la.png": encode(noise(40, 30, 13).convert("LA"), "PNG"),
    }


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reject reason prep must report)."""
    good = encode(noise(64, 64, 1), "PNG")
    return {
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(300), "corrupt"),
        "truncated.png": (good[: len(good) // 2], "truncated"),
        "empty.jpg": (b"", "empty"),
        "one pixel.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
        "bomb.png": (bomb_png(), "too_large"),
        "notes.txt": (b"this is not an image\n", "unsupported"),
    }


def write_files(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_objects(dest: str, manifest: Manifest) -> dict[str, bytes]:
    """Every shard, the manifest and rejects.jsonl of a prep output, by name."""
    store = Store(dest)
    names = [s.name for split in manifest.splits.values() for s in split.shards] + ["manifest.json", "rejects.jsonl"]
    return {n: store.get_bytes(n) for n in names}


def download(objects: dict[str, bytes], local_dir: str) -> dict[str, str]:
    """Write shard bytes to local files (for the plain webdataset reader); returns name -> path."""
    shutil.rmtree(local_dir, ignore_errors=True)
    paths = {}
    for name, data in objects.items():
        if name.endswith(".tar"):
            paths[name] = os.path.join(local_dir, name)
            os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
            with open(paths[name], "wb") as f:
                f.write(data)
    return paths


def read_with_webdataset(paths: list[str]) -> list[dict]:
    """Samples as the plain ``webdataset`` library yields them, PIL-decoded."""
    import webdataset as wds

    return list(wds.WebDataset(paths, shardshuffle=False).decode("pil"))

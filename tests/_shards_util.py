"""Test helper: write small WebDataset shards and their manifest (local dir or s3:// URL).

Stands in for the prep tool in loader tests, so they depend only on the manifest contract.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile

import numpy as np
from PIL import Image

from cluster.storage import Store
from dataprep.manifest import Manifest, ShardInfo, SplitInfo, save_manifest


def make_image(index: int, size: tuple[int, int] = (32, 32), ext: str = "png") -> bytes:
    """A deterministic, distinct RGB image (``size`` = (width, height)) encoded as ``ext``."""
    rng = np.random.default_rng(index)
    w, h = size
    base = rng.integers(0, 256, size=(1, 1, 3))
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    noise = rng.integers(0, 64, size=(h, w, 3))
    pixels = ((base + ramp + noise) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG" if ext == "jpg" else ext.upper(), quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(dest: str, counts: dict[str, list[int]] | list[int], ext: str = "png", size: tuple[int, int] = (32, 32),
                 classes: int | None = 3, sizes: list[tuple[int, int]] | None = None,
                 corrupt: set[int] = frozenset(), storage_options: dict | None = None) -> Manifest:
    """Write shards with ``counts[split][i]`` samples in shard i, then the manifest (last).

    Keys are content hashes; labels are ``sample_number % classes`` (no ``.cls`` when ``classes`` is
    None). ``sizes`` optionally cycles image sizes. Sample numbers in ``corrupt`` get garbage
    instead of image bytes. Returns the manifest written.
    """
    if isinstance(counts, list):
        counts = {"train": counts}
    store = Store(dest, storage_options)
    splits: dict[str, SplitInfo] = {}
    number = 0
    with tempfile.TemporaryDirectory(prefix="vf-shards-") as tmp:
        for split, per_shard in counts.items():
            infos = []
            for s, n in enumerate(per_shard):
                name = f"{split}/shard-{s:06d}.tar"
                local = os.path.join(tmp, name.replace("/", "_"))
                with tarfile.open(local, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for _ in range(n):
                        data = make_image(number, sizes[number % len(sizes)] if sizes else size, ext)
                        if number in corrupt:
                            data = b"not an image %d " % number + data[len(data) // 2:]
                        key = hashlib.sha256(data).hexdigest()[:24]
                        _add(tar, f"{key}.{ext}", data)
                        if classes:
                            _add(tar, f"{key}.cls", str(number % classes).encode())
                        number += 1
                with open(local, "rb") as f:
                    blob = f.read()
                store.put_file(local, name)
                infos.append(ShardInfo(name=name, samples=n, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()))
            splits[split] = SplitInfo(shards=infos)
        manifest = Manifest(splits=splits, classes=[str(c) for c in range(classes)] if classes else None, image_ext=ext)
        save_manifest(store, manifest)
    return manifest


def shard_keys(dest: str, split: str = "train") -> list[list[str]]:
    """The sample keys of every shard of ``split``, in shard order (read back from the tars)."""
    store = Store(dest)
    from dataprep.manifest import load_manifest

    manifest, _ = load_manifest(dest)
    out = []
    for shard in manifest.split(split).shards:
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(shard.name))) as tar:
            keys: list[str] = []
            for m in tar.getmembers():
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
        out.append(keys)
    return out

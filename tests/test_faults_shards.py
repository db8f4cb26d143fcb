"""Fault suite, verified shards and bounded decode (issue 14 points 5 and 10), against the real
SeaweedFS and local disk:

* shard bytes changed after prep (a label flipped, same size): refused naming the shard (``fail``),
  or skipped whole and counted (``skip``); the skip budget then stops the epoch naming the shard;
* a tar header claiming a 2 GiB member is refused without reading it;
* a 100-megapixel PNG is refused from its header (prep's pixel limit), never decoded;
* a download killed with -9 leaves a reservation in the shard cache that is reclaimed.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from _shards_util import write_shards
from cluster.storage import Store
from dataprep._shards import ShardCache
from dataprep.loader import ShardError, StreamingLoader
from dataprep.manifest import Manifest, ShardInfo, SplitInfo, save_manifest

pytestmark = pytest.mark.faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loader(root, **kw) -> StreamingLoader:
    return StreamingLoader(root, **{"batch_size": 4, "seed": 0, "shuffle": False, "num_workers": 0, **kw})


def _flip_a_label(root: str) -> str:
    """Change one .cls of shard 0 in place (same size): the tar stays valid, only the hash tells."""
    store = Store(root)
    name = "train/shard-000000.tar"
    blob = bytearray(store.get_bytes(name))
    with tarfile.open(fileobj=io.BytesIO(bytes(blob))) as tar:
        member = next(m for m in tar if m.name.endswith(".cls") and blob[m.offset_data:m.offset_data + 1] == b"0")
    blob[member.offset_data] = ord("1")
    store.put_bytes(name, bytes(blob))
    return name


def test_a_tampered_shard_is_refused_naming_it_or_skipped_whole_and_counted(s3_url):
    write_shards(s3_url, [8, 8])
    name = _flip_a_label(s3_url)
    with pytest.raises(ShardError, match=f"{name}.*does not match the manifest's sha256"):
        list(_loader(s3_url, on_error="fail"))
    loader = _loader(s3_url, on_error="skip", skip_budget=None, batch_size=16)
    batches = list(loader)
    assert loader.stats["skipped"] == 8  # every sample of the tampered shard, none of the good one
    served = [k for b in batches for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]
    assert len(served) == 8


def test_skips_over_the_budget_fail_the_epoch_naming_the_shards(s3_url):
    write_shards(s3_url, [8, 8])
    name = _flip_a_label(s3_url)
    with pytest.raises(ShardError, match=f"skip budget of 0 per epoch.*{name}"):
        list(_loader(s3_url, on_error="skip", batch_size=16))  # default budget: 0.1% of 16 samples
    assert len(list(_loader(s3_url, on_error="skip", skip_budget=8, batch_size=16))) == 1  # a budget that fits


def _one_shard(root: str, members: list[tuple[tarfile.TarInfo, bytes]], samples: int) -> None:
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    buf = io.BytesIO()
    for info, data in members:
        buf.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        buf.write(data + b"\0" * (-len(data) % 512))
    buf.write(b"\0" * 1024)
    blob = buf.getvalue()
    Store(root).put_bytes("train/shard-000000.tar", blob)
    import hashlib
    save_manifest(Store(root), Manifest(splits={"train": SplitInfo(shards=[ShardInfo(
        name="train/shard-000000.tar", samples=samples, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())])},
        classes=None, image_ext="png"))


def _member(name: str, data: bytes, claimed: int | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data) if claimed is None else claimed, 0o444, 0
    return info, data


def test_a_member_claiming_2_gib_is_refused_unread(tmp_path):
    from _shards_util import make_image

    root = str(tmp_path / "shards")
    _one_shard(root, [_member("a.png", make_image(0)), _member("b.png", make_image(1)[:600], claimed=2 << 30)], 2)
    with pytest.raises(ShardError, match=r"claims 2147483648 bytes, more than the cap of \d+ .*refused unread"):
        list(_loader(root, on_error="fail"))
    loader = _loader(root, on_error="skip", skip_budget=None)
    assert sum(len(b["key"]) for b in loader) == 4 and loader.stats["skipped"] >= 1  # (pads repeat it)


def test_a_100_megapixel_png_is_refused_from_its_header(tmp_path):
    from _shards_util import make_image

    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # a few KiB that decode to 100 megapixels
    root = str(tmp_path / "shards")
    _one_shard(root, [_member("a.png", make_image(0)), _member("bomb.png", bomb.getvalue())], 2)
    with pytest.raises(ShardError, match=r"100000000 pixels is over the limit of 89478485.*refused undecoded"):
        list(_loader(root, on_error="fail"))


KILLED_DOWNLOAD = """
import os, sys
sys.path.insert(0, {repo!r})
from dataprep._shards import ShardCache
cache = ShardCache({cache!r}, limit_bytes={limit})
print(cache._reserve(cache._path("train/shard-000000.tar", "x" * 64), {size}), flush=True)
os.kill(os.getpid(), 9)  # killed mid-download: the reservation stays behind
"""


def test_a_reservation_of_a_download_killed_with_9_is_reclaimed(tmp_path):
    write_shards(str(tmp_path / "shards"), [8])
    size = os.path.getsize(tmp_path / "shards" / "train" / "shard-000000.tar")
    cache_dir = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD.format(repo=REPO, cache=cache_dir, limit=size,
                                                                        size=size)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and ".resv-" in proc.stdout
    assert any(".resv-" in e for e in os.listdir(cache_dir))
    # the cache holds exactly one shard: a reservation counted forever would make it never fit
    loader = StreamingLoader(str(tmp_path / "shards"), batch_size=4, seed=0, num_workers=0, cache_dir=cache_dir,
                             cache_limit_bytes=size)
    assert sum(len(b["key"]) for b in loader) == 8
    assert loader.stats["bytes_read"] > 0 and ShardCache(cache_dir, size).usage() == size
    assert not any(".resv-" in e for e in os.listdir(cache_dir))

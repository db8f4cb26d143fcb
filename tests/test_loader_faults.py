"""StreamingLoader under bad data: truncated shards, corrupt samples, missing shards. Never a hang."""

from __future__ import annotations

import collections
import os

import pytest

from dataprep.loader import MissingShardError, ShardError, StreamingLoader
from dataprep.manifest import load_manifest
from tests._shards_util import shard_keys, write_shards

pytestmark = pytest.mark.faults

COUNTS = [8, 8, 8, 8]


def make(root, world=1, rank=0, **kw) -> StreamingLoader:
    # these faults are damaged bytes the parser must survive: the manifest's sha256 check (which would
    # refuse such a shard whole, see test_faults_shards.py) and the skip budget are off here
    kw = {"verify_shards": False, "skip_budget": None, **kw}
    return StreamingLoader(root, batch_size=4, seed=3, rank=rank, world_size=world, window_shards=2, **kw)


def truncate(root: str, shard: int, keep_fraction: float) -> str:
    manifest, _ = load_manifest(root)
    name = manifest.split("train").shards[shard].name
    path = os.path.join(root, name)
    os.truncate(path, int(os.path.getsize(path) * keep_fraction))
    return name


def lockstep(loaders) -> list[list[dict]]:
    out = [list(ld) for ld in loaders]
    assert len({len(o) for o in out}) == 1
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_skipped_counted_and_ranks_stay_even(tmp_path, caplog, num_workers):
    root = str(tmp_path)
    write_shards(root, COUNTS)
    keys = shard_keys(root)
    name = truncate(root, 1, 0.5)
    loaders = [make(root, 2, r, on_error="skip", num_workers=num_workers) for r in range(2)]
    batches = lockstep(loaders)
    assert all(len(b) == loaders[0].batches_per_epoch for b in batches)
    seen = collections.Counter(k for per in batches for b in per for k, p in zip(b["key"], b["pad"]) if not p)
    skipped = sum(ld.stats["skipped"] for ld in loaders)
    assert 0 < skipped < 8
    assert set(seen) <= {k for ks in keys for k in ks}
    assert max(seen.values()) == 1
    assert len(seen) == sum(COUNTS) - skipped
    assert all(k in seen for i, ks in enumerate(keys) if i != 1 for k in ks)
    if num_workers == 0:
        assert name in caplog.text


def test_truncated_shard_fails_naming_the_shard(tmp_path):
    root = str(tmp_path)
    write_shards(root, COUNTS)
    name = truncate(root, 2, 0.6)
    with pytest.raises(ShardError, match=name.replace(".", r"\.")):
        list(make(root, on_error="fail"))


def test_corrupt_sample_is_skipped_with_its_key_logged(tmp_path, caplog):
    root = str(tmp_path)
    write_shards(root, COUNTS, corrupt={5, 20})
    keys = [k for ks in shard_keys(root) for k in ks]
    loader = make(root, on_error="skip", num_workers=0)
    batches = list(loader)
    assert loader.stats["skipped"] == 2
    seen = [k for b in batches for k, p in zip(b["key"], b["pad"]) if not p]
    assert sorted(seen) == sorted(k for i, k in enumerate(keys) if i not in (5, 20))
    assert keys[5] in caplog.text and keys[20] in caplog.text
    assert all(len(b["key"]) == 4 for b in batches)  # skipped samples are replaced, batches stay full


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_fails_naming_shard_and_key(tmp_path, num_workers):
    root = str(tmp_path)
    write_shards(root, COUNTS, corrupt={13})
    key = [k for ks in shard_keys(root) for k in ks][13]
    with pytest.raises(ShardError, match=key) as info:
        list(make(root, on_error="fail", num_workers=num_workers))
    assert "train/shard-000001.tar" in str(info.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_shard_raises_a_clear_error(tmp_path, num_workers):
    root = str(tmp_path)
    write_shards(root, COUNTS)
    os.remove(os.path.join(root, "train/shard-000003.tar"))
    with pytest.raises(MissingShardError, match=r"shard-000003\.tar.*does not exist"):
        list(make(root, num_workers=num_workers, on_error="skip"))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        make(str(tmp_path))

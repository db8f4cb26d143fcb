"""StreamingLoader against a real S3 server (SeaweedFS): streaming, the shard cache, missing objects."""

from __future__ import annotations

import collections
import os
import threading

import pytest

from cluster.storage import Store
from dataprep.loader import MissingShardError, StreamingLoader
from tests._shards_util import write_shards

COUNTS = [6] * 12


@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory) -> tuple[str, str]:
    """The same shards on S3 and on local disk."""
    url = f"s3://{s3.bucket}/loader-{os.getpid()}"
    local = str(tmp_path_factory.mktemp("local-shards"))
    write_shards(url, COUNTS)
    write_shards(local, COUNTS)
    return url, local


def size_or_zero(path) -> int:
    """Size of a cache entry; 0 if the reader thread renamed or evicted it since the listing."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def make(url, **kw) -> StreamingLoader:
    kw.setdefault("batch_size", 4)
    return StreamingLoader(url, seed=5, window_shards=2, **kw)


def test_s3_stream_matches_the_local_stream(s3_shards):
    url, local = s3_shards
    remote = [b["key"] for b in make(url, num_workers=2)]
    assert remote == [b["key"] for b in make(local)]


def test_s3_streaming_reads_shards_on_demand_not_the_whole_dataset_first(s3_shards):
    url, _ = s3_shards
    loader = make(url, readahead_shards=1)
    total = sum(s.bytes for s in loader.manifest.split("train").shards)
    it = iter(loader)
    next(it)
    assert 0 < loader.stats["bytes_read"] <= total * 4 / len(COUNTS)  # one window (2 shards) + read-ahead
    for _ in it:
        pass
    assert loader.stats["bytes_read"] <= total


def test_shard_cache_stays_under_its_size_limit(s3_shards, tmp_path):
    url, _ = s3_shards
    cache = tmp_path / "cache"
    shard_bytes = max(s.bytes for s in make(url).manifest.split("train").shards)
    limit = 3 * shard_bytes
    loader = make(url, cache_dir=str(cache), cache_limit_bytes=limit, readahead_shards=1)
    seen = []
    for batch in loader:
        usage = sum(size_or_zero(p) for p in cache.iterdir() if not p.name.endswith(".lock"))
        assert usage <= limit
        seen += batch["key"]
    assert seen == [k for b in make(url) for k in b["key"]]
    assert 0 < len([p for p in cache.iterdir() if p.name.endswith(".tar")]) <= 3


def test_shard_larger_than_the_cache_limit_is_streamed(s3_shards, tmp_path):
    url, _ = s3_shards
    cache = tmp_path / "cache"
    loader = make(url, cache_dir=str(cache), cache_limit_bytes=100)
    assert len(list(loader)) == loader.batches_per_epoch
    assert not [p for p in cache.iterdir() if p.name.endswith(".tar")]


@pytest.mark.faults
@pytest.mark.parametrize("cached", [False, True])
def test_missing_shard_object_on_s3_is_a_clear_error(s3_url, tmp_path, cached):
    write_shards(s3_url, [4, 4, 4])
    Store(s3_url).delete("train/shard-000001.tar")
    loader = make(s3_url, cache_dir=str(tmp_path) if cached else None)
    with pytest.raises(MissingShardError, match=r"s3://.*train/shard-000001\.tar.*does not exist"):
        list(loader)


@pytest.mark.faults
def test_s3_outage_mid_epoch_is_waited_out_and_no_sample_is_lost(s3_server):
    server = s3_server()
    opts = {"key": server.admin.access_key, "secret": server.admin.secret_key,
            "client_kwargs": {"endpoint_url": server.endpoint}}
    url = f"s3://{server.bucket}/outage"
    write_shards(url, [4] * 8, storage_options=opts)
    loader = StreamingLoader(url, batch_size=4, seed=1, window_shards=1, readahead_shards=1, storage_options=opts)
    it = iter(loader)
    keys = list(next(it)["key"])
    server.kill()
    restart = threading.Timer(2.0, server.start)
    restart.start()
    try:
        keys += [k for batch in it for k in batch["key"]]
    finally:
        restart.join()
    assert loader.stats["skipped"] == 0
    assert len(keys) == 32 and max(collections.Counter(keys).values()) == 1

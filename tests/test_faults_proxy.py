"""Fault suite: a flaky S3 front (503 SlowDown, connections cut mid-upload) between us and SeaweedFS.

The proxy (tests/_fault_proxy.py) sits on loopback in front of the session's real SeaweedFS; every
request our code makes goes through it. Writes, reads, a checkpoint commit and a prep run must
all complete with exactly the bytes of an undisturbed path, and the faults must really happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _fault_proxy import FaultProxy
from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from cluster.storage import MiB, RetryPolicy, Store, TransferConfig
from jobs.checkpoint import CheckpointManager, CheckpointPolicy

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = RetryPolicy(outage_window_s=60, first_backoff_s=0.05, max_backoff_s=0.5)
PARTS = TransferConfig(multipart_threshold=5 * MiB, part_size=5 * MiB, concurrency=2)


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint, slowdown=0.25, cut_upload=0.3, seed=7, lifetime_s=300) as p:
        yield p


def via(proxy: FaultProxy) -> dict:
    return {"client_kwargs": {"endpoint_url": proxy.endpoint}}


def test_store_writes_and_reads_through_slowdowns_and_cut_uploads_are_exact(proxy, s3, s3_url, faults_watchdog):
    faults_watchdog.arm(120)
    store = Store(s3_url, via(proxy), retry=QUICK, transfer=PARTS)
    blobs = {f"small-{i}.bin": os.urandom(100 * 1024 + i) for i in range(6)}
    blobs["multipart.bin"] = os.urandom(11 * MiB)
    for name, data in blobs.items():
        store.put_bytes(name, data)
    store.put_json("meta.json", {"n": len(blobs)})
    assert sorted(store.ls()) == sorted([*blobs, "meta.json"])
    for name, data in blobs.items():
        assert store.get_bytes(name) == data, name
    direct = Store(s3_url)  # behind the proxy: the server holds exactly these objects, no upload left open
    assert {n: direct.get_bytes(n) for n in blobs} == blobs
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=s3_url.split("/", 3)[3])
    assert not uploads.get("Uploads")
    assert proxy.injected["slowdown"] >= 3 and proxy.injected["cut_upload"] >= 2, proxy.injected


def test_checkpoint_commits_through_a_flaky_store_and_restores_bit_exact(proxy, s3_url, tmp_path, faults_watchdog):
    faults_watchdog.arm(120)
    url = s3_url + "/stages/pretrain"
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}": torch.randn(256, 256, generator=g) for i in range(4)}  # 1 MiB files: cut when sent
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1, keep_last=1), storage_options=via(proxy),
                             retry=QUICK, local_dir=str(tmp_path / "stage"))
    for step in (1, 2):
        ckpt.save(step, lambda d: [torch.save(v, os.path.join(d, f"{k}.pt")) for k, v in state.items()],
                  {"step": step})
    ckpt.close()
    latest = CheckpointManager(url, CheckpointPolicy(every_steps=1)).latest()  # read directly
    assert latest.step == 2 and set(latest.files) == {f"{k}.pt" for k in state}
    out = {}
    CheckpointManager(url, CheckpointPolicy(every_steps=1)).restore(
        lambda d: out.update({k: torch.load(os.path.join(d, f"{k}.pt"), weights_only=True) for k in state}))
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert not Store(url).child("checkpoints").exists("step-00000001"), "retention kept only the newest commit"
    assert proxy.injected["slowdown"] >= 1 and proxy.injected["cut_upload"] >= 1, proxy.injected


def test_prep_through_a_flaky_store_accounts_every_input_and_matches_a_direct_run(proxy, s3, s3_url, ray_local,
                                                                                   images_dir, faults_watchdog):
    """``vitforge prep`` in a subprocess whose AWS_ENDPOINT_URL is the proxy (its Ray workers get the same)."""
    faults_watchdog.arm(240)
    from _prep_util import output_objects
    from dataprep.manifest import load_manifest
    from dataprep.prep import PrepOptions, run_prep

    proxy.cut_min_bytes = 4 * 1024  # shards of 32 px digits are small
    flaky, direct = s3_url + "-flaky", s3_url + "-direct"
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "VITFORGE_STORAGE_OUTAGE_S": "60"}
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", images_dir, flaky, "--shard-size", "8", "--resize", "32",
           "--no-progress", "--workers", "1", "--address", ray_local.get_runtime_context().gcs_address]
    proc = faults_watchdog.track(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert proxy.injected["slowdown"] >= 3 and proxy.injected["cut_upload"] >= 1, proxy.injected

    run_prep(images_dir, direct, PrepOptions(shard_size=8, resize=32), progress=False)
    m, _ = load_manifest(flaky)
    assert m.totals["inputs"] == 60 == m.totals["written"] + m.totals["rejected"]
    assert output_objects(flaky, m) == output_objects(direct, m)  # shards, manifest, rejects: byte-identical
    assert not Store(flaky).ls("_progress") or all(n.endswith(".json") for n in Store(flaky).ls("_progress"))
    assert json.loads(Store(flaky).get_bytes("manifest.json"))["totals"]["written"] == m.totals["written"]

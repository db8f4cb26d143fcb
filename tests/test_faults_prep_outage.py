"""Fault suite: the object store goes away while ``vitforge prep`` writes shards to it.

A private SeaweedFS server (the session's credentials, its own port and data dir) is the prep's
destination; ``vitforge prep`` runs in a subprocess on the session's Ray cluster (its workers reach
the private server through ``AWS_ENDPOINT_URL``). Once the first shard is recorded, the server is
killed (SIGKILL, restarted on the same port and data dir) or frozen (SIGSTOP, then SIGCONT) for
the outage window. Prep finishes; shards, manifest and rejects are byte-identical to an undisturbed
run's; every shard the manifest lists is whole (its size and sha256); no multipart upload is left
open; inputs = written + rejected.

Slow: the 30 s windows we claim (killed, frozen). Default tier: a 3 s kill.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from _train_util import ROOT, finish, wait_for
from cluster.storage import Store

pytestmark = pytest.mark.faults

OPTIONS = {"shard_size": 2, "resize": 32}  # 60 digits -> 30 small shards: most are written after the outage begins


@pytest.fixture(scope="module")
def undisturbed(s3, ray_local, tmp_path_factory) -> tuple[str, str, object]:
    """The same prep, no outage, on the session's store: (image folder, URL, manifest)."""
    from dataprep.digits import write_digits_imagefolder
    from dataprep.prep import PrepOptions, run_prep

    images = write_digits_imagefolder(str(tmp_path_factory.mktemp("outage-images") / "images"), classes=3,
                                      per_class=20)
    url = f"s3://{s3.bucket}/prep-outage-direct-{os.getpid()}"
    result = run_prep(images, url, PrepOptions(**OPTIONS), progress=False)
    return images, url, result.manifest


def _objects(store: Store, manifest) -> dict[str, bytes]:
    names = [s.name for split in manifest.splits.values() for s in split.shards] + ["manifest.json", "rejects.jsonl"]
    return {n: store.get_bytes(n) for n in names}


def _prep(images: str, dest: str, server, ray_local, watchdog) -> subprocess.Popen:
    env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "VITFORGE_STORAGE_OUTAGE_S": "120"}
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", images, dest, "--shard-size", str(OPTIONS["shard_size"]),
           "--resize", str(OPTIONS["resize"]), "--no-progress", "--workers", "1",
           "--address", ray_local.get_runtime_context().gcs_address]
    return watchdog.track(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True))


def _outage(server, fault: str, seconds: float) -> None:
    """Take the server away for ``seconds``: killed then restarted (same port and data), or frozen then thawed."""
    down, up = (server.kill, server.start) if fault == "killed" else (server.freeze, server.thaw)
    down()
    timer = threading.Timer(seconds, up)
    timer.start()
    timer.join()


@pytest.mark.parametrize("fault, seconds", [
    pytest.param("killed", 30.0, marks=pytest.mark.slow),
    pytest.param("frozen", 30.0, marks=pytest.mark.slow),
    pytest.param("killed", 3.0),
], ids=["killed-30s", "frozen-30s", "killed-3s"])
def test_prep_completes_through_a_store_outage_byte_identical_with_only_whole_shards(
        undisturbed, s3, s3_server, ray_local, fault, seconds, faults_watchdog):
    from dataprep.manifest import load_manifest

    faults_watchdog.arm(240 + 2 * seconds)
    images, direct, manifest = undisturbed
    server = s3_server(admin=s3.admin, reader=s3.reader)  # the session's identities: Ray workers hold those keys
    opts = {"client_kwargs": {"endpoint_url": server.endpoint}}
    dest = f"s3://{server.bucket}/prep"
    out = Store(dest, opts)
    proc = _prep(images, dest, server, ray_local, faults_watchdog)

    def shards_recorded() -> int:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        return len([n for n in out.ls("_progress") if n.startswith(("train-", "val-"))])

    recorded = wait_for(shards_recorded, timeout=180, what="the first shard's progress record")
    assert not out.exists("manifest.json"), "prep finished before the outage could begin"
    _outage(server, fault, seconds)
    rc, log = finish(proc, timeout=300)
    assert rc == 0, log[-3000:]

    got, _ = load_manifest(dest, opts)
    total = sum(len(split.shards) for split in got.splits.values())
    print(f"{recorded} of {total} shards recorded when the store went away")
    assert recorded < total, "every shard was written before the outage"  # the outage hit a running build
    assert got.totals["inputs"] == 60 == got.totals["written"] + got.totals["rejected"]
    assert _objects(out, got) == _objects(Store(direct), manifest)  # shards, manifest, rejects: byte-identical
    for split in got.splits.values():  # the manifest lists only whole shards
        for shard in split.shards:
            data = out.get_bytes(shard.name)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256), shard.name
    uploads = server.client().list_multipart_uploads(Bucket=server.bucket).get("Uploads", [])
    assert uploads == [], uploads

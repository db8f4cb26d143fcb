"""Fault suite: the object store goes away for 30 s (killed and restarted on the same port and data
dir, or frozen with SIGSTOP) while a training stage runs. The stage completes, and its per-step
losses equal an undisturbed reference run on the same data (every sample, in order).

Slow: two 30 s outages plus three tiny one-rank torchrun runs.
"""

from __future__ import annotations

import os
import threading

import pytest

from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from _shards_util import write_shards
from _train_util import TINY_MODEL, assert_same_losses, finish, losses, status, torchrun, wait_for, write_spec
from cluster.storage import Store

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS = 30
OUTAGE_S = 30.0
STAGE = {"name": "pretrain", "kind": "mae", "model": TINY_MODEL, "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
         "max_steps": STEPS, "batch_size": 8, "zero_stage": 2, "loader_workers": 0,
         "checkpoint": {"every_steps": 5, "keep_last": 2}, "optim": {"base_lr": 1.0e-2, "warmup_steps": 4}}


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    from cluster.localstore import LocalS3

    server = LocalS3(str(tmp_path_factory.mktemp("outage-s3"))).start()
    opts = {"key": server.admin.access_key, "secret": server.admin.secret_key,
            "client_kwargs": {"endpoint_url": server.endpoint}}
    data = f"s3://{server.bucket}/data"
    write_shards(data, [8] * 8, storage_options=opts)
    yield server, data
    server.stop()


def _run(tmp_path, server, data: str, name: str, watchdog=None, outage=None) -> tuple[str, str]:
    storage = f"s3://{server.bucket}/runs"
    spec = write_spec(tmp_path, storage, name, {**STAGE, "data": data}, workers=1)
    env = {**os.environ, **server.env(), "VITFORGE_STORAGE_OUTAGE_S": "120"}
    proc = torchrun(spec, nproc=1, env=env)
    if watchdog is not None:
        watchdog.track(proc)
    if outage is not None:
        ckpt = Store(f"{storage}/{name}/stages/pretrain/checkpoints", {
            "key": server.admin.access_key, "secret": server.admin.secret_key,
            "client_kwargs": {"endpoint_url": server.endpoint}})
        wait_for(lambda: ckpt.exists("latest") or proc.poll() is not None, timeout=240, what="a first commit")
        assert proc.poll() is None, "the run finished before the outage could begin"
        outage()
    rc, out = finish(proc, timeout=300)
    assert rc == 0, out[-3000:]
    return storage, out


def _kill_and_restart(server):
    def outage():
        server.kill()
        restart = threading.Timer(OUTAGE_S, server.start)
        restart.start()
        restart.join()
    return outage


def _freeze_and_thaw(server):
    def outage():
        server.freeze()
        thaw = threading.Timer(OUTAGE_S, server.thaw)
        thaw.start()
        thaw.join()
    return outage


def _losses(server, storage: str, name: str) -> tuple[dict, list[float]]:
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        return status(storage, name), losses(storage, name)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def reference(private, tmp_path_factory) -> list[float]:
    server, data = private
    storage, _ = _run(tmp_path_factory.mktemp("ref"), server, data, "ref")
    st, got = _losses(server, storage, "ref")
    assert st["state"] == "done"
    return got


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_training_stage_completes_through_a_30s_store_outage_with_the_reference_losses(private, reference, tmp_path,
                                                                                     fault, faults_watchdog):
    faults_watchdog.arm(400)
    server, data = private
    outage = _kill_and_restart(server) if fault == "killed" else _freeze_and_thaw(server)
    storage, _ = _run(tmp_path, server, data, f"out-{fault}", faults_watchdog, outage=outage)
    st, got = _losses(server, storage, f"out-{fault}")
    assert st["state"] == "done" and st["attempts"] == 1, st  # waited out in place, not restarted
    assert_same_losses(got, reference, STEPS)

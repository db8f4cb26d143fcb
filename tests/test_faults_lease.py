"""Fault suite, one writer per run root (cluster/lease.py) against the real SeaweedFS and local disk.

* a live lease refuses a second writer, ``vitforge run`` and ``vitforge submit`` (exit 2, holder and
  heartbeat age named), before anything is written;
* a stale lease is taken over with generation + 1, and the frozen old writer (SIGSTOP past the bound,
  then SIGCONT) commits, moves ``latest``, deletes and writes STATUS nothing afterwards.

The fence check and the write it guards are two requests (cluster/lease.py): the zombie is frozen
right after it reports a commit, so the freeze falls between commits, where the promise holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from typer.testing import CliRunner

from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from cluster.lease import LEASE, Lease, LeaseHeldError, LeaseLostError, install_fence
from cluster.storage import Store, commit, committed_dirs, read_latest, write_latest

pytestmark = pytest.mark.faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["s3", "file"])
def root(request, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    return str(tmp_path / "run")


def test_live_lease_refuses_a_second_writer_naming_holder_and_age_then_release_hands_over(root):
    first = Lease(Store(root), stale_s=60)
    first.acquire()
    with pytest.raises(LeaseHeldError, match=r"pid \d+ on .*generation 1.*heartbeat was \d+ s ago"):
        Lease(Store(root), stale_s=60).acquire()
    first.release()
    second = Lease(Store(root), stale_s=60)
    assert second.acquire().generation == 2  # a released lease is reused; the generation only grows
    assert not first.renew() and first.lost.is_set()


def test_the_lease_of_a_driver_killed_with_9_on_this_host_is_taken_over_at_once(root):
    code = (f"import sys, os; sys.path.insert(0, {REPO!r}); from cluster.lease import Lease; "
            f"from cluster.storage import Store; Lease(Store({root!r}), stale_s=3600).acquire(); "
            "os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -signal.SIGKILL
    assert Lease(Store(root), stale_s=3600).acquire().generation == 2  # no wait for the hour-long bound


def test_two_writers_racing_for_a_fresh_root_get_one_lease(root):
    a, b = Lease(Store(root), stale_s=60), Lease(Store(root), stale_s=60)
    # b read "absent" too, but a created it first: b's conditional create (If-None-Match / O_EXCL) must fail
    assert a._cas.swap(None, b"{\"owner\": \"a\"}") and not b._cas.swap(None, b"{\"owner\": \"b\"}")


def test_fence_refuses_commit_latest_delete_and_status_after_a_takeover(root):
    store = Store(root)
    old = Lease(store, stale_s=0.5)
    old.acquire()
    uninstall = install_fence(old.fence())
    try:
        commit(store, "ckpt/step-1")
        write_latest(store, "ckpt", "step-1")
        _wait_for(lambda: time.time() - old.read().heartbeat_at > 0.5, "the lease to go stale")
        new = Lease(store, stale_s=0.5)
        assert new.acquire().generation == 2
        for what, act in [("commit", lambda: commit(store, "ckpt/step-2")),
                          ("update latest", lambda: write_latest(store, "ckpt", "step-1")),
                          ("delete", lambda: store.delete("ckpt/step-1", recursive=True))]:
            with pytest.raises(LeaseLostError, match=f"refusing to {what}.*generation 1.*generation 2"):
                act()
        from jobs.stage import update_status
        with pytest.raises(LeaseLostError):
            update_status(store.url_of("stages/x"), state="done")
    finally:
        uninstall()
    assert committed_dirs(store, "ckpt") == ["step-1"] and not store.exists("stages/x/STATUS.json")


ZOMBIE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from cluster.lease import Lease, LeaseLostError
    from cluster.storage import Store, commit, write_latest
    store = Store({root!r})
    lease = Lease(store, stale_s={stale})
    with lease.held():
        try:
            for step in range(1, 100000):
                store.put_bytes(f"ckpt/step-{{step}}/weights", b"w")
                commit(store, f"ckpt/step-{{step}}", {{"generation": lease.generation}})
                write_latest(store, "ckpt", f"step-{{step}}")
                print("committed", step, flush=True)
                time.sleep(2)  # the test freezes it here: between two commits, not inside one (module doc)
        except LeaseLostError as exc:
            print("fenced:", exc, flush=True)
            sys.exit(3)
""")


def test_stale_lease_is_taken_over_and_the_frozen_old_writer_commits_nothing_after_sigcont(root, faults_watchdog):
    faults_watchdog.arm(120)
    stale = 2.0
    proc = faults_watchdog.track(subprocess.Popen(
        [sys.executable, "-c", ZOMBIE.format(repo=REPO, root=root, stale=stale)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": REPO}))
    store = Store(root)
    for line in proc.stdout:  # let it commit a few checkpoints
        if line.startswith("committed 3"):
            break
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: time.time() - Lease(store).read().heartbeat_at > stale, "the frozen writer's lease to go stale")
        new = Lease(store, stale_s=stale)
        assert new.acquire().generation == 2
        before, latest = committed_dirs(store, "ckpt"), read_latest(store, "ckpt")
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the resumed writer did not exit; its output:\n{out}") from None
    assert proc.returncode == 3 and "fenced:" in out and "generation 2" in out, out
    assert committed_dirs(store, "ckpt") == before and read_latest(store, "ckpt") == latest
    record = json.loads(_lease_bytes(store))
    assert record["generation"] == 2 and record["owner"] == new.owner  # the zombie's heartbeat did not win it back


def test_vitforge_run_and_submit_on_a_live_lease_exit_2_naming_the_holder_and_write_nothing(s3, s3_url, tmp_path):
    from pipeline.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "leased", "storage": s3_url, "stages": [
        {"name": "data", "kind": "prep", "source": str(tmp_path), "resize": 8}]}))
    holder = Lease(Store(f"{s3_url}/leased"), stale_s=60)
    holder.acquire()
    for argv in (["run", str(spec)], ["submit", str(spec), "--address", "http://127.0.0.1:9"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert f"pid {os.getpid()}" in result.output and "heartbeat was" in result.output, result.output
    assert Store(f"{s3_url}/leased").ls() == [LEASE]  # no run.yaml, no stage written


def _lease_bytes(store: Store) -> bytes:
    return store.get_bytes(LEASE)


def _wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_training_run_holds_the_lease_hands_its_fence_to_the_gang_and_releases_it(s3, s3_url, ray_local, tmp_path):
    """Through `vitforge run` on a real one-worker gang: done, the lease released (generation 1),
    and the rank-0 STATUS writes passed the fence; a second run takes generation 2 and skips the stage."""
    from _shards_util import write_shards
    from _train_util import TINY_MODEL
    from pipeline.cli import app

    data = f"{s3_url}-data"
    write_shards(data, [8, 8])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "leased", "storage": s3_url, "compute": {"workers": 1, "cpus_per_worker": 1},
                                    "stages": [{"name": "pretrain", "kind": "mae", "data": data, "model": TINY_MODEL,
                                                "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
                                                "max_steps": 2, "batch_size": 4, "loader_workers": 0,
                                                "checkpoint": {"every_steps": 2}}]}))
    for generation in (1, 2):
        result = CliRunner().invoke(app, ["run", str(spec)])
        assert result.exit_code == 0, result.output
        record = json.loads(Store(f"{s3_url}/leased").get_bytes(LEASE))
        assert record["generation"] == generation and record["released"] is True
    status = Store(f"{s3_url}/leased/stages/pretrain").get_json("STATUS.json")
    assert status["state"] == "done" and status["step"] == 2

"""Fault suite: nodes of a (simulated) multi-node Ray cluster go away while a training stage runs.

``ray.cluster_utils.Cluster`` in a subprocess: a head with no CPUs (driver and Ray Train's
controller live there) and worker nodes of 1 CPU each; ``vitforge run``'s ``run_spec`` places a
2-worker ZeRO-2 MAE gang. Right after the first committed checkpoint, the node hosting rank 0
(the committer) is removed (its raylet and workers killed).

* 3 worker nodes: Ray Train restarts the gang on the two that are left; the stage finishes from
  the newest commit with the reference run's per-step losses (every sample, in order), no
  checkpoint without ``COMMITTED``, no open multipart upload.
* 2 worker nodes: one CPU is left for a 2-worker gang. Placement gives up within its bound with an
  error that names the fix; the same run with ``compute.workers: 1`` resumes from the checkpoint
  on the node that is left (another number of workers, tests/test_faults_workers.py) and finishes.
* Cheap (default tier): a gang larger than the local cluster fails within its bound, naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from _shards_util import write_shards
from _train_util import (ROOT, TINY_MODEL, assert_same_losses, finish, losses, stage_store, status, torchrun,
                         write_spec)

pytestmark = pytest.mark.faults

STEPS = 24
STAGE = {"name": "pretrain", "kind": "mae", "model": TINY_MODEL, "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
         "max_steps": STEPS, "batch_size": 8, "zero_stage": 2, "loader_workers": 0,
         "checkpoint": {"every_steps": 2, "keep_last": 2}, "optim": {"base_lr": 1.0e-2, "warmup_steps": 4}}

# Runs in a subprocess: its own multi-node cluster, torn down with it. argv: worker nodes, spec, [rerun spec]
NODES = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from cluster.storage import Store
    from pipeline.run import run_spec
    from pipeline.spec import load_spec

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(int(sys.argv[1]))]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    spec = load_spec(sys.argv[2])
    stage = Store(spec.stage_url("pretrain"), spec.storage_options)
    report = {"cpu_nodes": [n.node_id for n in nodes]}

    def remove_rank0_node_after_first_commit():
        while True:
            try:
                st, latest = stage.get_json("STATUS.json"), stage.get_bytes("checkpoints/latest").decode().strip()
                if st.get("worker_nodes") and latest:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.2)
        victim = next(n for n in nodes if n.node_id == st["worker_nodes"][0])
        report.update(removed=victim.node_id, first_nodes=st["worker_nodes"],
                      latest_at_removal=int(latest.rsplit("-", 1)[1]))
        cluster.remove_node(victim, allow_graceful=False)

    def monitor():
        try:
            remove_rank0_node_after_first_commit()
        except Exception as exc:
            report["monitor_error"] = repr(exc)

    threading.Thread(target=monitor, daemon=True).start()
    try:
        report["states"] = run_spec(spec).states
    except Exception as exc:
        report.update(error_type=type(exc).__name__, error=str(exc))
    if len(sys.argv) > 3:
        report["rerun_states"] = run_spec(load_spec(sys.argv[3])).states
    print("RESULT", json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.fixture(scope="module")
def data(s3) -> str:
    url = f"s3://{s3.bucket}/nodes-data-{os.getpid()}"
    write_shards(url, [8] * 8)
    return url


@pytest.fixture(scope="module")
def reference(data, s3, tmp_path_factory) -> list[float]:
    """The uninterrupted 2-worker run (torchrun): per-step losses."""
    storage = f"s3://{s3.bucket}/nodes-ref-{os.getpid()}"
    rc, out = finish(torchrun(write_spec(tmp_path_factory.mktemp("ref"), storage, "ref", {**STAGE, "data": data}),
                              nproc=2), timeout=600)
    assert rc == 0, out[-3000:]
    return losses(storage, "ref")


def _cluster_run(watchdog, worker_nodes: int, *specs: str, env: dict[str, str] | None = None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    proc = watchdog.track(subprocess.Popen([sys.executable, "-c", NODES, str(worker_nodes), *specs], cwd=ROOT,
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           start_new_session=True))
    rc, out = finish(proc, timeout=900)
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert rc == 0 and line, out[-5000:]
    report = json.loads(line[-1][len("RESULT "):])
    report["output"] = out
    return report


def _no_torn_checkpoints(s3, storage: str, run: str) -> None:
    """Every step dir committed, ``latest`` names one of them, no multipart upload left open."""
    ckpt = stage_store(storage, run).child("checkpoints")
    steps = [n for n in ckpt.ls("") if n.startswith("step-")]
    assert steps and all(ckpt.exists(f"{n}/COMMITTED") for n in steps), steps
    assert ckpt.get_bytes("latest").decode().strip() in steps
    prefix = storage.split("/", 3)[3]
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], uploads


@pytest.mark.slow
def test_node_removed_mid_run_gang_restarts_on_the_remaining_nodes_and_matches_uninterrupted(data, reference, s3,
                                                                                            tmp_path,
                                                                                            faults_watchdog):
    faults_watchdog.arm(1000)
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    spec = write_spec(tmp_path, storage, "node", {**STAGE, "data": data}, workers=2, max_failures=1)
    report = _cluster_run(faults_watchdog, 3, spec)
    assert report.get("states") == {"pretrain": "done"}, report["output"][-5000:]
    assert "removed" in report, report  # the node went while the stage ran
    assert report["removed"] in report["cpu_nodes"] and len(set(report["first_nodes"])) == 2
    st = status(storage, "node")
    assert st["state"] == "done" and st["attempts"] == 2, st  # restarted once, not from scratch
    assert report["removed"] not in st["worker_nodes"] and len(set(st["worker_nodes"])) == 2, st
    # resumed from the newest commit there was when the node went (or a later one): at most one
    # checkpoint interval (2 steps, plus the steps of an upload still in flight) is recomputed
    print(f"node removed when step {report['latest_at_removal']} was the newest commit; "
          f"resumed from step {st['resumed_from']}")
    assert report["latest_at_removal"] <= st["resumed_from"] < STEPS, (report["latest_at_removal"], st)
    assert_same_losses(losses(storage, "node"), reference, STEPS)
    _no_torn_checkpoints(s3, storage, "node")


@pytest.mark.slow
def test_gang_that_no_longer_fits_fails_within_its_bound_naming_the_fix_then_resumes_on_fewer_workers(
        data, reference, s3, tmp_path, faults_watchdog):
    faults_watchdog.arm(1000)
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    (tmp_path / "two").mkdir()  # the same run name: each spec in its own folder
    two = write_spec(tmp_path / "two", storage, "fit", {**STAGE, "data": data}, workers=2, max_failures=1)
    one = write_spec(tmp_path, storage, "fit", {**STAGE, "data": data}, workers=1, max_failures=1)
    report = _cluster_run(faults_watchdog, 2, two, one,
                          env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "VITFORGE_GANG_START_TIMEOUT_S": "30"})
    out = report["output"]
    assert "removed" in report, report
    assert report.get("error_type") == "GangPlacementError", out[-5000:]
    assert "2 worker(s) of CPU 1 each could not be placed within 30s" in report["error"], report["error"]
    assert "compute.workers" in report["error"] and "VITFORGE_GANG_START_TIMEOUT_S" in report["error"]
    # ... and the same run on the one node left resumes from the checkpoint instead of starting over
    assert report["rerun_states"] == {"pretrain": "done"}, out[-5000:]
    assert "resuming 2-worker checkpoint" in out and "on 1 workers" in out, out[-5000:]
    st = status(storage, "fit")
    assert st["state"] == "done" and st["world_size"] == 1 and report["removed"] not in st["worker_nodes"], st
    print(f"node removed when step {report['latest_at_removal']} was the newest commit; "
          f"resumed from step {st['resumed_from']} on 1 worker")
    assert report["latest_at_removal"] <= st["resumed_from"] < STEPS, (report["latest_at_removal"], st)
    got = losses(storage, "fit")
    assert_same_losses(got[:st["resumed_from"]], reference[:st["resumed_from"]], st["resumed_from"])
    deviation = max(abs(got[s] - reference[s]) / reference[s] for s in range(st["resumed_from"], STEPS))
    print(f"losses on 1 worker: max relative deviation from the 2-worker reference {deviation:.4f}")
    assert deviation < 0.1, (got, reference)  # the same global batch on one worker: close, not equal
    _no_torn_checkpoints(s3, storage, "fit")


def test_gang_larger_than_the_cluster_fails_within_its_bound_naming_the_fix(ray_local, monkeypatch, faults_watchdog):
    from cluster.gang import GangPlacementError, GangSpec, run_gang
    from jobs.stage import run_worker

    faults_watchdog.arm(180)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    cpus = int(ray_local.cluster_resources()["CPU"])
    spec = GangSpec(workers=cpus + 1, cpus_per_worker=1, max_failures=0, name="too-big", start_timeout_s=6)
    with pytest.raises(GangPlacementError) as err:
        run_gang(run_worker, {}, spec)  # the function never runs: no placement
    text = str(err.value)
    assert f"{cpus + 1} worker(s) of CPU 1 each could not be placed within 6s" in text, text
    assert f"of {cpus:g}" in text and "compute.workers" in text and "VITFORGE_GANG_START_TIMEOUT_S" in text

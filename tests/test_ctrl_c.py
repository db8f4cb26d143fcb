"""Ctrl-C is a preemption: SIGINT to `vitforge run` checkpoints, records ``preempted``, exits 75 and
prints the exact command that continues; a second Ctrl-C within seconds aborts at once (recorded).

The signal goes to the driver's whole process group, as a terminal sends it. Real embedded Ray,
real DeepSpeed (gloo), a local run root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cluster.gang import GangSpec, run_gang
from cluster.storage import Store
from tests._train_util import ROOT, TINY_MODEL, finish, wait_for, write_digit_shards


def _spec(tmp_path, manifest: str, name: str) -> str:
    spec = {"name": name, "storage": str(tmp_path / "runs"),
            "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "stages": [{"name": "pretrain", "kind": "mae", "data": manifest, "model": TINY_MODEL, "max_steps": 100000,
                        "batch_size": 8, "loader_workers": 0, "checkpoint": {"every_steps": 100000}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _start(spec: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, as a user gets
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", spec, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stage(tmp_path, name: str) -> Store:
    return Store(str(tmp_path / "runs" / name / "stages" / "pretrain"))


def _training(proc: subprocess.Popen, stage: Store) -> bool:
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    return stage.exists("STATUS.json") and stage.get_json("STATUS.json").get("state") == "running"


@pytest.fixture
def manifest(tmp_path) -> str:
    return write_digit_shards(str(tmp_path / "shards"), images=64, per_shard=32)


@pytest.mark.slow  # ~1-2 min: an embedded Ray cluster and a gang start
def test_ctrl_c_to_the_process_group_checkpoints_records_preempted_and_exits_75(tmp_path, manifest):
    spec = _spec(tmp_path, manifest, "ctrlc")
    proc = _start(spec, "--set", "stages.pretrain.seed=3")
    stage = _stage(tmp_path, "ctrlc")
    try:
        wait_for(lambda: _training(proc, stage), timeout=400, what="the gang training")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        rc, out = finish(proc, timeout=300)
    finally:
        _reap(proc)
    assert rc == 75, out[-4000:]
    status = stage.get_json("STATUS.json")
    assert status["state"] == "preempted" and status["step"] >= 1, status
    assert stage.child("checkpoints").exists("latest")  # the stop wrote a checkpoint to resume from
    assert f"vitforge run {spec} --set stages.pretrain.seed=3" in out, out[-2000:]
    assert f"vitforge resume {tmp_path / 'runs' / 'ctrlc'}" in out, out[-2000:]


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_and_is_recorded(tmp_path, manifest):
    spec = _spec(tmp_path, manifest, "abort")
    proc = _start(spec)
    stage = _stage(tmp_path, "abort")
    try:
        wait_for(lambda: _training(proc, stage), timeout=400, what="the gang training")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: stage.exists("PREEMPT"), timeout=60, what="the stop request")
        os.killpg(proc.pid, signal.SIGINT)
        rc, out = finish(proc, timeout=120)
    finally:
        _reap(proc)
    assert rc == 130, out[-4000:]
    assert "aborted" in out and "vitforge resume" in out, out[-2000:]
    status = stage.get_json("STATUS.json")
    assert status["state"] == "preempted" and "second Ctrl-C" in status["aborted"], status
    assert status["history"][-1]["state"] == "aborted"


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_a_gang_leaves_the_drivers_sigint_handler_in_place(ray_local):
    """Ray Train's fit() on the main thread would replace SIGINT's handler with its own (abort, no checkpoint)."""
    def ours(signum, frame):  # pragma: no cover - never called
        pass

    saved = signal.signal(signal.SIGINT, ours)
    try:
        run_gang(time.sleep, 0.1, GangSpec(workers=1, max_failures=0, name="sigint"))  # every worker: sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, saved)

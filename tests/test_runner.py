"""The multi-stage runner on real SeaweedFS S3, real Ray and real DeepSpeed (gloo):

* ``vitforge run`` killed with SIGKILL at three moments (during prep, during a training stage, between
  stages) and run again finishes the run, with no finished stage redone (STATUS attempts and
  timestamps unchanged) and the interrupted training stage resumed from its committed checkpoint;
* a changed spec is refused (exit status 2) naming the stage and the keys; ``--restart-from`` re-runs
  that stage and everything downstream of it, and nothing upstream;
* a stage whose STATUS says done but whose output is gone is run again.

Tiny: 32 px digits, a depth-2 ViT, a few steps, one worker per gang.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from cluster.storage import Store
from jobs.metrics import read_metrics
from pipeline.cli import app
from tests._train_util import ROOT, TINY_MODEL, finish, wait_for

TRAIN = {"batch_size": 8, "loader_workers": 0, "zero_stage": 2}


def write_spec(tmp_path, storage: str, source: str, pretrain_steps: int = 8, name: str = "r") -> str:
    spec = {
        "name": name, "storage": storage, "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [
            {"name": "data", "kind": "prep", "source": source, "format": "png", "shard_size": 8, "val_fraction": 0.2},
            {"name": "pretrain", "kind": "mae", "data": "data", "model": TINY_MODEL, "max_steps": pretrain_steps,
             "checkpoint": {"every_steps": 4, "keep_last": 2}, **TRAIN},
            {"name": "probe", "kind": "finetune", "mode": "linear", "data": "data", "init": "pretrain", "max_steps": 3,
             "checkpoint": {"every_steps": 100}, **TRAIN},
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def status(run_root: str, stage: str) -> dict:
    store = Store(f"{run_root}/stages/{stage}")
    try:
        return store.get_json("STATUS.json")
    except FileNotFoundError:
        return {}


def start_run(spec: str, *args: str) -> subprocess.Popen:
    """The real `vitforge run` in its own session (so its Ray processes can be reaped with it)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", spec, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, check, what: str) -> None:
    """SIGKILL `vitforge run` (the driver only) once ``check()`` holds; then reap what it left behind."""
    try:
        wait_for(lambda: check() or proc.poll() is not None, timeout=1500, what=what)
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.communicate()[0][-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    finally:
        _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    """Ray's own reaper stops the killed driver's cluster; make sure before the next run starts."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_to_end(spec: str, *args: str) -> str:
    proc = start_run(spec, *args)
    try:
        code, out = finish(proc, timeout=1500)
    finally:
        _kill_group(proc.pid)
    assert code == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_run_killed_during_prep_during_training_and_between_stages_finishes_without_redoing_stages(
        tmp_path, s3_url, tmp_path_factory):
    from dataprep.digits import write_digits_imagefolder

    source = write_digits_imagefolder(str(tmp_path_factory.mktemp("digits")), size=32, classes=4, per_class=30)
    spec = write_spec(tmp_path, s3_url, source, pretrain_steps=60)
    root = f"{s3_url}/r"
    shards = Store(f"{root}/stages/data/shards")

    # 1. during prep: once some shards are built, before the manifest
    kill_when(start_run(spec), lambda: shards.ls("_progress") and not shards.exists("manifest.json"), "prep progress")
    assert status(root, "data")["state"] == "running" and not shards.exists("manifest.json")

    # 2. during pretraining: once a checkpoint is committed, before the stage ends
    ckpts = Store(f"{root}/stages/pretrain/checkpoints")
    kill_when(start_run(spec), lambda: ckpts.exists("latest") and status(root, "pretrain").get("state") == "running",
              "a committed pretrain checkpoint")
    prep_done = status(root, "data")
    assert prep_done["state"] == "done" and prep_done["attempts"] == 2, prep_done
    assert status(root, "pretrain")["state"] == "running"

    # 3. between stages: pretrain finished (its history written by the driver), probe not started
    kill_when(start_run(spec), lambda: status(root, "pretrain").get("history") and not status(root, "probe"),
              "pretrain done, probe not started")
    pretrain_done = status(root, "pretrain")
    assert pretrain_done["state"] == "done" and pretrain_done["attempts"] == 2, pretrain_done
    assert pretrain_done["resumed_from"] is not None and pretrain_done["step"] == 60, pretrain_done

    out = run_to_end(spec)
    assert "data: done (finished earlier, skipped)" in out and "pretrain: done (finished earlier, skipped)" in out
    assert "probe: done" in out
    assert status(root, "data") == prep_done            # finished stages untouched: attempts, timestamps
    assert status(root, "pretrain") == pretrain_done
    probe = status(root, "probe")
    assert probe["state"] == "done" and probe["attempts"] == 1 and len(probe["history"]) == 1, probe
    assert Store(f"{root}/stages/probe/export").exists("config.json")

    # running it again is a no-op
    again = run_to_end(spec)
    assert again.count("(finished earlier, skipped)") == 3
    assert status(root, "probe") == probe


@pytest.mark.slow
def test_changed_spec_is_refused_naming_keys_and_restart_from_reruns_only_downstream(
        tmp_path, s3_url, images_dir, ray_local):
    spec = write_spec(tmp_path, s3_url, images_dir, pretrain_steps=4)
    root = f"{s3_url}/r"
    runner = CliRunner()
    first = runner.invoke(app, ["run", spec])
    assert first.exit_code == 0, first.output
    before = {name: status(root, name) for name in ("data", "pretrain", "probe")}

    changed = runner.invoke(app, ["run", spec, "--set", "stages.probe.max_steps=4",
                                  "--set", "stages.probe.optim.base_lr=0.01"])
    assert changed.exit_code == 2, changed.output
    assert "stages.probe.max_steps" in changed.output and "stages.probe.optim.base_lr" in changed.output
    assert "--restart-from" in changed.output
    assert {name: status(root, name) for name in before} == before     # refused before touching anything

    upstream = runner.invoke(app, ["run", spec, "--set", "stages.pretrain.max_steps=5", "--restart-from", "probe"])
    assert upstream.exit_code == 2, upstream.output
    assert "stage 'pretrain' finished with another config" in upstream.output
    assert "stages.pretrain.max_steps" in upstream.output

    rerun = runner.invoke(app, ["run", spec, "--set", "stages.probe.max_steps=4", "--restart-from", "probe"])
    assert rerun.exit_code == 0, rerun.output
    assert status(root, "data") == before["data"] and status(root, "pretrain") == before["pretrain"]
    probe = status(root, "probe")
    assert probe["step"] == 4 and probe["attempts"] == 1 and probe["started_at"] > before["probe"]["finished_at"]
    assert yaml.safe_load(Store(root).get_bytes("run.yaml"))["stages"][2]["max_steps"] == 4

    # a stage that says done but whose output is gone is run again; the others are skipped
    Store(f"{root}/stages/probe/export").delete("config.json")
    redo = runner.invoke(app, ["run", spec, "--set", "stages.probe.max_steps=4"])
    assert redo.exit_code == 0, redo.output
    assert "probe: done\n" in redo.output and redo.output.count("finished earlier") == 2
    assert status(root, "probe")["history"][-1]["state"] == "done"
    assert Store(f"{root}/stages/probe/export").exists("config.json")


def test_restart_from_an_unknown_stage_is_refused(tmp_path, s3_url, images_dir):
    result = CliRunner().invoke(app, ["run", write_spec(tmp_path, s3_url, images_dir), "--restart-from", "nope"])
    assert result.exit_code == 2 and "--restart-from 'nope': no such stage" in result.output, result.output
    assert Store(f"{s3_url}/r").ls("") == []


@pytest.mark.slow
def test_raising_max_steps_of_a_finished_stage_continues_it_on_a_new_cosine_and_reruns_downstream(
        tmp_path, s3_url, images_dir, ray_local):
    from jobs.engine import lr_at

    spec = write_spec(tmp_path, s3_url, images_dir, pretrain_steps=4, name="ext")
    root = f"{s3_url}/ext"
    runner = CliRunner()
    assert (first := runner.invoke(app, ["run", spec])).exit_code == 0, first.output
    before = {name: status(root, name) for name in ("data", "pretrain", "probe")}

    more = runner.invoke(app, ["run", spec, "--set", "stages.pretrain.max_steps=8",
                               "--set", "stages.pretrain.checkpoint.every_steps=2"])
    assert more.exit_code == 0, more.output
    pretrain = status(root, "pretrain")
    assert pretrain["state"] == "done" and pretrain["resumed_from"] == 4 and pretrain["step"] == 8
    [ext] = pretrain["extensions"]
    assert (ext["from"]["max_steps"], ext["to"]["max_steps"], ext["state"], ext["step"]) == (4, 8, "done", 4)
    assert ext["from_digest"] == before["pretrain"]["config_digest"] == ext["from_digest"] != ext["to_digest"]
    assert status(root, "data") == before["data"]                                   # upstream untouched
    assert status(root, "probe")["started_at"] > pretrain["history"][-1]["started_at"]  # downstream reran
    assert status(root, "probe")["attempts"] == 1
    records = read_metrics(Store(f"{root}/stages/pretrain"))
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    peak = 1.5e-4 * TRAIN["batch_size"] / 256
    assert [lr[s] for s in range(1, 5)] == pytest.approx([lr_at(s - 1, 4, 0, peak) for s in range(1, 5)])
    assert [lr[s] for s in range(5, 9)] == pytest.approx([lr_at(s - 1, 8, 0, peak) for s in range(5, 9)])
    assert yaml.safe_load(Store(root).get_bytes("run.yaml"))["stages"][1]["max_steps"] == 8
    again = runner.invoke(app, ["run", spec, "--set", "stages.pretrain.max_steps=8",
                                "--set", "stages.pretrain.checkpoint.every_steps=2"])
    assert again.exit_code == 0 and again.output.count("finished earlier") == 3, again.output


def test_ray_trains_placement_group_cleaner_retry_warning_is_demoted_in_its_detached_actor(ray_local, capfd):
    """Ray Train's cleaner (a detached actor) warns "Failed to query Ray Train Controller actor state"
    whenever the state API is slow; every worker of our job demotes that record to DEBUG
    (cluster.runtime.quiet_ray_workers), while its other warnings still reach the driver."""
    ray = ray_local
    from cluster.runtime import _CLEANER_LOGGER

    @ray.remote(num_cpus=0)
    class Cleaner:
        def log(self) -> None:
            logger = logging.getLogger(_CLEANER_LOGGER)
            logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily "
                           "unavailable. Continuing to monitor.")
            logger.warning("cleaner-warning-that-stays")

    actor = Cleaner.options(lifetime="detached").remote()
    try:
        ray.get(actor.log.remote())
        seen: list[str] = []
        wait_for(lambda: seen.append(capfd.readouterr().err) or "cleaner-warning-that-stays" in "".join(seen),
                 timeout=60, what="the actor's log lines at the driver")
    finally:
        ray.kill(actor)
    assert "Failed to query Ray Train Controller" not in "".join(seen)

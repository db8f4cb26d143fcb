"""Live progress and live status: rank 0's heartbeat (jobs/_live.py), the driver's progress lines
(pipeline/_progress.py), ``vitforge status`` moving between checkpoints and showing ``stale``,
``vitforge status SPEC``, and the exact resume command / ``vitforge resume RUN_ROOT``.

Real stores (a local run root; S3 for the heartbeat as the cross-node channel), no Ray.
"""

from __future__ import annotations

import io
import time

import yaml
from typer.testing import CliRunner

from cluster.storage import Store
from jobs._live import HEARTBEAT, StageLive, stale_after_s
from pipeline._progress import live_progress, progress_line
from pipeline._resume import stored_spec
from pipeline.cli import app, resume_command
from pipeline.status import run_status
from tests._train_util import wait_for


def _record(step: int) -> dict:
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "images_per_s": 64.0,
            "step_time_s": 0.5}


def test_heartbeat_reaches_the_driver_through_s3_as_progress_lines(s3, tmp_path):
    store = Store(f"s3://{s3.bucket}/{tmp_path.name}/stages/pretrain")
    out = io.StringIO()
    with live_progress(store, "pretrain", out=out, rich=False, poll_s=0.1):
        live = StageLive(store, total_steps=10, start_step=0, every_s=0.2)
        live.on_step(_record(1))
        wait_for(lambda: "step 1/10" in out.getvalue(), timeout=30, what="the first progress line")
        live.on_step(_record(2))
        wait_for(lambda: "step 2/10" in out.getvalue(), timeout=30, what="the second progress line")
        live.close("preempted")
        wait_for(lambda: "preempted" in out.getvalue(), timeout=30, what="the final line")
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if "step 2/10" in ln]) == 2, lines  # training, then the final beat
    assert "loss 0.5000" in lines[1] and "lr 1.00e-03" in lines[1] and "64 img/s" in lines[1] and "eta" in lines[1]
    beat = store.get_json(HEARTBEAT)
    assert beat["state"] == "preempted" and beat["step"] == 2 and beat["total_steps"] == 10


def test_progress_line_names_step_total_loss_lr_rate_and_eta():
    line = progress_line("pretrain", {"step": 120, "total_steps": 800, "loss": 0.61234, "lr": 0.0012,
                                      "grad_norm": 0.83, "images_per_s": 312.4, "eta_s": 220, "state": "training"})
    assert line == "[pretrain] step 120/800 (15%)  loss 0.6123  lr 1.20e-03  grad 0.83  312 img/s  eta 3:40"


def _run_root(tmp_path, state: str, beat_age_s: float | None, step: int = 7) -> str:
    root = tmp_path / "runs" / "r"
    stage = Store(str(root / "stages" / "pretrain"))
    now = time.time()
    Store(str(root)).put_bytes("run.yaml", yaml.safe_dump({"name": "r", "stages": [
        {"name": "pretrain", "kind": "mae", "max_steps": 100}]}).encode())
    stage.put_json("STATUS.json", {"state": state, "kind": "mae", "attempts": 1, "started_at": now - 3600,
                                   "updated_at": now - 3000, "total_steps": 100})
    if beat_age_s is not None:
        stage.put_json(HEARTBEAT, {"step": step, "total_steps": 100, "loss": 0.25, "images_per_s": 50.0,
                                   "time": now - beat_age_s, "state": "training"})
    return str(root)


def test_status_moves_with_the_heartbeat_between_checkpoints(tmp_path):
    st = run_status(_run_root(tmp_path, "running", beat_age_s=1, step=42))["stages"][0]
    assert st["state"] == "running" and st["step"] == 42 and st["last_loss"] == 0.25 and st["images_per_s"] == 50.0
    assert st["heartbeat_age_s"] < stale_after_s()


def test_status_shows_a_running_stage_with_an_old_heartbeat_as_stale_with_its_age(tmp_path):
    root = _run_root(tmp_path, "running", beat_age_s=600)
    st = run_status(root)["stages"][0]
    assert st["state"] == "stale" and 590 < st["heartbeat_age_s"] < 700
    result = CliRunner().invoke(app, ["status", root])
    assert result.exit_code == 0 and "stale (10:0" in result.output, result.output


def test_status_of_a_finished_stage_ignores_its_heartbeat(tmp_path):
    assert run_status(_run_root(tmp_path, "done", beat_age_s=10_000))["stages"][0]["state"] == "done"


def test_status_accepts_the_spec_file_with_its_set_overrides(tmp_path):
    _run_root(tmp_path, "running", beat_age_s=1, step=5)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "other", "storage": str(tmp_path / "runs"), "stages": [
        {"name": "data", "kind": "prep", "source": str(tmp_path)}]}))
    result = CliRunner().invoke(app, ["status", str(spec), "--set", "name=r", "--json"])
    assert result.exit_code == 0, result.output
    assert '"run_root": "' + str(tmp_path / "runs" / "r") in result.output and '"step": 5' in result.output


def test_resume_command_repeats_every_set_argument_shell_quoted():
    cmd = resume_command("my spec.yaml", ["name=x", "stages.eval.models=[pretrain, student]"], "/runs/x")
    assert cmd == "vitforge run 'my spec.yaml' --set name=x --set 'stages.eval.models=[pretrain, student]'"


def test_resume_reads_the_stored_spec_of_the_run_root(tmp_path):
    from pipeline._plan import record_spec
    from pipeline.spec import parse_spec

    spec = parse_spec({"name": "x", "storage": str(tmp_path / "runs"), "stages": [
        {"name": "data", "kind": "prep", "source": str(tmp_path), "shard_size": 7}]})
    record_spec(spec)
    back = stored_spec(spec.run_root)
    assert back.run_root == spec.run_root and back.stage("data").shard_size == 7
    missing = CliRunner().invoke(app, ["resume", str(tmp_path / "runs" / "nope")])
    assert missing.exit_code == 1 and "is not a run root" in missing.output


def test_status_shows_a_running_stage_that_never_beat_for_long_as_stale(tmp_path):
    st = run_status(_run_root(tmp_path, "running", beat_age_s=None))["stages"][0]
    assert st["state"] == "stale" and st["heartbeat_age_s"] > 2900

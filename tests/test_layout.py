"""The run-store layout (``jobs/layout.py``): one owner of the names, one writer of STATUS.json."""

from __future__ import annotations

import pytest

from cluster.storage import Store
from jobs.layout import RunLayout, StageStatus, checkpoint_name, checkpoint_step, metrics_chunk_index, metrics_chunk_name
from pipeline.spec import parse_spec


def test_stage_layout_names_every_place_of_the_run_store():
    stage = RunLayout("s3://bucket/runs/r/").stage("pretrain")
    assert stage.url == "s3://bucket/runs/r/stages/pretrain"
    assert [stage.status, stage.preempt, stage.metrics, stage.checkpoints, stage.export, stage.shards,
            stage.eval_json, stage.metrics_legacy] == [
        f"{stage.url}/{n}" for n in ("STATUS.json", "PREEMPT", "metrics", "checkpoints", "export", "shards",
                                     "eval.json", "metrics.jsonl")]
    assert metrics_chunk_name(12) == "metrics/00000012.jsonl" and metrics_chunk_index("00000012.jsonl") == 12
    assert metrics_chunk_index("00000012.jsonl.tmp") is None and metrics_chunk_index("notes.jsonl") is None
    assert RunLayout("s3://bucket/runs/r").run_yaml == "s3://bucket/runs/r/run.yaml"
    assert checkpoint_name(1200) == "step-00001200" and checkpoint_step("step-00001200") == 1200
    with pytest.raises(ValueError, match="not a checkpoint name"):
        checkpoint_step("latest")


def test_the_spec_resolves_stage_inputs_through_the_layout(tmp_path):
    spec = parse_spec({"name": "r", "storage": "s3://b/runs", "stages": [
        {"name": "data", "kind": "prep", "source": "./x"},
        {"name": "pretrain", "kind": "mae", "data": "data"},
        {"name": "probe", "kind": "finetune", "data": "data", "init": "pretrain"}]})
    layout = RunLayout("s3://b/runs/r")
    job = spec.stage_job("probe", launcher="ray")
    assert job["stage_url"] == layout.stage("probe").url
    assert job["data_url"] == layout.stage("data").shards and job["init_url"] == layout.stage("pretrain").export


def test_stage_status_counts_attempts_and_keeps_a_history_of_each(tmp_path):
    status = StageStatus(str(tmp_path / "stage"))
    assert status.read() == {}
    first = status.start(kind="mae", name="pretrain", config_digest="d1")
    assert first["state"] == "running" and first["attempts"] == 1 and first["kind"] == "mae"
    status.fail("RuntimeError: " + "x" * 3000)
    assert status.read()["state"] == "failed" and len(status.read()["error"]) == 2000
    status.record_attempt(first["started_at"], "failed")
    second = status.start(kind="mae", name="pretrain", config_digest="d1")
    assert second["attempts"] == 2 and second["started_at"] >= first["started_at"]
    done = status.finish("done", step=8)
    assert done["state"] == "done" and done["step"] == 8 and done["finished_at"] >= second["started_at"]
    status.record_attempt(second["started_at"], "done")
    history = Store(str(tmp_path / "stage")).get_json("STATUS.json")["history"]
    assert [(h["attempt"], h["state"]) for h in history] == [(1, "failed"), (2, "done")]
    assert status.finish("preempted", step=9).get("finished_at") == done["finished_at"]  # only done stamps it

"""``vitforge status`` and ``vitforge export`` on a run root holding stages in every state (file:// and S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.runstore import ExportNotReadyError, RunNotFoundError, RunView, copy_export
from pipeline.status import failures, key_metrics, progress, run_status, status_table
from pipeline.runstore import StageView
from tests._runroot_util import make_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def by_name(status: dict) -> dict[str, dict]:
    return {s["name"]: s for s in status["stages"]}


@pytest.fixture(params=["file", "s3"])
def run_root(request, tmp_path):
    if request.param == "file":
        root = f"file://{tmp_path}/runs/demo"
    else:
        root = f"{request.getfixturevalue('s3_url')}/runs/demo"
    make_run(root)
    return root


def test_status_reports_every_state_progress_checkpoint_and_metrics(run_root):
    got = run_status(run_root)
    assert got["run"] == "demo"
    stages = by_name(got)
    assert list(stages) == ["data", "pretrain", "probe", "student", "tune", "later", "eval"]
    assert {n: s["state"] for n, s in stages.items()} == {
        "data": "done", "pretrain": "done", "probe": "running", "student": "failed", "tune": "preempted",
        "later": "pending", "eval": "done"}
    pre = stages["pretrain"]
    assert (pre["step"], pre["total_steps"], pre["checkpoint"], pre["attempts"]) == (30, 30, "step-00000030", 2)
    assert pre["duration_s"] == 90 and pre["export_url"].endswith("stages/pretrain/export")
    assert pre["last_loss"] == pytest.approx(2.0 * 0.97 ** 30) and pre["images_per_s"] > 640
    assert pre["eval"] == {"pretrain": {"knn_top1": 0.812, "linear_top1": 0.853}}
    probe = stages["probe"]  # running: progress from metrics.jsonl, total from the spec (none here)
    assert (probe["step"], probe["total_steps"], probe["checkpoint"]) == (12, None, "step-00000010")
    assert probe["val_top1"] == pytest.approx(0.510) and 70 <= probe["duration_s"] < 600
    assert stages["tune"]["step"] == 16 and stages["tune"]["total_steps"] == 40
    assert stages["later"]["total_steps"] == 10 and stages["later"]["step"] is None
    data = stages["data"]
    assert (data["shards"], data["total_shards"], data["samples"], data["rejected"]) == (4, 4, 130, 2)
    assert stages["eval"]["eval"]["probe"] == {"knn_top1": 0.901, "linear_top1": 0.922}
    assert failures(got) == ["student: RuntimeError: CUDA out of memory"]


def test_status_cells_read_naturally():
    view = lambda **kw: StageView(name="s", state="running", url="u", **kw)  # noqa: E731
    assert progress(view(kind="mae", step=37, total_steps=120)) == "37/120"
    assert progress(view(kind="mae")) == "-"
    assert progress(view(kind="prep", shards=3)) == "3 shards"
    assert progress(view(kind="prep", shards=4, total_shards=4)) == "4/4 shards"
    assert key_metrics(view(kind="mae", last_loss=0.41234, images_per_s=1234.5)) == "loss 0.4123, 1,234 img/s"
    assert key_metrics(view(kind="eval", eval={"m": {"knn_top1": 0.5, "linear_top1": 0.75}})) == "m: knn 50.0% / linear 75.0%"


def test_status_cli_prints_a_table_and_json(tmp_path):
    root = str(tmp_path / "runs" / "demo")
    make_run(root)
    table = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", root], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    for cell in ("pretrain", "preempted", "pending", "step-00000030", "4/4 shards", "16/40", "loss"):
        assert cell in table.stdout
    assert "failed: student: RuntimeError: CUDA out of memory" in table.stderr
    as_json = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", root, "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert by_name(json.loads(as_json.stdout))["tune"]["state"] == "preempted"


def test_status_of_a_place_without_a_run_says_so_and_names_the_runs_there(tmp_path):
    make_run(str(tmp_path / "runs" / "demo"))
    with pytest.raises(RunNotFoundError, match=r"no run at .*runs: .*It holds runs: demo"):
        RunView(str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: no run at" in proc.stderr and "Traceback" not in proc.stderr


def test_status_table_renders(run_root):
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(status_table(run_status(run_root)))
    assert "eval knn 81.2% / linear 85.3%" in console.export_text()


def test_export_copies_a_finished_stage_and_refuses_others(run_root, tmp_path):
    view = RunView(run_root)
    dest = tmp_path / "out"
    assert copy_export(view, "pretrain", str(dest)) == ["model.safetensors", "config.json"]
    assert json.loads((dest / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    with pytest.raises(ExportNotReadyError, match=r"stage 'tune' has no export yet \(state: preempted, 16/40 steps\)"):
        copy_export(view, "tune", str(dest))
    with pytest.raises(ExportNotReadyError, match="is a prep stage; it exports no model"):
        copy_export(view, "data", str(dest))
    with pytest.raises(ExportNotReadyError, match="has no stage 'nope'"):
        copy_export(view, "nope", str(dest))


def test_export_push_to_hub_uploads_the_export_through_huggingface_hub_to_the_hf_endpoint(tmp_path, monkeypatch):
    """The real huggingface_hub client against a Hub on localhost (tests/_stub_hub.py), never the network."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests._stub_hub import StubHub

    root = str(tmp_path / "runs" / "demo")
    make_run(root)
    with StubHub() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import
        monkeypatch.setenv("HF_TOKEN", "hf_local_test")
        result = CliRunner().invoke(app, ["export", root, "pretrain", "--push-to-hub", "lab/mae-digits"])
        assert result.exit_code == 0, result.output
        assert "pushed to lab/mae-digits" in result.output
        assert not [call for call in hub.unknown if call.startswith("POST")], hub.unknown
        stored = RunView(root).export_store("pretrain")
        assert hub.repos["lab/mae-digits"] == {n: stored.get_bytes(n) for n in ("model.safetensors", "config.json")}
        assert set(hub.tokens) == {"Bearer hf_local_test"}
        refused = CliRunner().invoke(app, ["export", root, "tune", "--push-to-hub", "lab/x"])
        assert refused.exit_code == 1 and "has no export yet" in refused.output and "lab/x" not in hub.repos
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    offline = CliRunner().invoke(app, ["export", root, "pretrain", "--push-to-hub", "lab/mae-digits"])
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE is set" in offline.output, offline.output

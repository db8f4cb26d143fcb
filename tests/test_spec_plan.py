"""`vitforge validate SPEC` and `vitforge run SPEC --dry-run` print the resolved spec and the plan of a
run (skip / resume / run / extend / clear and rerun) from the store, writing nothing; a relaunch that
changes only settings outside a stage's digest, or raises a training stage's length, is planned with a
note instead of refused.

The run root is written the way the writers write it (STATUS.json, a committed checkpoint, a prep
manifest), on local storage; no Ray, no training.
"""

from __future__ import annotations

import os

import yaml
from typer.testing import CliRunner

from cluster.storage import Store
from jobs.layout import StageStatus
from pipeline.cli import app
from pipeline.spec import dump_spec, load_spec
from tests._runroot_util import checkpoint

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 4}


def write_spec(tmp_path, images_dir) -> str:
    spec = {"name": "planned", "storage": str(tmp_path / "runs"), "stages": [
        {"name": "data", "kind": "prep", "source": images_dir, "format": "png"},
        {"name": "pretrain", "kind": "mae", "data": "data", "model": TINY, "max_steps": 8,
         "checkpoint": {"every_steps": 4}},
        {"name": "probe", "kind": "finetune", "mode": "linear", "data": "data", "init": "pretrain", "max_steps": 3},
    ]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def started_run(spec_path: str) -> str:
    """The run root of a launch that finished ``data`` and was preempted in ``pretrain`` after step 4."""
    spec = load_spec(spec_path)
    run = Store(spec.run_root)
    run.put_bytes("run.yaml", dump_spec(spec).encode())
    StageStatus(spec.stage_url("data")).update(state="done", kind="prep", config_digest=spec.stage("data").digest())
    Store(spec.layout.stage("data").shards).put_json("manifest.json", {"format": "vitforge-shards/1"})
    StageStatus(spec.stage_url("pretrain")).update(state="preempted", kind="mae", step=5,
                                                  config_digest=spec.stage("pretrain").digest())
    checkpoint(Store(spec.stage_url("pretrain")), 4)
    return spec.run_root


def files_under(root: str) -> dict[str, float]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            out[os.path.join(dirpath, n)] = os.path.getmtime(os.path.join(dirpath, n))
    return out


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_validate_and_dry_run_print_the_spec_and_plan_of_a_new_run_and_create_nothing(tmp_path, images_dir):
    path = write_spec(tmp_path, images_dir)
    for args in (["validate", path], ["run", path, "--dry-run"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "base_lr: 0.00015" in result.output  # the resolved spec: defaults filled in
        assert "(a new run)" in result.output and "pretrain  mae       run" in result.output, result.output
    assert not os.path.exists(tmp_path / "runs")


def test_dry_run_of_a_started_run_shows_skip_and_resume_and_writes_nothing(tmp_path, images_dir):
    path = write_spec(tmp_path, images_dir)
    root = started_run(path)
    before = files_under(root)
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "data      prep      skip: done" in result.output, result.output
    assert "pretrain  mae       resume: from checkpoint step 4 (was preempted)" in result.output
    assert "probe     finetune  run" in result.output
    restart = cli("validate", path, "--restart-from", "pretrain")
    assert "pretrain  mae       clear and rerun" in restart.output and "data      prep      skip" in restart.output
    assert files_under(root) == before  # no lease, no run.yaml, no STATUS: not even touched


def test_settings_outside_the_digest_and_a_longer_stage_are_planned_with_notes(tmp_path, images_dir):
    path = write_spec(tmp_path, images_dir)
    root = started_run(path)
    probe = load_spec(path).stage("probe")
    StageStatus(f"{root}/stages/probe").update(state="done", kind="finetune", config_digest=probe.digest())
    before = files_under(root)
    safe = cli("validate", path, "--set", "stages.pretrain.checkpoint.every_steps=2",
               "--set", "stages.pretrain.loader_workers=0", "--set", "stages.pretrain.trackers=[]")
    assert safe.exit_code == 0, safe.output
    assert "outside the stages' digests: stages.pretrain.checkpoint.every_steps, stages.pretrain.loader_workers, " \
           "stages.pretrain.trackers" in safe.output, safe.output
    assert "resume: from checkpoint step 4" in safe.output
    longer = cli("validate", path, "--set", "stages.pretrain.max_steps=12", "--set", "stages.pretrain.checkpoint.keep_last=1")
    assert longer.exit_code == 0, longer.output
    assert "stage pretrain is extended: max_steps 8 -> 12" in longer.output
    assert "pretrain  mae       extend: continue from checkpoint step 4" in longer.output
    assert "probe     finetune  clear and rerun" in longer.output
    for refused, key in ((["stages.pretrain.max_steps=6"], "stages.pretrain.max_steps"),
                         (["stages.pretrain.max_steps=12", "stages.pretrain.optim.base_lr=0.1"], "optim.base_lr"),
                         (["stages.pretrain.max_steps=null", "stages.pretrain.epochs=50"], "stages.pretrain.epochs")):
        result = cli("validate", path, *[a for s in refused for a in ("--set", s)])
        assert result.exit_code == 2 and "holds a different spec" in result.output and key in result.output, \
            (refused, result.output)
    assert files_under(root) == before


def test_a_change_to_a_stage_that_never_started_is_taken_with_a_note(tmp_path, images_dir):
    path = write_spec(tmp_path, images_dir)
    root = started_run(path)  # pretrain preempted at step 5; probe downstream of it has written nothing
    before = files_under(root)
    result = cli("validate", path, "--set", "stages.probe.mode=full", "--set", "stages.probe.epochs=3")
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if "in stages that never started:" in line)
    for key in ("epochs", "mode", "layer_decay", "mixup"):  # the mode's recipe defaults change with it
        assert f"stages.probe.{key}" in note, result.output
    assert "pretrain  mae       resume: from checkpoint step 4" in result.output
    assert "probe     finetune  run" in result.output
    # with a change to a started stage beside it, the spec is still a different one
    mixed = cli("validate", path, "--set", "stages.probe.mode=full", "--set", "stages.pretrain.optim.base_lr=0.1")
    assert mixed.exit_code == 2 and "holds a different spec" in mixed.output, mixed.output
    # once the stage has written something (its STATUS), the same change is refused
    StageStatus(f"{root}/stages/probe").update(state="preempted", kind="finetune")
    started = cli("validate", path, "--set", "stages.probe.mode=full")
    assert started.exit_code == 2 and "stages.probe.mode" in started.output, started.output
    assert files_under(root) == {**before, **{k: v for k, v in files_under(root).items() if "/probe/" in k}}

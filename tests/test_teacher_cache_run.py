"""Cached teacher outputs through the real launchers (slow tier):

* a student stage with ``targets: cached`` and mixup/cutmix, killed on 2 DeepSpeed workers and resumed
  on 1, reads the right cache entries: its losses equal, step for step, those of an online-teacher
  student killed and resumed the same way (k = every class, fp16 targets);
* one spec through ``vitforge run``: prep -> a fine-tuned teacher -> its ``teacher_outputs`` (k = 3,
  with mixing) -> a cached-target student.
"""

from __future__ import annotations


import pytest
import yaml

from _train_util import TINY_MODEL, finish, losses, metrics, status, torchrun, write_digit_shards, write_job, write_spec
from cluster.storage import Store
from jobs.metrics import read_metrics
from test_runner import run_to_end
from test_teacher_cache import MIX, STUDENT, T, make_cache, write_teacher

STEPS = 8  # 96 samples, global batch 16: 6 steps an epoch, so the kill at step 5 is mid-epoch 0


def student_stage(data_url: str, **targets) -> dict:
    return {"name": "student", "kind": "distill", "data": data_url, "model": STUDENT, "crop_scale": [0.35, 1.0],
            "seed": 3, "loss": {"temperature": T}, "max_steps": STEPS, "batch_size": 8, "zero_stage": 2,
            "loader_workers": 0, "checkpoint": {"every_steps": 2, "keep_last": 2},
            "optim": {"base_lr": 5.0e-3, "warmup_steps": 0}, **MIX, **targets}


def kill_then_resume_on_one_worker(tmp_path, storage: str, name: str, stage: dict) -> list[float]:
    """Run ``stage`` on 2 workers until rank 0 is killed at step 5, resume it on 1 worker; its losses."""
    spec = write_spec(tmp_path, storage, name, stage)
    rc, out = finish(torchrun(job=write_job(spec, "student", fault={"kill_rank": 0, "kill_at_step": 5})))
    assert rc != 0 and status(storage, name, "student")["state"] == "running", out[-3000:]
    rc, out = finish(torchrun(job=write_job(spec, "student"), nproc=1))
    assert rc == 0 and "on 1 workers" in out, out[-4000:]
    st = status(storage, name, "student")
    assert st["state"] == "done" and st["resumed_from"] == 4 and st["world_size"] == 1, st
    return losses(storage, name, "student")


@pytest.mark.slow
@pytest.mark.faults
def test_a_cached_student_resumed_on_one_worker_from_two_reads_the_entries_of_its_samples(s3, tmp_path):
    data_url = write_digit_shards(str(tmp_path / "data"), images=96, per_shard=32)
    teacher = write_teacher(str(tmp_path / "teacher.safetensors"))
    cache_url = make_cache(tmp_path, data_url, teacher, **MIX)
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    online = kill_then_resume_on_one_worker(tmp_path, storage, "online", student_stage(data_url, teacher=teacher))
    cached = kill_then_resume_on_one_worker(tmp_path, storage, "cached",
                                            student_stage(data_url, targets="cached", cache=cache_url))
    assert len(online) == len(cached) == STEPS
    for step, (a, b) in enumerate(zip(online, cached)):  # fp16 log-probs: ~1e-4 relative per step
        assert abs(a - b) <= 2e-3 * abs(a) + 1e-5, (step, online, cached)
    assert all(r.get("loss_logits", 0) > 0 for r in metrics(storage, "cached", "student"))


def pipeline_spec(tmp_path, storage: str, source: str) -> str:
    train = {"batch_size": 16, "loader_workers": 0, "zero_stage": 2, "checkpoint": {"every_steps": 100}}
    spec = {"name": "tv", "storage": storage, "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "stages": [
                {"name": "data", "kind": "prep", "source": source, "format": "png", "shard_size": 40,
                 "val_fraction": 0.2},
                {"name": "teacher", "kind": "finetune", "mode": "full", "data": "data", "model": TINY_MODEL,
                 "max_steps": 20, "mixup": 0.0, "cutmix": 0.0, **train},
                {"name": "targets", "kind": "teacher_outputs", "data": "data", "teacher": "teacher", "epochs": 2,
                 "topk": 3, "img_size": 32, "temperature": 4.0, "batch_size": 32, **MIX},
                {"name": "student", "kind": "distill", "data": "data", "targets": "cached", "cache": "targets",
                 "model": STUDENT, "epochs": 2, **MIX, **train},
            ]}
    path = tmp_path / "tv.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_vitforge_run_prep_teacher_cache_and_cached_student_in_one_spec(tmp_path, s3_url, tmp_path_factory):
    from dataprep.digits import write_digits_imagefolder

    source = write_digits_imagefolder(str(tmp_path_factory.mktemp("tv-digits")), size=32, classes=10, per_class=20)
    out = run_to_end(pipeline_spec(tmp_path, s3_url, source))
    for stage in ("data", "teacher", "targets", "student"):
        assert f"{stage}: done" in out, out[-4000:]
    root = Store(f"{s3_url}/tv/stages")
    targets = root.get_json("targets/STATUS.json")
    manifest = root.get_json("targets/cache/manifest.json")
    assert targets["units"] == 2 * len(manifest["shard_samples"]) and manifest["topk"] == 3
    assert manifest["recipe"]["mix"] == {"mixup": 0.8, "cutmix": 1.0, "prob": 0.9, "switch_prob": 0.5}
    assert manifest["teacher"] == "teacher" and manifest["format"] == 2
    records = read_metrics(Store(f"{s3_url}/tv/stages/student"))
    steps = [r for r in records if "loss_logits" in r]
    assert len(steps) == 2 * (manifest["samples"] // 16) and all(r["loss_logits"] > 0 for r in steps)
    assert root.exists("student/export/model.safetensors") and root.get_json("student/STATUS.json")["state"] == "done"

"""Fault suite, refusals: bad specs, wrong or read-only credentials, a missing bucket and a resume on
a number of workers that cannot split the checkpoint's global batch are refused before any side
effect (the run root stays absent).

``vitforge run`` runs in-process (typer's runner) against the session SeaweedFS; no gang starts.
"""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

from _shards_util import write_shards
from _train_util import TINY_MODEL
from cluster.storage import Store
from pipeline.cli import app

pytestmark = pytest.mark.faults

STAGE = {"name": "pretrain", "kind": "mae", "model": TINY_MODEL, "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
         "max_steps": 4, "batch_size": 4, "loader_workers": 0, "checkpoint": {"every_steps": 2}}


@pytest.fixture(scope="module")
def manifest(s3) -> str:
    url = f"s3://{s3.bucket}/refusals-data-{os.getpid()}"
    write_shards(url, [8, 8])
    return url


def _spec(tmp_path, storage: str, manifest: str, workers: int = 2, **stage) -> str:
    doc = {"name": "r", "storage": storage, "compute": {"workers": workers, "cpus_per_worker": 1},
           "stages": [{**STAGE, "data": manifest, **stage}]}
    path = tmp_path / f"spec-{workers}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _nothing_under(s3, storage: str) -> bool:
    prefix = storage.split("/", 3)[3]
    return not s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("KeyCount")


@pytest.mark.parametrize("bad", [{"epoch": 3}, {"model": {**TINY_MODEL, "patch_size": 0}}, {"kind": "moco"},
                                 {"data": "no-such-stage"}], ids=["typo", "bad-value", "unknown-kind", "dangling-data"])
def test_invalid_spec_exits_2_naming_the_field_and_writes_nothing(s3, s3_url, manifest, tmp_path, bad):
    spec = _spec(tmp_path, s3_url, manifest, **bad)
    result = CliRunner().invoke(app, ["run", spec])
    assert result.exit_code == 2, result.output
    assert ("epoch" in result.output or "patch_size" in result.output or "moco" in result.output
            or "no-such-stage" in result.output), result.output
    assert _nothing_under(s3, s3_url)


@pytest.mark.parametrize("who", ["read-only", "wrong-secret"])
def test_unusable_credentials_exit_1_before_any_write_and_never_print_the_secret(s3, s3_url, manifest, tmp_path,
                                                                                 monkeypatch, who):
    spec = _spec(tmp_path, s3_url, manifest)
    ident = s3.reader if who == "read-only" else type(s3.admin)(s3.admin.access_key, "wrong-" + "s" * 26)
    for k, v in s3.env(ident).items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(app, ["run", spec])
    assert result.exit_code == 1, result.output
    assert "permission denied" in result.output and "AWS_ACCESS_KEY_ID" in result.output
    assert ident.secret_key not in result.output and s3.admin.secret_key not in result.output
    assert _nothing_under(s3, s3_url)


def test_missing_bucket_is_refused_and_not_created(s3, manifest, tmp_path):
    spec = _spec(tmp_path, "s3://no-such-bucket-refusals/runs", manifest)
    result = CliRunner().invoke(app, ["run", spec])
    assert result.exit_code in (1, 2) and "no-such-bucket-refusals" in result.output, result.output
    assert "no-such-bucket-refusals" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


def test_resume_on_workers_that_cannot_split_the_global_batch_is_refused_before_a_gang_starts(s3, s3_url, manifest,
                                                                                                tmp_path):
    """A committed checkpoint of a 2-worker run (global batch 2 x 4 = 8); the same spec on 3 workers
    names the numbers of workers that would work and starts nothing.

    (Another number of workers that divides the global batch resumes: tests/test_faults_workers.py.)"""
    from jobs.checkpoint import CheckpointManager, CheckpointPolicy
    from jobs.stage import make_method
    from pipeline.spec import load_spec

    two = load_spec(_spec(tmp_path, s3_url, manifest, workers=2))
    stage = two.stage("pretrain")
    meta = {"step": 2, "arch": make_method(stage, 0).arch(), "config_digest": stage.digest(), "world_size": 2,
            "config": stage.model_dump(mode="json")}
    ckpt = CheckpointManager(two.stage_url("pretrain"), CheckpointPolicy(every_steps=2), session_id="two-ranks")
    ckpt.world_size = 1  # stand-in writer of a committed checkpoint; only its COMMITTED meta matters here
    ckpt.save(2, lambda d: open(os.path.join(d, "engine.bin"), "wb").write(b"x"), meta, sync=True)
    before = sorted(Store(s3_url).fs.find(Store(s3_url).path()))

    result = CliRunner().invoke(app, ["run", _spec(tmp_path, s3_url, manifest, workers=3)])
    assert result.exit_code == 1, result.output
    assert "written by 2 workers" in result.output and "global batch of 8" in result.output, result.output
    assert "3 workers cannot split it" in result.output and "(1, 2, 4, 8)" in result.output, result.output
    after = sorted(Store(s3_url).fs.find(Store(s3_url).path()))
    # the run's lease (cluster/lease.py) is its writer lock, taken before any stage is planned: not an output
    assert [p for p in after if p not in before and not p.endswith(("run.yaml", "STATUS.json", "LEASE.json"))] == []
    assert not Store(two.stage_url("pretrain")).exists("PREEMPT")
    status = Store(two.stage_url("pretrain")).get_json("STATUS.json")  # the driver's attempt history only
    assert status.get("state") in (None, "failed") and not status.get("attempts"), status

"""Fault suite, names confined and corrupt records (issue 14 points 4 and 6), against the real SeaweedFS:

* ``latest`` naming a path outside the checkpoint directory, and a COMMITTED record listing
  ``../..`` files, are ignored with a warning;
* a truncated manifest is named in the error, and a rerun of prep repairs it reusing every shard;
* a STATUS.json that does not parse shows as ``corrupt`` in ``vitforge status`` and the stage is
  not done.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml
from typer.testing import CliRunner

from cluster.storage import CorruptRecordError, Store, read_latest
from jobs.checkpoint import PREFIX, CheckpointManager, CheckpointPolicy

pytestmark = pytest.mark.faults


def _save(url: str, step: int) -> None:
    def write(d: str) -> None:
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(b"w%d" % step)
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=1, keep_last=5))
    ckpt.save(step, write, {"step": step}, sync=True)
    ckpt.close()


def test_latest_naming_a_path_outside_the_checkpoint_dir_is_ignored_with_a_warning(s3_url, caplog):
    _save(s3_url, 1)
    _save(f"{s3_url}/other", 7)  # another committed checkpoint, which the pointer aims at
    store = Store(s3_url).child("checkpoints")
    store.put_bytes("latest", b"../other/checkpoints/step-00000007\n")
    with caplog.at_level(logging.WARNING, logger="cluster.storage"):
        assert read_latest(store, "", PREFIX) == "step-00000001"
    assert "not a plain step-* name" in caplog.text


def test_files_listed_in_committed_outside_the_checkpoint_dir_are_not_restored(tmp_path, caplog):
    root = str(tmp_path / "stage")  # a local store: there '..' really climbs (S3 refuses such keys itself)
    _save(root, 1)
    store = Store(root).child("checkpoints")
    Store(root).put_bytes("outside.bin", b"not yours")  # in the store, outside the checkpoint
    record = store.get_json("step-00000001/COMMITTED")
    record["files"]["../../outside.bin"] = {"size": 9, "rank": 0}
    store.put_json("step-00000001/COMMITTED", record)
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, logger="jobs._ckpt_verify"):
        CheckpointManager(root, CheckpointPolicy(every_steps=1)).restore(
            lambda d: seen.extend(sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(os.path.dirname(d)) for f in fs)))
    assert not any("outside" in s for s in seen) and any(s.endswith("w.bin") for s in seen), seen
    assert "../../outside.bin" in caplog.text


def test_a_truncated_manifest_is_named_and_a_rerun_of_prep_repairs_it_reusing_every_shard(s3_url, images_dir,
                                                                                       ray_local):
    from dataprep.manifest import load_manifest
    from dataprep.prep import PrepOptions, run_prep

    options = PrepOptions(shard_size=16, resize=8)
    first = run_prep(images_dir, s3_url, options, progress=False)
    good = Store(s3_url).get_bytes("manifest.json")
    Store(s3_url).put_bytes("manifest.json", good[: len(good) // 2])
    with pytest.raises(CorruptRecordError, match=f"{s3_url}/manifest.json is corrupt"):
        load_manifest(s3_url)
    again = run_prep(images_dir, s3_url, options, progress=False)
    assert again.shards_built == 0 and again.shards_reused == first.shards_built
    assert json.loads(Store(s3_url).get_bytes("manifest.json")) == json.loads(good)


def test_a_status_that_does_not_parse_is_shown_corrupt_and_the_stage_is_not_done(s3_url, tmp_path):
    from pipeline._plan import is_done, record_spec
    from pipeline.cli import app
    from pipeline.spec import RunSpec

    spec = RunSpec.model_validate({"name": "rec", "storage": s3_url, "stages": [
        {"name": "data", "kind": "prep", "source": str(tmp_path), "resize": 8}]})
    record_spec(spec)
    stage = Store(spec.stage_url("data"))
    stage.put_bytes("STATUS.json", b'{"state": "done", "config_dig')
    stage.put_json("shards/manifest.json", {"format": "x"})
    assert not is_done(spec, "data")
    result = CliRunner().invoke(app, ["status", spec.run_root])
    assert "corrupt" in result.output and "being written?" not in result.output, result.output

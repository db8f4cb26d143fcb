"""Fault suite, housekeeping is never fatal (issue 14 point 8), against the real SeaweedFS behind a
front that refuses every delete (an identity without delete permission):

* checkpoints keep committing while retention deletes fail; each failure is a warning, counted;
* clearing a stop marker that is not there (or cannot be deleted) does not fail anything.
"""

from __future__ import annotations

import logging
import os

import pytest

from _fault_proxy import FaultProxy
from cluster import housekeeping
from cluster.housekeeping import tolerate
from cluster.storage import Store, StorageAuthError
from jobs.checkpoint import CheckpointManager, CheckpointPolicy

pytestmark = pytest.mark.faults


def _writer(step: int):
    def write(d: str) -> None:
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(bytes([step]) * 64)
    return write


def test_retention_deletes_refused_are_warnings_counted_and_every_checkpoint_still_commits(s3, s3_url, caplog):
    caplog.set_level(logging.WARNING, logger="cluster.housekeeping")
    before = housekeeping.failures().get("retention delete", 0)
    with FaultProxy(s3.endpoint, deny_deletes=True, lifetime_s=120) as proxy:
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        with pytest.raises(StorageAuthError):  # the front really refuses deletes
            Store(s3_url, opts).delete("nothing")
        ckpt = CheckpointManager(s3_url, CheckpointPolicy(every_steps=1, keep_last=1), storage_options=opts)
        for step in (1, 2, 3):
            ckpt.save(step, _writer(step), {"step": step}, sync=True)
        ckpt.close()
        assert proxy.injected["denied"] >= 2
    names = [i.step for i in CheckpointManager(s3_url, CheckpointPolicy(every_steps=1)).committed()]
    assert names == [1, 2, 3]  # nothing deleted, nothing lost, the newest committed
    assert CheckpointManager(s3_url, CheckpointPolicy(every_steps=1)).latest().step == 3
    assert housekeeping.failures()["retention delete"] - before == 3  # save 2: step-1; save 3: step-2 and step-1
    assert "retention delete failed" in caplog.text


def test_clearing_a_stop_marker_that_is_absent_or_undeletable_is_fine(s3, s3_url):
    assert tolerate("stop-marker clean-up", Store(s3_url).delete, "PREEMPT")  # absent: fine, not a failure
    with FaultProxy(s3.endpoint, deny_deletes=True, lifetime_s=60) as proxy:
        store = Store(s3_url, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
        store.put_bytes("PREEMPT", b"stop\n")
        assert not tolerate("stop-marker clean-up", store.delete, "PREEMPT")


def test_delete_permission_is_probed_at_run_start_naming_bucket_prefix_and_permission(s3, s3_url, monkeypatch):
    from cluster.housekeeping import ALLOW_NO_DELETE_ENV, DeletePermissionError, check_delete

    assert check_delete(Store(s3_url)) is True
    assert not [n for n in Store(s3_url).ls("") if n.startswith("_probe")]  # the probe is gone
    with FaultProxy(s3.endpoint, deny_deletes=True, lifetime_s=60) as proxy:
        store = Store(s3_url, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
        with pytest.raises(DeletePermissionError) as err:
            check_delete(store)
        msg = str(err.value)
        assert f"bucket {s3.bucket!r}" in msg and "_probe" in msg and "s3:DeleteObject" in msg
        assert ALLOW_NO_DELETE_ENV in msg and s3.admin.secret_key not in msg
        monkeypatch.setenv(ALLOW_NO_DELETE_ENV, "1")
        assert check_delete(store) is False  # opted out: a warning, the run goes on


def test_vitforge_run_without_delete_permission_exits_1_before_any_stage(s3, s3_url, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from _shards_util import write_shards
    from _train_util import TINY_MODEL
    from pipeline.cli import app

    data = f"{s3_url}-data"
    write_shards(data, [8])
    with FaultProxy(s3.endpoint, deny_deletes=True, lifetime_s=120) as proxy:
        doc = {"name": "r", "storage": s3_url, "storage_options": {"client_kwargs": {"endpoint_url": proxy.endpoint}},
               "compute": {"workers": 1, "cpus_per_worker": 1},
               "stages": [{"name": "pretrain", "kind": "mae", "model": TINY_MODEL, "data": data, "max_steps": 2,
                           "batch_size": 4, "loader_workers": 0, "checkpoint": {"every_steps": 1}}]}
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(doc))
        result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 1, result.output
    assert "s3:DeleteObject" in result.output and "_probe" in result.output
    assert not Store(s3_url).exists("stages/pretrain/STATUS.json")  # no stage started

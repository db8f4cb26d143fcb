"""Fault suite, housekeeping is never fatal (issue 14 point 8), against the real SeaweedFS (its
read-only and write-only identities) and behind a front that refuses every delete (an identity
without delete permission, which SeaweedFS's actions cannot express):

* the run-start pre-flight names read, list, write and delete, whether the identity has each and
  which stages need it, in one message;
* checkpoints keep committing while retention deletes fail; each failure is a warning, counted;
* clearing a stop marker that is not there (or cannot be deleted) does not fail anything.
"""

from __future__ import annotations

import logging
import os

import pytest

from _fault_proxy import FaultProxy
from cluster import housekeeping
from cluster.access import (ALLOW_NO_DELETE_ENV, PERMISSIONS, AccessPreflightError, DeletePermissionError,
                            check_access, probe_access)
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


def _private(s3, identity) -> dict:
    return {"key": identity.access_key, "secret": identity.secret_key, "client_kwargs": {"endpoint_url": s3.endpoint}}


NEEDS = {"read": ["pretrain"], "list": ["pretrain"], "write": ["pretrain"], "delete": ["pretrain (retention)"]}


def test_the_pre_flight_names_every_permission_and_whether_the_identity_has_it(s3, s3_url):
    """Real SeaweedFS identities: admin (all), read-only (Read, List), write-only (Write: put and delete)."""
    assert check_access(Store(s3_url), NEEDS) == dict.fromkeys(("read", "list", "write", "delete"), True)
    assert not [n for n in Store(s3_url).ls("") if n.startswith("_probe")]  # the probe is gone
    cases = {"reader": (s3.reader, {"read": True, "list": True, "write": False, "delete": False}),
             "writer": (s3.writer, {"read": False, "list": False, "write": True, "delete": True})}
    for who, (identity, has) in cases.items():
        store = Store(s3_url, _private(s3, identity))
        assert {p: r is None for p, r in probe_access(store).items()} == has, who
        with pytest.raises(AccessPreflightError) as err:
            check_access(store, NEEDS)
        msg = str(err.value)
        assert not isinstance(err.value, DeletePermissionError), who  # more than delete is missing: no waiver
        for perm, action in PERMISSIONS.items():  # one message: every permission, yes or NO, and who needs it
            line = next(ln for ln in msg.splitlines() if ln.strip().startswith(perm))
            assert action in line and ("yes" if has[perm] else "NO") in line, (who, line)
            assert "needed by: pretrain" in line
        missing = [p for p, ok in has.items() if not ok]
        assert f"lacks {', '.join(missing)}" in msg and f"bucket {s3.bucket!r}" in msg and ALLOW_NO_DELETE_ENV not in msg
        assert identity.secret_key not in msg and identity.access_key not in msg
    reader = Store(s3_url, _private(s3, s3.reader))  # what is not needed is reported, not refused
    assert check_access(reader, {"read": ["eval"], "list": ["eval"]})["write"] is False


def test_delete_permission_is_probed_at_run_start_naming_bucket_prefix_and_permission(s3, s3_url, monkeypatch):
    with FaultProxy(s3.endpoint, deny_deletes=True, lifetime_s=60) as proxy:  # SeaweedFS's Write includes delete
        store = Store(s3_url, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
        with pytest.raises(DeletePermissionError) as err:
            check_access(store, NEEDS)
        msg = str(err.value)
        assert f"bucket {s3.bucket!r}" in msg and "_probe" in msg and "s3:DeleteObject" in msg
        assert "lacks delete:" in msg and "needed by: pretrain (retention)" in msg
        assert ALLOW_NO_DELETE_ENV in msg and s3.admin.secret_key not in msg
        monkeypatch.setenv(ALLOW_NO_DELETE_ENV, "1")
        assert check_access(store, NEEDS)["delete"] is False  # opted out: a warning, the run goes on


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


def test_vitforge_run_as_a_read_only_identity_names_write_and_delete_in_one_message_before_the_lease(
        s3, s3_url, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from _shards_util import write_shards
    from _train_util import TINY_MODEL
    from pipeline.cli import app

    data = f"{s3_url}-data"
    write_shards(data, [8])
    doc = {"name": "r", "storage": s3_url, "compute": {"workers": 1, "cpus_per_worker": 1},
           "stages": [{"name": "pretrain", "kind": "mae", "model": TINY_MODEL, "data": data, "max_steps": 2,
                       "batch_size": 4, "loader_workers": 0}]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    for key, value in s3.env(s3.reader).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "lacks write, delete" in out and "s3:PutObject, s3:DeleteObject" in out, result.output
    assert "needed by: pretrain (checkpoint retention, stop markers)" in out
    assert "environment variables AWS_ACCESS_KEY_ID" in out and s3.reader.secret_key not in result.output
    monkeypatch.undo()
    assert Store(s3_url).ls("") == []  # no lease, no run.yaml, no probe left

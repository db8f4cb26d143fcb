"""Fault suite, storage errors classified (issue 14 point 7, issue 15 point 5), against the real SeaweedFS:

* a skewed client clock is reported as clock skew, not as a wrong key;
* an endpoint that never answered fails within the first-contact bound naming the endpoint and its
  source, not after the outage window; ``vitforge prep``'s bucket check says the same, not "no bucket";
* no credentials at all is its own message;
* a permanent error in a Ray Train gang (a read-only identity writing) is not retried by restarting
  the gang: the worker function runs once and the error names the first cause.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest

from cluster.localstore import free_ports
from cluster.storage import (RetryPolicy, Store, StorageAuthError, StorageClockSkewError, StorageUnreachableError)

pytestmark = pytest.mark.faults


def test_a_clock_20_minutes_off_is_reported_as_clock_skew_not_as_a_bad_key(s3, s3_url, monkeypatch):
    import botocore.auth

    store = Store(s3_url)
    store.put_bytes("x", b"1")
    real = botocore.auth.get_current_datetime
    # this machine's clock, as botocore signs with it, 20 minutes behind the server's
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: real(remove_tzinfo) - datetime.timedelta(minutes=20))
    with pytest.raises(StorageClockSkewError, match="clock.*RequestTimeTooSkewed") as info:
        Store(s3_url).get_bytes("x")
    assert "permission denied" not in str(info.value) and "key and secret" not in str(info.value)


@pytest.fixture
def dead_endpoint(s3, monkeypatch) -> str:
    """AWS_ENDPOINT_URL pointing at a loopback port nobody listens on; a short first-contact bound."""
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("VITFORGE_STORAGE_FIRST_CONTACT_S", "2")
    monkeypatch.setenv("VITFORGE_STORAGE_OUTAGE_S", "600")  # must not be what bounds the wait
    return endpoint


def test_an_endpoint_that_never_answered_fails_naming_it_and_its_source_not_the_outage_window(dead_endpoint):
    with pytest.raises(StorageUnreachableError) as info:
        Store("s3://vitforge/x").get_bytes("y")
    msg = str(info.value)
    assert dead_endpoint in msg and "environment variable AWS_ENDPOINT_URL" in msg and "never answered" in msg


def test_prep_to_an_unreachable_endpoint_says_unreachable_not_missing_bucket(dead_endpoint, images_dir):
    from dataprep.prep import run_prep

    with pytest.raises(StorageUnreachableError, match=dead_endpoint):
        run_prep(images_dir, "s3://vitforge/out", progress=False)


def test_no_credentials_at_all_is_its_own_message(s3, s3_url, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageAuthError, match="no S3 credentials found.*AWS_ACCESS_KEY_ID") as info:
        Store(s3_url, retry=RetryPolicy(outage_window_s=5)).put_bytes("x", b"1")
    assert "key and secret" not in str(info.value)


def _write_as_reader(job: dict) -> str:
    """Gang worker: count this attempt (admin identity), then write with the read-only identity."""
    import uuid

    Store(job["url"]).put_bytes(f"attempts/{uuid.uuid4().hex}", b"1")
    os.environ.update(job["reader_env"])
    Store(job["url"]).put_bytes("out", b"x")
    return "done"


def test_permission_denied_in_a_gang_is_not_retried_and_names_the_first_cause(s3, s3_url, ray_local):
    from ray import cloudpickle

    from cluster.gang import GangFatalError, GangSpec, run_gang

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = {"url": s3_url, "reader_env": s3.env(s3.reader)}
    with pytest.raises(GangFatalError, match=r"cannot clear: rank 0: StorageAuthError: permission denied"):
        run_gang(_write_as_reader, job, GangSpec(workers=1, cpus_per_worker=1, max_failures=2, name="fatal"))
    assert len(Store(s3_url).ls("attempts")) == 1  # max_failures=2 allowed two restarts; none ran the function

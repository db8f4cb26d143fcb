"""prep under faults: kill -9 mid-run then resume, bad SRC, unusable DEST (real Ray, real SeaweedFS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from _prep_util import jpeg, output_objects, write_files
from cluster.storage import StorageAuthError, StorageNotFoundError
from dataprep._sources import SourceError
from dataprep.prep import PrepOptions, run_prep
from pipeline.cli import app

pytestmark = pytest.mark.faults

FLAGS = ["--shard-size", "2", "--resize", "32", "--no-progress"]
OPTIONS = PrepOptions(shard_size=2, resize=32)


def _records(s3, prefix: str) -> dict[str, tuple[bytes, object]]:
    """Progress records and shards under ``prefix``: key -> (body of a record / b'' for a shard, LastModified)."""
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if "shard-" in key:
                body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() if key.endswith(".json") else b""
                out[key] = (body, obj["LastModified"])
    return out


def _wait_for_records(s3, prefix: str, proc: subprocess.Popen, n: int, timeout_s: float = 120) -> None:
    client, deadline = s3.client(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/_progress/train-shard-")
        if listed.get("KeyCount", 0) >= n:
            return
        assert proc.poll() is None, f"prep exited early ({proc.returncode}): {proc.stdout.read().decode()}"
        time.sleep(0.05)
    raise AssertionError(f"no {n} finished shards within {timeout_s}s")


def test_prep_killed_mid_run_resumes_without_rewriting_finished_shards_and_matches_uninterrupted_run(
        tmp_path, s3, s3_url, ray_local):
    src = str(tmp_path / "src")
    write_files(src, {f"c{i % 2}/img {i:03d}.jpg": jpeg(64, 48, seed=i) for i in range(100)})
    prefix = s3_url.split("/", 3)[3]
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "prep", src, s3_url, *FLAGS, "--workers", "1", "--address", address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for_records(s3, prefix, proc, n=3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = _records(s3, prefix)
    assert not s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/manifest.json").get("KeyCount")

    result = run_prep(src, s3_url, OPTIONS, progress=False)
    finished_before = [k for k in before if k.endswith(".json")]
    assert result.shards_reused >= len(finished_before) >= 3 and result.shards_built > 0
    after = _records(s3, prefix)
    for record in (k for k in before if k.endswith(".json")):  # neither the records nor their shards were rewritten
        shard = record.replace("/_progress/train-", "/train/").replace(".json", ".tar")
        assert after[record] == before[record] and after[shard] == before[shard], record

    uninterrupted = s3_url + "-whole"
    run_prep(src, uninterrupted, OPTIONS, progress=False)
    assert output_objects(s3_url, result.manifest) == output_objects(uninterrupted, result.manifest)

    rerun = CliRunner().invoke(app, ["prep", src, s3_url, *FLAGS])
    assert rerun.exit_code == 0 and "nothing to do" in rerun.output


def test_prep_bad_src_and_unusable_dest_fail_with_clear_messages(tmp_path, s3, s3_url, images_dir):
    with pytest.raises(SourceError, match="does not exist"):
        run_prep(str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        run_prep(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    with pytest.raises(StorageNotFoundError, match="bucket 'no-such-bucket' of DEST .* does not exist"):
        run_prep(images_dir, "s3://no-such-bucket/out", progress=False)

    saved = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(s3.env(s3.reader))
    try:
        with pytest.raises(StorageAuthError, match="permission denied.*vitforge"):
            run_prep(images_dir, s3_url, progress=False)
        cli = CliRunner().invoke(app, ["prep", images_dir, s3_url, "--no-progress"])
    finally:
        os.environ.update(saved)
    assert cli.exit_code == 1 and "error: permission denied" in cli.output
    assert s3.reader.secret_key not in cli.output

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("someone else's")
    cli = CliRunner().invoke(app, ["prep", images_dir, str(tmp_path / "foreign"), "--shard-size", "0"])
    assert cli.exit_code == 1 and "--shard-size" in cli.output
    cli = CliRunner().invoke(app, ["prep", images_dir, str(tmp_path / "foreign")])
    assert cli.exit_code == 1 and "not empty" in cli.output

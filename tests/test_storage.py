"""cluster.storage against a real SeaweedFS: round trips, whole-object writes, outages, permissions, commits.

Outage tests use a private server (``s3_server``) that they freeze or kill; everything else uses the
session server. Nothing here mocks S3.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time

import botocore.exceptions
import pytest

from cluster.localstore import Identity, free_ports
from cluster.storage import (MiB, OUTAGE_ENV, RetryPolicy, Store, StorageAuthError, StorageError, StorageNotFoundError,
                             TransferConfig, classify, commit, committed_dirs, is_committed, read_latest, write_latest)
from tests._storage_util import FailingSource, start_uploader

SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, part_size=5 * MiB, concurrency=2)


@pytest.fixture(params=["path", "file", "s3"])
def any_url(request, tmp_path) -> str:
    if request.param == "path":
        return str(tmp_path / "store")
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("s3_url")


def uploads_in_progress(server, prefix: str) -> list[dict]:
    return server.client().list_multipart_uploads(Bucket=server.bucket, Prefix=prefix).get("Uploads") or []


def key_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1]


def use_server(monkeypatch, server, identity: Identity | None = None) -> None:
    for k, v in server.env(identity).items():
        monkeypatch.setenv(k, v)


def everything_printed(caplog, capsys, *texts: str) -> str:
    out, err = capsys.readouterr()
    return "\n".join([caplog.text, out, err, *texts])


# ---- round trips ---------------------------------------------------------------------------------


def test_round_trip_bytes_json_files_dirs_listing_delete_and_child_stores(any_url, tmp_path):
    store = Store(any_url)
    store.put_bytes("a/raw.bin", b"\x00\x01payload")
    store.put_json("a/meta.json", {"step": 3, "name": "x"})
    local = tmp_path / "in.txt"
    local.write_text("local file")
    store.put_file(str(local), "b/file.txt")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "leaf.txt").write_text("leaf")

    assert store.put_dir(str(tree), "c") == ["sub/leaf.txt", "top.txt"]
    assert store.get_bytes("a/raw.bin") == b"\x00\x01payload"
    assert store.get_json("a/meta.json") == {"step": 3, "name": "x"}
    store.get_file("b/file.txt", str(tmp_path / "out" / "copy.txt"))
    assert (tmp_path / "out" / "copy.txt").read_text() == "local file"
    assert store.ls() == ["a", "b", "c"] and store.ls("c") == ["sub", "top.txt"] and store.ls("nope") == []
    assert store.exists("c/sub/leaf.txt") and not store.exists("c/sub/missing.txt")
    assert store.size("a/raw.bin") == 9
    with store.open_read("c/top.txt") as f:
        assert f.read() == b"top"
    with pytest.raises(FileNotFoundError):
        store.get_bytes("a/missing.bin")

    child = store.child("c").child("sub")
    assert child.url == store.url_of("c/sub") and child.get_bytes("leaf.txt") == b"leaf"
    child.put_bytes("new.txt", b"via child")
    assert store.get_bytes("c/sub/new.txt") == b"via child"

    store.delete("a/raw.bin")
    store.delete("a/never-existed")
    assert store.ls("a") == ["meta.json"]
    store.delete("c", recursive=True)
    assert store.ls() == ["a", "b"] and not store.exists("c/sub/leaf.txt")


def test_recursive_delete_spares_siblings_sharing_a_name_prefix(any_url):
    store = Store(any_url)
    for rel in ("step-1/x", "step-1/deep/y", "step-10/x", "step-1.json"):
        store.put_bytes(rel, b"1")
    store.delete("step-1", recursive=True)
    assert store.ls() == ["step-1.json", "step-10"]


@pytest.mark.faults
def test_multipart_round_trip_leaves_no_upload_behind(s3, s3_url, tmp_path):
    store = Store(s3_url, transfer=SMALL_PARTS)
    data = os.urandom(13 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    store.put_file(str(tmp_path / "big.bin"), "big.bin")
    store.put_fileobj("streamed.bin", io.BytesIO(data))
    assert store.get_bytes("big.bin") == data and store.get_bytes("streamed.bin") == data
    assert uploads_in_progress(s3, key_of(s3_url)) == []


def test_listing_and_exists_see_writes_and_deletes_made_by_another_client(s3, s3_url):
    store = Store(s3_url)
    store.put_bytes("ckpt/step-1/COMMITTED", b"{}")
    assert store.ls("ckpt") == ["step-1"] and not store.exists("ckpt/step-2/COMMITTED")
    other = s3.client()  # another process's view of the bucket, behind this Store's back
    other.put_object(Bucket=s3.bucket, Key=key_of(s3_url) + "/ckpt/step-2/COMMITTED", Body=b"{}")
    assert store.ls("ckpt") == ["step-1", "step-2"] and store.exists("ckpt/step-2/COMMITTED")
    other.delete_object(Bucket=s3.bucket, Key=key_of(s3_url) + "/ckpt/step-1/COMMITTED")
    # (SeaweedFS may still list the emptied folder step-1; the marker is what counts)
    assert not store.exists("ckpt/step-1/COMMITTED") and committed_dirs(store, "ckpt") == ["step-2"]


# ---- whole-object writes -----------------------------------------------------------------------


@pytest.mark.faults
def test_exception_inside_open_write_leaves_nothing_visible(any_url):
    store = Store(any_url)
    store.put_bytes("keep.txt", b"old")
    with pytest.raises(RuntimeError, match="crashed mid-save"):
        with store.open_write("model.pt") as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("crashed mid-save")
    with pytest.raises(RuntimeError):
        with store.open_write("keep.txt") as f:
            f.write(b"new but unfinished")
            raise RuntimeError("crashed")
    assert not store.exists("model.pt") and store.ls() == ["keep.txt"]
    assert store.get_bytes("keep.txt") == b"old"


@pytest.mark.faults
@pytest.mark.parametrize("fail_after", [1 * MiB, 12 * MiB], ids=["single-put", "multipart"])
def test_source_failing_mid_read_leaves_nothing_visible_and_no_upload_behind(s3, s3_url, fail_after):
    store = Store(s3_url, transfer=SMALL_PARTS)
    with pytest.raises(OSError, match="went away mid-read"):
        store.put_fileobj("shard.tar", FailingSource(fail_after))
    assert not store.exists("shard.tar") and store.ls() == []
    assert uploads_in_progress(s3, key_of(s3_url)) == []


def test_source_failing_mid_read_leaves_nothing_on_local_disk(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(OSError):
        store.put_fileobj("shard.tar", FailingSource(3 * MiB))
    assert store.ls() == [] and not (tmp_path / "store" / "shard.tar").exists()


@pytest.mark.faults
def test_uploader_killed_mid_multipart_upload_leaves_nothing_visible(s3_url):
    child = start_uploader(s3_url, "killed.bin")
    try:
        assert child.stdout.readline().strip() == "PARTS-SENT", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    store = Store(s3_url)
    assert not store.exists("killed.bin") and store.ls() == []


# ---- outages -----------------------------------------------------------------------------------


@pytest.mark.faults
@pytest.mark.slow
def test_writes_complete_after_server_frozen_for_20s(s3_server, monkeypatch, caplog):
    server = s3_server()
    use_server(monkeypatch, server)
    store = Store(f"s3://{server.bucket}/frozen")  # default timeouts: the freeze is simply waited out
    impatient = Store(f"s3://{server.bucket}/frozen", {"config_kwargs": {"read_timeout": 3}}, transfer=SMALL_PARTS)
    store.put_bytes("warm.txt", b"up")
    big = os.urandom(11 * MiB)
    results: dict[str, BaseException | None] = {}

    def small_write() -> None:
        try:
            store.put_bytes("small.txt", b"written through a freeze")
            results["small"] = None
        except BaseException as exc:  # reported by the main thread
            results["small"] = exc

    caplog.set_level(logging.WARNING, logger="cluster.storage")
    server.freeze()
    thaw = threading.Timer(20.0, server.thaw)  # the outage itself lasts 20 s
    thaw.start()
    writer = threading.Thread(target=small_write)
    writer.start()
    try:
        impatient.put_bytes("big.bin", big)  # multipart, begun while frozen; its requests time out
    finally:
        writer.join()
        thaw.join()
    assert results["small"] is None
    assert store.get_bytes("small.txt") == b"written through a freeze" and store.get_bytes("big.bin") == big
    assert "ReadTimeoutError" in caplog.text  # a frozen server is a retried timeout, not a hang
    # uploads begun by create requests that timed out (the server ran them after the thaw) are aborted
    assert uploads_in_progress(server, "frozen/") == []


@pytest.mark.faults
def test_write_completes_when_server_killed_and_restarted_within_window(s3_server, monkeypatch, caplog):
    server = s3_server()
    use_server(monkeypatch, server)
    store = Store(f"s3://{server.bucket}/killed", retry=RetryPolicy(outage_window_s=60, max_backoff_s=1))
    store.put_bytes("before.txt", b"kept on disk")
    blob = os.urandom(3 * MiB)
    store.put_bytes("stream.bin", blob)
    reader = store.open_read("stream.bin", block_size=MiB)
    first = reader.read(MiB // 2)  # a stream open across the outage
    restart_errors: list[BaseException] = []

    def restart() -> None:
        try:
            server.start()  # same ports, same data dir
        except BaseException as exc:
            restart_errors.append(exc)

    caplog.set_level(logging.WARNING, logger="cluster.storage")
    server.kill()
    restarter = threading.Timer(3.0, restart)  # a 3 s outage, then the server comes back
    restarter.start()
    rest: list[bytes] = []
    streamer = threading.Thread(target=lambda: rest.append(reader.read()))  # range requests while down
    streamer.start()
    try:
        store.put_bytes("during.txt", b"written through a restart")
    finally:
        streamer.join()
        restarter.join()
        reader.close()
    assert restart_errors == []
    assert first + rest[0] == blob
    assert store.get_bytes("during.txt") == b"written through a restart"
    assert store.get_bytes("before.txt") == b"kept on disk"
    assert "EndpointConnectionError" in caplog.text


@pytest.mark.faults
def test_outage_longer_than_window_fails_with_clear_error_and_no_secret(monkeypatch, caplog, capsys):
    (dead_port,) = free_ports(1)
    secret = "dead-endpoint-secret-" + "q" * 20
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "some-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv(OUTAGE_ENV, "1.5")
    caplog.set_level(logging.DEBUG)
    store = Store("s3://vitforge/nowhere")
    assert store.retry.outage_window_s == 1.5
    with pytest.raises(StorageError, match=f"could not .* s3://vitforge/nowhere/x .*{OUTAGE_ENV}") as err:
        store.put_bytes("x", b"1")
    assert secret not in everything_printed(caplog, capsys, str(err.value), repr(err.value), repr(store))


def test_outage_window_env_var_is_validated(monkeypatch):
    monkeypatch.setenv(OUTAGE_ENV, "two minutes")
    with pytest.raises(ValueError, match=OUTAGE_ENV):
        RetryPolicy()
    monkeypatch.delenv(OUTAGE_ENV)
    assert RetryPolicy().outage_window_s == 120.0


# ---- permissions and missing buckets ----------------------------------------------------------


@pytest.mark.faults
@pytest.mark.parametrize("who", ["wrong-secret", "unknown-key"])
def test_bad_credentials_fail_fast_naming_bucket_and_source_never_the_secret(s3, s3_url, monkeypatch, caplog,
                                                                             capsys, who):
    bad = "not-the-secret-" + "x" * 24
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.admin.access_key if who == "wrong-secret" else "vf-nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad)
    caplog.set_level(logging.DEBUG)
    store = Store(s3_url)
    errors = []
    for op in (lambda: store.put_bytes("x", b"1"), lambda: store.get_bytes("x"), lambda: store.ls(),
               lambda: store.exists("x")):
        started = time.monotonic()
        with pytest.raises(StorageAuthError) as err:
            op()
        assert time.monotonic() - started < 5, "auth errors must not be retried"
        errors.append(err.value)
    for e in errors:
        assert f"bucket {s3.bucket!r}" in str(e) and "AWS_ACCESS_KEY_ID" in str(e)
    assert not [r for r in caplog.records if r.name == "cluster.storage"], "nothing may be retried"
    printed = everything_printed(caplog, capsys, *map(str, errors), *map(repr, errors), repr(store))
    assert bad not in printed and s3.admin.secret_key not in printed


@pytest.mark.faults
def test_read_only_identity_reads_but_writes_and_deletes_fail_fast(s3, s3_url, monkeypatch, caplog, capsys):
    Store(s3_url).put_bytes("data.txt", b"readable")
    use_server(monkeypatch, s3, s3.reader)
    caplog.set_level(logging.DEBUG)
    store = Store(s3_url)
    assert store.get_bytes("data.txt") == b"readable" and store.ls() == ["data.txt"]
    errors = []
    for op in (lambda: store.put_bytes("new.txt", b"1"), lambda: store.delete("data.txt"),
               lambda: store.delete("", recursive=True)):
        started = time.monotonic()
        with pytest.raises(StorageAuthError, match="AccessDenied") as err:
            op()
        assert time.monotonic() - started < 5, "auth errors must not be retried"
        errors.append(err.value)
    assert all(f"bucket {s3.bucket!r}" in str(e) and "AWS_ACCESS_KEY_ID" in str(e) for e in errors)
    assert store.get_bytes("data.txt") == b"readable" and not store.exists("new.txt")
    printed = everything_printed(caplog, capsys, *map(str, errors))
    assert s3.reader.secret_key not in printed and s3.admin.secret_key not in printed


@pytest.mark.faults
def test_missing_bucket_fails_fast_with_clear_error_and_is_not_created(s3):
    store = Store("s3://no-such-bucket-vf/run")
    for op in (lambda: store.put_bytes("x", b"1"), lambda: store.get_bytes("x"), lambda: store.ls(),
               lambda: read_latest(store, "checkpoints")):
        started = time.monotonic()
        with pytest.raises(StorageNotFoundError, match="bucket 'no-such-bucket-vf' does not exist"):
            op()
        assert time.monotonic() - started < 5
    with pytest.raises(botocore.exceptions.ClientError):
        s3.client().head_bucket(Bucket="no-such-bucket-vf")


@pytest.mark.faults
def test_secret_in_storage_options_stays_out_of_repr_and_errors(s3, s3_url, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    store = Store(s3_url, {"key": s3.reader.access_key, "secret": s3.reader.secret_key})
    with pytest.raises(StorageAuthError, match="storage_options") as err:
        store.put_bytes("x", b"1")
    printed = everything_printed(caplog, capsys, str(err.value), repr(store), repr(store.child("a")))
    assert s3.reader.secret_key not in printed


def test_classify_maps_botocore_errors_to_retry_decisions():
    def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert classify(client_error("SlowDown", 503)) == "transient"
    assert classify(client_error("InternalError", 500)) == "transient"
    assert classify(client_error("502", 502)) == "transient"
    assert classify(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")) == "transient"
    assert classify(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x")) == "transient"
    assert classify(ConnectionResetError()) == "transient"
    assert classify(client_error("AccessDenied", 403)) == "auth"
    assert classify(client_error("403", 403)) == "auth"
    assert classify(botocore.exceptions.NoCredentialsError()) == "auth"
    assert classify(client_error("NoSuchBucket", 404)) == "missing"
    assert classify(FileNotFoundError("k")) == "missing"
    assert classify(ValueError("bug")) == "fatal"
    wrapped = PermissionError("Forbidden")
    wrapped.__cause__ = client_error("403", 403)
    assert classify(wrapped) == "auth"


# ---- commit protocol ---------------------------------------------------------------------------


@pytest.mark.faults
def test_uncommitted_dirs_are_invisible_and_latest_is_checked_against_markers(any_url):
    store = Store(any_url).child("checkpoints")
    assert read_latest(store, "") is None and committed_dirs(store, "") == []
    store.put_bytes("step-00000010/model.pt", b"w10")
    commit(store, "step-00000010", {"step": 10})
    store.put_bytes("step-00000020/model.pt", b"w20")  # written, never committed
    assert committed_dirs(store, "", "step-") == ["step-00000010"]
    assert is_committed(store, "step-00000010") and not is_committed(store, "step-00000020")
    assert read_latest(store, "") == "step-00000010"

    with pytest.raises(StorageError, match="uncommitted 'step-00000020'"):
        write_latest(store, "", "step-00000020")
    store.put_bytes("latest", b"step-00000020\n")  # a pointer to an uncommitted dir is not trusted
    assert read_latest(store, "") == "step-00000010"

    commit(store, "step-00000020")
    write_latest(store, "", "step-00000020")
    assert read_latest(store, "") == "step-00000020"
    store.delete("step-00000020", recursive=True)  # latest now names a deleted checkpoint
    assert read_latest(store, "") == "step-00000010"
    assert store.get_json("step-00000010/COMMITTED")["step"] == 10

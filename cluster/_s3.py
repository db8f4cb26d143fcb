"""S3 internals of :class:`cluster.storage.Store`: client options and hooks, whole-object uploads
(single PutObject or a multipart upload with per-part retries, aborted on failure) and deletes
that report per-key errors.

The upload and delete functions see their store only through an :class:`S3Io` the store builds
and holds (its filesystem, naming, retried call and settings), never through its private members."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, TypeVar

from ._retry import RetryPolicy, _error_code, _redact, with_retries

T = TypeVar("T")

log = logging.getLogger("cluster.storage")

MiB = 2**20


def s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """s3fs options: the caller's, the endpoint from the environment, our timeouts, no caches."""
    opts: dict[str, Any] = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client_kwargs
    # Retries are ours (an outage window of minutes); botocore's are off and its timeouts short,
    # so a frozen server turns into a ReadTimeoutError we retry instead of a hang.
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    config_kwargs.setdefault("connect_timeout", 5)
    config_kwargs.setdefault("read_timeout", 15)
    opts["config_kwargs"] = config_kwargs
    opts.setdefault("skip_instance_cache", True)
    opts.setdefault("use_listings_cache", False)  # other processes write; listings must be fresh
    return opts


# ---- s3fs/aiobotocore client preparation -------------------------------------------------

_READY_CLIENTS: "weakref.WeakSet[Any]" = weakref.WeakSet()
BUCKETS_SEEN: set[tuple[str, str]] = set()  # (endpoint, bucket) known to exist
_READY_LOCK = threading.Lock()


def _drop_expect_header(params: dict[str, Any], **_: Any) -> None:
    """botocore sends ``Expect: 100-continue`` with every PutObject/UploadPart body, and aiohttp
    waits for the ``100 Continue`` with no timeout at all: a frozen server hangs the upload
    forever. Without the header the body is sent at once and the read timeout applies."""
    headers = params.get("headers")
    if headers is not None:
        headers.pop("Expect", None)


def prepare_client(fs: Any) -> Any:
    """The fs's botocore client with our hooks installed (idempotent; survives re-connects)."""
    fs.retries = 1  # s3fs retries connection errors 5x on its own; our loop owns retries
    client = fs.s3  # connects on first use (sync)
    if client not in _READY_CLIENTS:
        with _READY_LOCK:
            if client not in _READY_CLIENTS:
                # on the same event as botocore's add_expect_header, after it (a more specific
                # event name such as before-call.s3.PutObject would run *before* it)
                client.meta.events.register_last("before-call.s3", _drop_expect_header)
                _READY_CLIENTS.add(client)
    return client


def explain_bare_403(fs: Any, bucket: str, exc: BaseException) -> None:
    """A 403 without an error code (HEAD replies carry no body) cannot tell a refused identity from a
    skewed clock: ask with a GET of a key that does not exist, whose reply has a code, and raise
    ``RequestTimeTooSkewed`` from it when that is the reason (else return and let ``exc`` stand)."""
    code = (getattr(exc.__cause__, "response", None) or {}).get("Error", {}).get("Code")
    if code not in (None, "403"):
        return
    try:
        fs.call_s3("get_object", Bucket=bucket, Key=".vitforge-probe/clock")
    except Exception as probe:
        if _error_code(probe.__cause__ or probe)[0] == "RequestTimeTooSkewed":
            raise probe  # keeps its own cause, the coded ClientError


def endpoint_source(storage_options: dict[str, Any] | None = None) -> str:
    """Where the S3 endpoint comes from, in words (for error messages)."""
    opts = storage_options or {}
    if (opts.get("client_kwargs") or {}).get("endpoint_url") and not (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        return "storage_options client_kwargs.endpoint_url"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"environment variable {var}"
    profile = opts.get("profile") or os.environ.get("AWS_PROFILE")
    return f"AWS profile {profile!r} (endpoint_url), else AWS's default" if profile else "AWS's default endpoint"


def endpoint_of(fs: Any) -> str:
    """The S3 endpoint an s3fs filesystem talks to ("aws" when it uses AWS's own)."""
    return str((getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or "aws")


@dataclass(frozen=True)
class S3Io:
    """What the S3 upload and delete functions need of their :class:`~cluster.storage.Store`, handed over
    by it: one per store (a child store builds its own, for its own root)."""

    raw_fs: Any                                        # the store's s3fs filesystem (prepared by .fs)
    path: Callable[[str], str]                         # rel -> "bucket/key"
    url_of: Callable[[str], str]                       # rel -> "s3://bucket/key" (for messages)
    call: Callable[[str, str, Callable[[], Any]], Any]  # call(what, rel, fn): fn retried for the outage window
    transfer: Any                                      # the store's cluster.storage.TransferConfig
    retry: RetryPolicy

    @property
    def fs(self) -> Any:
        """The filesystem, prepared on first use (:func:`prepare_client`)."""
        prepare_client(self.raw_fs)
        return self.raw_fs


def _bucket_key(io: S3Io, rel: str) -> tuple[str, str]:
    bucket, _, key = io.path(rel).partition("/")
    if not bucket or not key:
        raise ValueError(f"{io.url_of(rel)} names no object (an s3:// URL needs a bucket and a key)")
    return bucket, key


def put_object(io: S3Io, rel: str, src: BinaryIO, size: int | None) -> None:
    """Upload ``src`` whole: one PutObject when small, else a multipart upload (aborted on failure)."""
    head = _read_full(src, io.transfer.multipart_threshold + 1)
    if len(head) <= io.transfer.multipart_threshold:
        put_small(io, rel, head)
    else:
        _put_multipart(io, rel, head, src, size)


def put_small(io: S3Io, rel: str, data: bytes) -> None:
    """One retried PutObject."""
    bucket, key = _bucket_key(io, rel)
    io.call("write", rel, lambda: io.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
    io.fs.invalidate_cache(io.path(rel))


def _put_multipart(io: S3Io, rel: str, head: bytes, src: BinaryIO, size: int | None) -> None:
    bucket, key = _bucket_key(io, rel)
    part_size = max(io.transfer.part_size, 5 * MiB, -(-(size or 0) // 9000))  # S3: <= 10000 parts
    creates: list[float] = []
    completes: list[float] = []

    def _create() -> str:
        creates.append(time.time())
        return io.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]

    upload_id = io.call("start upload of", rel, _create)
    pool = ThreadPoolExecutor(max(1, io.transfer.concurrency), thread_name_prefix="vitforge-upload")
    try:
        inflight: list[Future] = []
        etags: list[Future] = []
        for number, body in enumerate(_iter_parts(head, src, part_size), start=1):
            if len(inflight) >= max(1, io.transfer.concurrency):
                inflight.pop(0).result()  # bounded memory; raises the first failed part
            fut = pool.submit(_upload_part, io, rel, bucket, key, upload_id, number, body)
            inflight.append(fut)
            etags.append(fut)
        parts = [{"PartNumber": i, "ETag": f.result()} for i, f in enumerate(etags, start=1)]
        io.call("finish upload of", rel, lambda: _complete(io, bucket, key, upload_id, parts, completes))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # parts still in flight end on their own
        _abort_multipart(io, rel, bucket, key, upload_id)
        raise
    finally:
        if len(creates) > 1:
            _abort_orphans(io, rel, bucket, key, creates[0], upload_id)
    pool.shutdown(wait=True)
    io.fs.invalidate_cache(io.path(rel))


def _complete(io: S3Io, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]],
              attempts: list[float]) -> None:
    """CompleteMultipartUpload; a retry after a timed-out attempt that the server did carry
    out gets NoSuchUpload, which counts as success when the object's ETag is this upload's."""
    attempts.append(time.time())
    try:
        io.fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
    except Exception as exc:
        if len(attempts) > 1 and _error_code(exc.__cause__ or exc)[0] == "NoSuchUpload":
            head = io.fs.call_s3("head_object", Bucket=bucket, Key=key)
            if head.get("ETag", "").strip('"') == _multipart_etag(parts):
                return
        raise


def _upload_part(io: S3Io, rel: str, bucket: str, key: str, upload_id: str, number: int, body: bytes) -> str:
    out = io.call(f"upload part {number} of", rel, lambda: io.fs.call_s3(
        "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
    return out["ETag"]


def _abort_multipart(io: S3Io, rel: str, bucket: str, key: str, upload_id: str) -> None:
    """Abort a failed upload so its parts do not linger (they are invisible either way)."""
    policy = RetryPolicy(outage_window_s=min(30.0, io.retry.outage_window_s),
                         first_backoff_s=io.retry.first_backoff_s, max_backoff_s=io.retry.max_backoff_s)
    try:
        with_retries(lambda: io.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
                     what=f"abort the failed upload of {io.url_of(rel)}", policy=policy, bucket=bucket)
    except Exception as exc:  # the upload's own error is the one to raise
        log.warning("could not abort the failed multipart upload %s of %s (%s). It is invisible but keeps "
                    "its parts until aborted; an AbortIncompleteMultipartUpload lifecycle rule on the bucket "
                    "cleans such uploads.", upload_id, io.url_of(rel), _redact(str(exc)))


def _abort_orphans(io: S3Io, rel: str, bucket: str, key: str, since: float, keep: str) -> None:
    """Abort uploads of ``key`` begun by our own timed-out CreateMultipartUpload attempts.

    A create that timed out may still have been carried out by the server; its upload id
    never reached us. One writer owns a key (DESIGN.md), so other uploads of this key that
    began after our first attempt (minus clock slack) are ours. Best effort.
    """
    try:
        reply = io.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for up in reply.get("Uploads") or []:
            started = up.get("Initiated")
            if up.get("Key") != key or up.get("UploadId") == keep:
                continue
            if started is not None and started.timestamp() < since - 300:
                continue
            io.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
            log.info("aborted orphaned multipart upload %s of %s", up["UploadId"], io.url_of(rel))
    except Exception as exc:
        log.warning("could not clean up orphaned multipart uploads of %s (%s)", io.url_of(rel),
                    _redact(str(exc)))


def delete_objects(io: S3Io, rel: str, recursive: bool) -> None:
    """DeleteObjects over ``rel`` (and what is under it); per-key errors are raised, not ignored."""
    bucket, _ = _bucket_key(io, rel)
    path = io.path(rel)
    files, dirs = [path], []
    if recursive:
        with contextlib.suppress(FileNotFoundError):
            found = io.fs.find(path, withdirs=True, detail=True)
            files = sorted({p for p, i in found.items() if i.get("type") != "directory"} | {path})
            # Some servers (SeaweedFS) keep emptied folders, which still list as prefixes;
            # their "dir/" keys go too, deepest first, after the files (no-ops on AWS S3).
            dirs = sorted({p for p, i in found.items() if i.get("type") == "directory"} | {path},
                          key=lambda p: -p.count("/"))
    for batch in (files, [d + "/" for d in dirs]):
        keys = [p.partition("/")[2] for p in batch]
        for i in range(0, len(keys), 1000):
            reply = io.fs.call_s3("delete_objects", Bucket=bucket,
                                    Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            errors = [e for e in reply.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
            if errors:
                raise _ObjectError(errors[0])
    io.fs.invalidate_cache(path)


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``src``; fewer only at end of stream."""
    chunks, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _iter_parts(head: bytes, src: BinaryIO, part_size: int) -> Iterator[bytes]:
    """``head`` and then the rest of ``src``, in parts of ``part_size`` bytes (the last may be short)."""
    buf = bytearray(head)
    while True:
        if len(buf) < part_size:
            buf += _read_full(src, part_size - len(buf))
        if len(buf) >= part_size:
            yield bytes(buf[:part_size])
            del buf[:part_size]
        else:
            if buf:
                yield bytes(buf)
            return


def _multipart_etag(parts: list[dict[str, Any]]) -> str:
    """S3's ETag of a completed multipart object: md5 of the parts' binary md5s, then -<count>."""
    import hashlib

    digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(parts)}"


class _ObjectError(Exception):
    """A per-key error from a DeleteObjects reply, shaped like botocore's ClientError for :func:`classify`."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('Code')}: {error.get('Message', '')} (key {error.get('Key')!r})")
        self.response = {"Error": {"Code": error.get("Code"), "Message": error.get("Message", "")}}

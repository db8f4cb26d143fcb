"""Object storage: one code path for local paths, ``file://`` and ``s3://`` (anything fsspec speaks).

Contracts
---------
* Whole-object writes only. :meth:`Store.put_bytes`, :meth:`Store.put_json`,
  :meth:`Store.put_file`, :meth:`Store.put_fileobj` and :meth:`Store.open_write` make an object
  visible only when all of it was uploaded; a failed or interrupted write leaves nothing visible.
  On S3 small objects are one ``PutObject``; big ones a multipart upload whose parts are retried
  one by one and which is aborted when the upload fails (S3 shows nothing until it completes).
  On local disks a temp file is renamed into place. (s3fs's ``with fs.open(url, "wb")`` is *not*
  used: it commits a partial object when the block raises.)
* Credentials never come from a spec and are never printed: S3 endpoints and keys come from
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` and the
  standard AWS chain. Error messages name the bucket and *where* the credentials came from,
  never the secret itself; ``repr(Store)`` shows only the URL.
* Transient faults (connection refused/reset, timeouts, 5xx, SlowDown) are retried with
  exponential backoff for up to ``RetryPolicy.outage_window_s`` (default 120 s, or
  ``$VITFORGE_STORAGE_OUTAGE_S``). Botocore's own timeouts are short (connect 5 s, read 15 s) so a
  frozen server becomes a retried timeout, not a hang. Permission errors (401/403) and missing
  buckets are not retried: they raise :class:`StorageAuthError` / :class:`StorageNotFoundError`
  at once.
* Listings are never cached (``use_listings_cache=False``): ``ls``/``exists`` see what other
  processes wrote a moment ago, which the checkpoint commit protocol relies on.
* Commit protocol for checkpoint-like directories (see DESIGN.md): a directory *exists* only
  when its ``COMMITTED`` marker exists; ``latest`` is written after the marker and is advisory,
  so :func:`read_latest` checks it against the markers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import fsspec

log = logging.getLogger(__name__)

T = TypeVar("T")

COMMITTED = "COMMITTED"
LATEST = "latest"
OUTAGE_ENV = "VITFORGE_STORAGE_OUTAGE_S"

MiB = 2**20


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must act on. The message is secret-free."""


class StorageAuthError(StorageError):
    """Credentials were refused or lack permission (HTTP 401/403). Never retried."""


class StorageNotFoundError(StorageError):
    """A bucket does not exist. (A missing *object* raises the builtin ``FileNotFoundError``.)"""


def _default_outage_s() -> float:
    raw = os.environ.get(OUTAGE_ENV)
    if raw is None or raw.strip() == "":
        return 120.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{OUTAGE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{OUTAGE_ENV}={raw!r} must be >= 0 seconds")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient faults are retried before a :class:`StorageError` is raised.

    ``outage_window_s`` defaults to ``$VITFORGE_STORAGE_OUTAGE_S`` or 120 s.
    """

    outage_window_s: float = field(default_factory=_default_outage_s)
    first_backoff_s: float = 0.25
    max_backoff_s: float = 5.0


@dataclass(frozen=True)
class TransferConfig:
    """Multipart settings for S3 uploads. Objects above ``multipart_threshold`` go in parts."""

    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB  # S3's minimum is 5 MiB (except the last part)
    concurrency: int = 4


def _split_url(url: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); a plain path -> ("file", abspath)."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        if protocol == "file":
            return "file", os.path.abspath(rest or "/")
        return protocol, rest.strip("/")
    return "file", os.path.abspath(url)


def _s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
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


def credential_source(storage_options: dict[str, Any] | None = None) -> str:
    """Where S3 credentials come from, in words safe to print (never the secret)."""
    opts = storage_options or {}
    if opts.get("key") or opts.get("secret"):
        return "storage_options 'key'/'secret'"
    if opts.get("profile"):
        return f"AWS profile {opts['profile']!r} (storage_options)"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if os.environ.get("AWS_PROFILE"):
        return f"AWS profile {os.environ['AWS_PROFILE']!r} (AWS_PROFILE)"
    return "the default AWS credential chain (~/.aws/credentials, ~/.aws/config, instance metadata)"


# ---- s3fs/aiobotocore client preparation -------------------------------------------------

_READY_CLIENTS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_BUCKETS_SEEN: set[tuple[str, str]] = set()  # (endpoint, bucket) known to exist
_READY_LOCK = threading.Lock()


def _drop_expect_header(params: dict[str, Any], **_: Any) -> None:
    """botocore sends ``Expect: 100-continue`` with every PutObject/UploadPart body, and aiohttp
    waits for the ``100 Continue`` with no timeout at all: a frozen server hangs the upload
    forever. Without the header the body is sent at once and the read timeout applies."""
    headers = params.get("headers")
    if headers is not None:
        headers.pop("Expect", None)


def _prepare_s3(fs: Any) -> Any:
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


def _endpoint_of(fs: Any) -> str:
    return str((getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or "aws")


class Store:
    """A root URL on one fsspec filesystem. Paths given to methods are relative to the root.

    ``Store("s3://bucket/runs/x").put_json("run.yaml", ...)`` writes ``s3://bucket/runs/x/run.yaml``.
    Every method retries transient faults for ``retry.outage_window_s``; see the module docstring.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        self.protocol, self._root = _split_url(url)
        self.retry = retry or RetryPolicy()
        self.transfer = transfer or TransferConfig()
        opts = _s3_options(storage_options) if self.protocol == "s3" else dict(storage_options or {})
        self._storage_options = opts
        _SECRETS.update(str(opts[k]) for k in ("secret", "token") if opts.get(k))
        self._fs = fsspec.filesystem(self.protocol, **opts)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (for calls Store lacks: wrap them in :func:`with_retries`).

        On S3 it is prepared on first use: s3fs's own retries off (ours run for the outage
        window), and the ``Expect: 100-continue`` header dropped (see ``_drop_expect_header``).
        """
        if self.protocol == "s3":
            _prepare_s3(self._fs)
        return self._fs

    # ---- naming -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.protocol}://{self._root}" if self.protocol != "file" else self._root

    @property
    def bucket(self) -> str | None:
        """The root's bucket (``None`` for non-S3 stores and for a root of ``s3://``)."""
        return (self._root.split("/", 1)[0] or None) if self.protocol == "s3" else None

    def path(self, rel: str = "") -> str:
        """Filesystem path (no protocol) of ``rel`` under the root."""
        rel = rel.strip("/")
        return posixpath.join(self._root, rel) if rel else self._root

    def url_of(self, rel: str = "") -> str:
        p = self.path(rel)
        return f"{self.protocol}://{p}" if self.protocol != "file" else p

    def child(self, rel: str) -> "Store":
        """A Store rooted at ``rel`` under this one, sharing the filesystem and policies."""
        sub = Store.__new__(Store)
        sub.__dict__.update(self.__dict__)
        sub._root = self.path(rel)
        return sub

    def __repr__(self) -> str:  # never includes storage options (they may hold secrets)
        return f"Store({self.url!r})"

    # ---- retry core ---------------------------------------------------------------------
    def _bucket_of(self, rel: str) -> str | None:
        return (self.path(rel).split("/", 1)[0] or None) if self.protocol == "s3" else None

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        bucket = self._bucket_of(rel)

        def attempt() -> T:
            if self.protocol == "s3" and bucket:
                self._check_bucket(bucket)  # also prepares the client (self.fs)
            return fn()

        return with_retries(attempt, what=f"{what} {self.url_of(rel)}", policy=self.retry, bucket=bucket,
                            source=credential_source(self._storage_options) if bucket else None)

    def _check_bucket(self, bucket: str) -> None:
        """Raise :class:`StorageNotFoundError` for a bucket that does not exist (once per process).

        Needed because some S3 servers (SeaweedFS) create a missing bucket on the first write and
        s3fs reports a missing bucket on reads as a plain missing key. A 403 on HeadBucket is not
        decisive (keys may read objects without s3:ListBucket); the real call then decides.
        """
        key = (_endpoint_of(self.fs), bucket)
        if key in _BUCKETS_SEEN:
            return
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except PermissionError:
            return
        except FileNotFoundError:
            raise StorageNotFoundError(
                f"bucket {bucket!r} does not exist at {_endpoint_of(self.fs)}; create it or fix the storage URL"
            ) from None
        _BUCKETS_SEEN.add(key)

    # ---- reads --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.exists(self.path(rel)))

    def get_bytes(self, rel: str) -> bytes:
        """The whole object. A missing object raises ``FileNotFoundError``."""
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def get_json(self, rel: str) -> Any:
        return json.loads(self.get_bytes(rel))

    def get_file(self, rel: str, local_path: str) -> None:
        """Download ``rel`` to ``local_path`` (written to a temp name, then renamed)."""
        os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
        tmp = f"{local_path}.part-{os.getpid()}-{threading.get_ident()}"

        def _get() -> None:
            self.fs.get_file(self.path(rel), tmp)
            os.replace(tmp, local_path)

        try:
            self._call("download", rel, _get)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def open_read(self, rel: str, block_size: int | None = None) -> "RetryingReader":
        """A seekable binary file object for streaming reads. Caller closes it.

        Opening and every ``read`` are retried like any other call: after a transient fault the
        object is reopened at the same position, so a stream survives a server restart.
        """
        kw = {"block_size": block_size} if block_size else {}
        return RetryingReader(self, rel, lambda: self.fs.open(self.path(rel), "rb", **kw))

    def size(self, rel: str) -> int:
        return int(self._call("stat", rel, lambda: self.fs.size(self.path(rel))))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``, fresh from the server; empty if it does not exist."""

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(self.path(rel), detail=False, **({"refresh": True} if self.protocol == "s3" else {}))
            except FileNotFoundError:
                return []
            base = self.path(rel).rstrip("/")
            return sorted(posixpath.relpath(e.rstrip("/"), base) for e in entries if e.rstrip("/") != base)

        return self._call("list", rel, _ls)

    # ---- writes (whole objects only) ----------------------------------------------------
    def put_file(self, local_path: str, rel: str) -> None:
        """Upload a finished local file. Nothing is visible at ``rel`` unless this returns."""
        if self.protocol == "s3":
            with open(local_path, "rb") as src:
                self._put_s3(rel, src, os.path.getsize(local_path))
        elif self.protocol == "file":
            self._call("write", rel, lambda: _replace_local(local_path, self.path(rel)))
        else:  # other fsspec backends: their put_file is the best whole-object write they offer
            self._call("write", rel, lambda: self.fs.put_file(local_path, self.path(rel)))

    def put_fileobj(self, rel: str, src: BinaryIO) -> None:
        """Upload everything readable from ``src`` (read once, front to back).

        If reading ``src`` raises, the upload is abandoned and nothing is visible at ``rel``.
        """
        if self.protocol == "s3":
            self._put_s3(rel, src, None)
            return
        with self.open_write(rel) as dst:
            while chunk := src.read(8 * MiB):
                dst.write(chunk)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """``with store.open_write("model.pt") as f: torch.save(state, f)``.

        The data goes to a private local temp file and is uploaded whole when the block exits
        cleanly; if the block raises, nothing is uploaded.
        """
        fd, tmp = tempfile.mkstemp(prefix="vitforge-write-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            self.put_file(tmp, rel)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def put_bytes(self, rel: str, data: bytes) -> None:
        if self.protocol == "s3" and len(data) <= self.transfer.multipart_threshold:
            self._put_s3_single(rel, bytes(data))
            return
        with self.open_write(rel) as f:
            f.write(data)

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def put_dir(self, local_dir: str, rel: str) -> list[str]:
        """Upload every file under ``local_dir`` to ``rel/…`` (each file whole); returns the relative names."""
        names = []
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                local = os.path.join(dirpath, name)
                sub = os.path.relpath(local, local_dir).replace(os.sep, "/")
                self.put_file(local, posixpath.join(rel, sub))
                names.append(sub)
        return sorted(names)

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Delete ``rel`` (everything under it too when ``recursive``). Missing is fine.

        On S3, per-key errors inside a DeleteObjects reply (s3fs ignores them) are raised.
        """
        if self.protocol == "s3":
            self._call("delete", rel, lambda: self._delete_s3(rel, recursive))
            return

        def _rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(rel), recursive=recursive)

        self._call("delete", rel, _rm)

    # ---- S3 internals -------------------------------------------------------------------
    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        if not bucket or not key:
            raise ValueError(f"{self.url_of(rel)} names no object (an s3:// URL needs a bucket and a key)")
        return bucket, key

    def _put_s3(self, rel: str, src: BinaryIO, size: int | None) -> None:
        head = _read_full(src, self.transfer.multipart_threshold + 1)
        if len(head) <= self.transfer.multipart_threshold:
            self._put_s3_single(rel, head)
        else:
            self._put_s3_multipart(rel, head, src, size)

    def _put_s3_single(self, rel: str, data: bytes) -> None:
        bucket, key = self._bucket_key(rel)
        self._call("write", rel, lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
        self.fs.invalidate_cache(self.path(rel))

    def _put_s3_multipart(self, rel: str, head: bytes, src: BinaryIO, size: int | None) -> None:
        bucket, key = self._bucket_key(rel)
        part_size = max(self.transfer.part_size, 5 * MiB, -(-(size or 0) // 9000))  # S3: <= 10000 parts
        creates: list[float] = []
        completes: list[float] = []

        def _create() -> str:
            creates.append(time.time())
            return self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]

        upload_id = self._call("start upload of", rel, _create)
        pool = ThreadPoolExecutor(max(1, self.transfer.concurrency), thread_name_prefix="vitforge-upload")
        try:
            inflight: list[Future] = []
            etags: list[Future] = []
            for number, body in enumerate(_iter_parts(head, src, part_size), start=1):
                if len(inflight) >= max(1, self.transfer.concurrency):
                    inflight.pop(0).result()  # bounded memory; raises the first failed part
                fut = pool.submit(self._upload_part, rel, bucket, key, upload_id, number, body)
                inflight.append(fut)
                etags.append(fut)
            parts = [{"PartNumber": i, "ETag": f.result()} for i, f in enumerate(etags, start=1)]
            self._call("finish upload of", rel, lambda: self._complete(bucket, key, upload_id, parts, completes))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # parts still in flight end on their own
            self._abort_multipart(rel, bucket, key, upload_id)
            raise
        finally:
            if len(creates) > 1:
                self._abort_orphans(rel, bucket, key, creates[0], upload_id)
        pool.shutdown(wait=True)
        self.fs.invalidate_cache(self.path(rel))

    def _complete(self, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]],
                  attempts: list[float]) -> None:
        """CompleteMultipartUpload; a retry after a timed-out attempt that the server did carry
        out gets NoSuchUpload, which counts as success when the object's ETag is this upload's."""
        attempts.append(time.time())
        try:
            self.fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                            MultipartUpload={"Parts": parts})
        except Exception as exc:
            if len(attempts) > 1 and _error_code(exc.__cause__ or exc)[0] == "NoSuchUpload":
                head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                if head.get("ETag", "").strip('"') == _multipart_etag(parts):
                    return
            raise

    def _upload_part(self, rel: str, bucket: str, key: str, upload_id: str, number: int, body: bytes) -> str:
        out = self._call(f"upload part {number} of", rel, lambda: self.fs.call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
        return out["ETag"]

    def _abort_multipart(self, rel: str, bucket: str, key: str, upload_id: str) -> None:
        """Abort a failed upload so its parts do not linger (they are invisible either way)."""
        policy = RetryPolicy(outage_window_s=min(30.0, self.retry.outage_window_s),
                             first_backoff_s=self.retry.first_backoff_s, max_backoff_s=self.retry.max_backoff_s)
        try:
            with_retries(lambda: self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
                         what=f"abort the failed upload of {self.url_of(rel)}", policy=policy, bucket=bucket)
        except Exception as exc:  # the upload's own error is the one to raise
            log.warning("could not abort the failed multipart upload %s of %s (%s). It is invisible but keeps "
                        "its parts until aborted; an AbortIncompleteMultipartUpload lifecycle rule on the bucket "
                        "cleans such uploads.", upload_id, self.url_of(rel), _redact(str(exc)))

    def _abort_orphans(self, rel: str, bucket: str, key: str, since: float, keep: str) -> None:
        """Abort uploads of ``key`` begun by our own timed-out CreateMultipartUpload attempts.

        A create that timed out may still have been carried out by the server; its upload id
        never reached us. One writer owns a key (DESIGN.md), so other uploads of this key that
        began after our first attempt (minus clock slack) are ours. Best effort.
        """
        try:
            reply = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
            for up in reply.get("Uploads") or []:
                started = up.get("Initiated")
                if up.get("Key") != key or up.get("UploadId") == keep:
                    continue
                if started is not None and started.timestamp() < since - 300:
                    continue
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
                log.info("aborted orphaned multipart upload %s of %s", up["UploadId"], self.url_of(rel))
        except Exception as exc:
            log.warning("could not clean up orphaned multipart uploads of %s (%s)", self.url_of(rel),
                        _redact(str(exc)))

    def _delete_s3(self, rel: str, recursive: bool) -> None:
        bucket, _ = self._bucket_key(rel)
        path = self.path(rel)
        files, dirs = [path], []
        if recursive:
            with contextlib.suppress(FileNotFoundError):
                found = self.fs.find(path, withdirs=True, detail=True)
                files = sorted({p for p, i in found.items() if i.get("type") != "directory"} | {path})
                # Some servers (SeaweedFS) keep emptied folders, which still list as prefixes;
                # their "dir/" keys go too, deepest first, after the files (no-ops on AWS S3).
                dirs = sorted({p for p, i in found.items() if i.get("type") == "directory"} | {path},
                              key=lambda p: -p.count("/"))
        for batch in (files, [d + "/" for d in dirs]):
            keys = [p.partition("/")[2] for p in batch]
            for i in range(0, len(keys), 1000):
                reply = self.fs.call_s3("delete_objects", Bucket=bucket,
                                        Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
                errors = [e for e in reply.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
                if errors:
                    raise _ObjectError(errors[0])
        self.fs.invalidate_cache(path)


class RetryingReader(io.RawIOBase):
    """A read-only, seekable view of one object whose reads are retried for the outage window.

    Wraps the fsspec file (attributes it lacks, such as ``size``, are the fsspec file's). After a
    transient fault the underlying file is reopened and positioned where the failed read began.
    """

    def __init__(self, store: Store, rel: str, opener: Callable[[], Any]) -> None:
        super().__init__()
        self._store, self._rel, self._opener = store, rel, opener
        self._pos = 0
        self._f: Any = store._call("open", rel, opener)

    def _read_once(self, n: int) -> bytes:
        if self._f is None:
            self._f = self._opener()
            self._f.seek(self._pos)
        try:
            return self._f.read(n)
        except BaseException:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None  # reopen on the next attempt
            raise

    def read(self, n: int | None = -1) -> bytes:
        n = -1 if n is None else n
        data = self._store._call(f"read (at byte {self._pos})", self._rel, lambda: self._read_once(n))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset, whence = self._pos + offset, io.SEEK_SET
        if self._f is None:
            self._f = self._store._call("open", self._rel, self._opener)
        self._pos = self._f.seek(offset, whence)  # fsspec files seek without I/O
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
        super().close()

    def __getattr__(self, name: str) -> Any:  # size, info, path, ... of the fsspec file
        f = self.__dict__.get("_f")
        if f is None:
            raise AttributeError(name)
        return getattr(f, name)

    def __repr__(self) -> str:
        return f"RetryingReader({self._store.url_of(self._rel)!r})"


def _replace_local(local_path: str, dest: str) -> None:
    """Copy ``local_path`` to ``dest`` through a temp name in the same directory, then rename."""
    import shutil

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


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


# ---- retries ----------------------------------------------------------------------------

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "TooManyRequests", "OperationAborted",
                    "XAmzContentSHA256Mismatch", "BadDigest", "IncompleteBody"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "InvalidToken",
               "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
               "InvalidSecurity", "UnauthorizedAccess"}
_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ConnectionError", "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "ServerTimeoutError", "SocketTimeoutError",
                    "ConnectionTimeoutError", "IncompleteReadError", "ResponseStreamingError", "FSTimeoutError"}
_AUTH_TYPES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
               "ProfileNotFound", "UnauthorizedSSOTokenError", "SSOTokenLoadError"}


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of a botocore-style error, else (None, None)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code is not None and str(code).isdigit() and status is None:
        status = int(code)
    return (str(code) if code else None), (int(status) if status else None)


def classify(exc: BaseException) -> str:
    """'auth', 'missing', 'transient' or 'fatal' for an exception raised by fsspec/s3fs/botocore.

    What s3fs 2026.9 / aiobotocore 3.10 raise against a real server (SeaweedFS), checked by hand:

    * wrong secret / unknown key / read-only key writing: ``PermissionError`` from a botocore
      ``ClientError`` (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied, or a bare 403 on
      HEAD requests, which carry no body) -> 'auth'
    * missing bucket: ``FileNotFoundError`` from ``NoSuchBucket`` (GET/LIST) or a bare 404 (HEAD);
      SeaweedFS *creates* a missing bucket on PutObject, hence :meth:`Store._check_bucket`
    * server killed: botocore ``EndpointConnectionError`` (from aiohttp ``ClientConnectorError``);
      connections pooled from before a restart: ``ServerDisconnectedError`` / ``ClientOSError``
    * server frozen (SIGSTOP): botocore ``ReadTimeoutError`` (from aiohttp ``SocketTimeoutError``)
      -- uploads only once the Expect: 100-continue header is dropped (see ``_drop_expect_header``)
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code, status = _error_code(cur)
        name = type(cur).__name__
        if code in _AUTH_CODES or status in (401, 403) or name in _AUTH_TYPES or isinstance(cur, PermissionError):
            return "auth"
        if code == "NoSuchBucket":
            return "missing"
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return "transient"
        if name in _TRANSIENT_TYPES or isinstance(cur, (ConnectionError, TimeoutError)):
            return "transient"
        if isinstance(cur, FileNotFoundError) or code in ("NoSuchKey", "404") or status == 404:
            return "missing"
        cur = cur.__cause__ or cur.__context__
    return "fatal"


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy, bucket: str | None = None,
                 source: str | None = None) -> T:
    """Run ``fn``, retrying transient faults with exponential backoff for the outage window.

    Raises :class:`StorageAuthError` at once on 401/403 (naming ``bucket`` and where the
    credentials came from, ``source`` or :func:`credential_source`), :class:`StorageNotFoundError`
    for a missing bucket, the original ``FileNotFoundError`` for a missing object, and
    :class:`StorageError` when the window is used up or the fault is not transient.
    """
    deadline = time.monotonic() + policy.outage_window_s
    backoff = policy.first_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # classify, then retry or translate
            kind = classify(exc)
            if kind == "auth":
                raise StorageAuthError(_auth_message(exc, what, bucket, source)) from None
            if kind == "missing":
                if bucket and "NoSuchBucket" in repr(exc) + repr(exc.__cause__):
                    raise StorageNotFoundError(
                        f"bucket {bucket!r} does not exist (while trying to {what}); create it or fix the URL"
                    ) from None
                raise
            if kind != "transient" or time.monotonic() + backoff > deadline:
                hint = (f" (still failing after the {policy.outage_window_s:.0f} s outage window; raise it with "
                        f"{OUTAGE_ENV})") if kind == "transient" else ""
                raise StorageError(
                    f"could not {what} after {attempt} attempt(s): {type(exc).__name__}: {_redact(str(exc))}{hint}"
                ) from None
            level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
            log.log(level, "storage: %s failed (%s, attempt %d), retrying in %.1fs for up to %.0fs more",
                    what, type(exc).__name__, attempt, backoff, max(0.0, deadline - time.monotonic()))
            time.sleep(backoff)
            backoff = min(backoff * 2, policy.max_backoff_s)


def _auth_message(exc: BaseException, what: str, bucket: str | None, source: str | None) -> str:
    code = None
    cur: BaseException | None = exc
    while cur is not None and code is None:
        code = _error_code(cur)[0]
        cur = cur.__cause__ or cur.__context__
    if bucket is None:  # local files
        return f"permission denied while trying to {what}: {_redact(str(exc))}. Check the path's permissions."
    reason = f" ({code})" if code and not code.isdigit() else ""
    return (f"permission denied{reason} while trying to {what} (bucket {bucket!r}); credentials came from "
            f"{source or credential_source()}. Check the key and secret, and that this identity may read and "
            f"write bucket {bucket!r}.")


_SECRETS: set[str] = set()  # secrets handed to a Store through storage_options


def _redact(text: str) -> str:
    """``text`` with every known secret (environment or storage_options) replaced by ***."""
    secrets = {os.environ.get(v) for v in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")} | _SECRETS
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# ---- commit protocol --------------------------------------------------------------------


def commit(store: Store, dir_rel: str, meta: dict[str, Any] | None = None) -> None:
    """Mark ``dir_rel`` complete. Call only after every file in it was uploaded."""
    store.put_json(posixpath.join(dir_rel, COMMITTED), {"committed_at": time.time(), **(meta or {})})


def is_committed(store: Store, dir_rel: str) -> bool:
    return store.exists(posixpath.join(dir_rel, COMMITTED))


def committed_dirs(store: Store, parent_rel: str, prefix: str = "") -> list[str]:
    """Names of committed sub-directories of ``parent_rel`` starting with ``prefix``, sorted."""
    names = [n for n in store.ls(parent_rel) if n.startswith(prefix) and n != LATEST]
    return [n for n in names if is_committed(store, posixpath.join(parent_rel, n))]


def write_latest(store: Store, parent_rel: str, name: str) -> None:
    """Point ``parent_rel/latest`` at ``name``. Refuses a name that is not committed."""
    if not is_committed(store, posixpath.join(parent_rel, name)):
        raise StorageError(f"refusing to point {store.url_of(parent_rel)}/latest at uncommitted {name!r}")
    store.put_bytes(posixpath.join(parent_rel, LATEST), (name + "\n").encode())


def read_latest(store: Store, parent_rel: str, prefix: str = "") -> str | None:
    """The newest committed directory name under ``parent_rel``, or None.

    ``latest`` is trusted only when the directory it names is committed; otherwise the
    committed directories are listed and the newest (by name) wins.
    """
    pointer = posixpath.join(parent_rel, LATEST)
    with contextlib.suppress(FileNotFoundError):
        name = store.get_bytes(pointer).decode().strip()
        if name and is_committed(store, posixpath.join(parent_rel, name)):
            newest = committed_dirs(store, parent_rel, prefix)
            return max([name, *newest])
    newest = committed_dirs(store, parent_rel, prefix)
    return newest[-1] if newest else None


@contextlib.contextmanager
def local_staging(prefix: str = "vitforge-") -> Iterator[str]:
    """A private local directory for building files before upload; removed afterwards."""
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

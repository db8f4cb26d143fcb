"""Object storage: one code path for local paths, ``file://`` and ``s3://`` (anything fsspec speaks).

Contracts
---------
* Whole-object writes only. :meth:`Store.put_bytes`, :meth:`Store.put_json` and
  :meth:`Store.put_file` upload a finished local file; a failed or interrupted write leaves
  nothing visible (S3 semantics; on local disks a temp file is renamed into place).
* Credentials never come from a spec and are never printed: S3 endpoints and keys come from
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` and the
  standard AWS chain. Error messages name the bucket and *where* the credentials came from,
  never the secret itself.
* Transient faults (connection refused/reset, timeouts, 5xx, SlowDown) are retried with
  exponential backoff for up to ``RetryPolicy.outage_window_s`` (default 120 s). Permission
  and missing-bucket errors are not retried.
* Commit protocol for checkpoint-like directories (see DESIGN.md): a directory *exists* only
  when its ``COMMITTED`` marker exists; ``latest`` is written after the marker and is advisory,
  so :func:`read_latest` checks it against the markers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import fsspec

log = logging.getLogger(__name__)

T = TypeVar("T")

COMMITTED = "COMMITTED"
LATEST = "latest"


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must act on. The message is secret-free."""


class StorageAuthError(StorageError):
    """Credentials were refused or lack permission (HTTP 401/403). Never retried."""


class StorageNotFoundError(StorageError):
    """A bucket or object does not exist."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient faults are retried before a :class:`StorageError` is raised."""

    outage_window_s: float = 120.0
    first_backoff_s: float = 0.25
    max_backoff_s: float = 5.0


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
    # Retries are ours (an outage window of minutes); keep botocore's own short.
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    config_kwargs.setdefault("connect_timeout", 5)
    config_kwargs.setdefault("read_timeout", 30)
    opts["config_kwargs"] = config_kwargs
    opts.setdefault("skip_instance_cache", True)
    return opts


def credential_source() -> str:
    """Where S3 credentials come from, in words safe to print (never the secret)."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if os.environ.get("AWS_PROFILE"):
        return f"AWS profile {os.environ['AWS_PROFILE']!r}"
    return "the default AWS credential chain (~/.aws, instance metadata)"


class Store:
    """A root URL on one fsspec filesystem. Paths given to methods are relative to the root.

    ``Store("s3://bucket/runs/x").put_json("run.yaml", ...)`` writes ``s3://bucket/runs/x/run.yaml``.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.protocol, self._root = _split_url(url)
        self.retry = retry or RetryPolicy()
        opts = _s3_options(storage_options) if self.protocol == "s3" else dict(storage_options or {})
        self._storage_options = opts
        self.fs = fsspec.filesystem(self.protocol, **opts)

    # ---- naming -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.protocol}://{self._root}" if self.protocol != "file" else self._root

    @property
    def bucket(self) -> str | None:
        return self._root.split("/", 1)[0] if self.protocol == "s3" else None

    def path(self, rel: str = "") -> str:
        """Filesystem path (no protocol) of ``rel`` under the root."""
        rel = rel.strip("/")
        return posixpath.join(self._root, rel) if rel else self._root

    def url_of(self, rel: str = "") -> str:
        p = self.path(rel)
        return f"{self.protocol}://{p}" if self.protocol != "file" else p

    def child(self, rel: str) -> "Store":
        """A Store rooted at ``rel`` under this one, sharing the filesystem and retry policy."""
        sub = Store.__new__(Store)
        sub.protocol, sub._root, sub.retry = self.protocol, self.path(rel), self.retry
        sub._storage_options, sub.fs = self._storage_options, self.fs
        return sub

    def __repr__(self) -> str:  # never includes storage options (they may hold secrets)
        return f"Store({self.url!r})"

    # ---- retry core ---------------------------------------------------------------------
    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what=f"{what} {self.url_of(rel)}", policy=self.retry, bucket=self.bucket)

    # ---- reads --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.exists(self.path(rel)))

    def get_bytes(self, rel: str) -> bytes:
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def get_json(self, rel: str) -> Any:
        return json.loads(self.get_bytes(rel))

    def get_file(self, rel: str, local_path: str) -> None:
        """Download ``rel`` to ``local_path`` (written to a temp name, then renamed)."""
        os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
        tmp = f"{local_path}.part-{os.getpid()}"

        def _get() -> None:
            self.fs.get_file(self.path(rel), tmp)
            os.replace(tmp, local_path)

        try:
            self._call("download", rel, _get)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def open_read(self, rel: str, block_size: int | None = None):
        """A seekable binary file object for streaming reads. Caller closes it."""
        kw = {"block_size": block_size} if block_size else {}
        return self._call("open", rel, lambda: self.fs.open(self.path(rel), "rb", **kw))

    def size(self, rel: str) -> int:
        return int(self._call("stat", rel, lambda: self.fs.size(self.path(rel))))

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(self.path(rel), detail=False, refresh=True) if self.protocol == "s3" \
                    else self.fs.ls(self.path(rel), detail=False)
            except FileNotFoundError:
                return []
            base = self.path(rel).rstrip("/")
            return sorted(posixpath.relpath(e.rstrip("/"), base) for e in entries if e.rstrip("/") != base)

        return self._call("list", rel, _ls)

    # ---- writes (whole objects only) ----------------------------------------------------
    def put_file(self, local_path: str, rel: str) -> None:
        """Upload a finished local file. Nothing is visible at ``rel`` unless this returns."""
        dest = self.path(rel)

        def _put() -> None:
            if self.protocol == "file":
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                tmp = f"{dest}.part-{os.getpid()}"
                try:
                    self.fs.put_file(local_path, tmp)
                    os.replace(tmp, dest)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
            else:
                self.fs.put_file(local_path, dest)

        self._call("write", rel, _put)

    def put_bytes(self, rel: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="vitforge-put-", delete=False) as f:
            f.write(data)
            tmp = f.name
        try:
            self.put_file(tmp, rel)
        finally:
            os.remove(tmp)

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def put_dir(self, local_dir: str, rel: str) -> list[str]:
        """Upload every file under ``local_dir`` to ``rel/…``; returns the relative names."""
        names = []
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                local = os.path.join(dirpath, name)
                sub = os.path.relpath(local, local_dir).replace(os.sep, "/")
                self.put_file(local, posixpath.join(rel, sub))
                names.append(sub)
        return sorted(names)

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Delete ``rel`` (a directory's contents too when ``recursive``). Missing is fine."""

        def _rm() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=recursive)
            except FileNotFoundError:
                pass

        self._call("delete", rel, _rm)


# ---- retries ----------------------------------------------------------------------------

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
                    "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401", "Forbidden",
               "InvalidToken", "ExpiredToken"}


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = err.get("Code")
        if code:
            return str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def classify(exc: BaseException) -> str:
    """'auth', 'missing', 'transient' or 'fatal' for an exception raised by fsspec/s3fs/botocore."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = _error_code(cur)
        if code in _AUTH_CODES or isinstance(cur, PermissionError):
            return "auth"
        if code in ("NoSuchBucket",):
            return "missing"
        if code in _TRANSIENT_CODES:
            return "transient"
        name = type(cur).__name__
        if name in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                    "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError"):
            return "transient"
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return "transient"
        if isinstance(cur, FileNotFoundError):
            return "missing"
        cur = cur.__cause__ or cur.__context__
    return "fatal"


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy, bucket: str | None = None) -> T:
    """Run ``fn``, retrying transient faults with exponential backoff for the outage window."""
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
                raise StorageAuthError(
                    f"permission denied while trying to {what}"
                    + (f" (bucket {bucket!r})" if bucket else "")
                    + f"; credentials came from {credential_source()}. Check the key has access to this bucket."
                ) from None
            if kind == "missing":
                if bucket and "NoSuchBucket" in repr(exc):
                    raise StorageNotFoundError(
                        f"bucket {bucket!r} does not exist (while trying to {what}); create it or fix the URL"
                    ) from None
                raise
            if kind != "transient" or time.monotonic() + backoff > deadline:
                raise StorageError(
                    f"could not {what} after {attempt} attempt(s): {type(exc).__name__}: {_redact(str(exc))}"
                ) from None
            log.warning("storage: %s failed (%s), retrying in %.1fs", what, type(exc).__name__, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, policy.max_backoff_s)


def _redact(text: str) -> str:
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret:
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
    with contextlib.suppress(FileNotFoundError, StorageNotFoundError):
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

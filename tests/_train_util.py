"""Helpers for end-to-end training tests: specs, torchrun gangs, metrics, STATUS and checkpoint files.

Method-agnostic: a test passes its own stage mapping (``kind: mae``, ``kind: dino``, …).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import yaml

from cluster.storage import Store
from jobs.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}


def prep_digits(tmp_path_factory, s3, name: str, classes: int = 10, per_class: int = 13) -> str:
    """Real digit scans prepped into PNG shards on the test S3 server; returns the manifest URL."""
    from dataprep.digits import write_digits_imagefolder
    from dataprep.prep import PrepOptions, run_prep

    src = write_digits_imagefolder(str(tmp_path_factory.mktemp(name)), classes=classes, per_class=per_class)
    dest = f"s3://{s3.bucket}/{name}-{os.getpid()}"
    return run_prep(src, dest, PrepOptions(shard_size=40, format="png")).manifest_url


def write_spec(tmp_path, storage: str, name: str, stage: dict[str, Any], workers: int = 2,
               max_failures: int = 0) -> str:
    """A one-stage run spec file ``<tmp_path>/<name>.yaml``; returns its path."""
    spec = {"name": name, "storage": storage,
            "compute": {"workers": workers, "cpus_per_worker": 1, "max_failures": max_failures},
            "stages": [stage]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def write_job(spec_path: str, stage: str, fault: dict[str, int] | None = None) -> str:
    """The resolved stage job of ``spec_path`` as JSON beside it (with optional fault injection)."""
    from jobs.init import pin_init_hashes
    from pipeline.spec import load_spec

    spec = load_spec(spec_path)
    pin_init_hashes(spec)  # as pipeline.launch does
    job = spec.stage_job(stage, launcher="torchrun")
    if fault:
        job["fault"] = fault
    path = f"{spec_path}.{stage}{'.fault' if fault else ''}.json"
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def stage_store(storage: str, run: str, stage: str = "pretrain") -> Store:
    return Store(f"{storage}/{run}/stages/{stage}")


def losses(storage: str, run: str, stage: str = "pretrain") -> list[float]:
    return [r["loss"] for r in metrics(storage, run, stage)]


def metrics(storage: str, run: str, stage: str = "pretrain") -> list[dict[str, Any]]:
    return read_metrics(stage_store(storage, run, stage))


def status(storage: str, run: str, stage: str = "pretrain") -> dict:
    store = stage_store(storage, run, stage)
    return store.get_json("STATUS.json") if store.exists("STATUS.json") else {}


def torchrun(spec: str | None = None, stage: str = "pretrain", job: str | None = None, nproc: int = 2,
             **popen) -> subprocess.Popen:
    """``torchrun -m pipeline.launch`` on ``nproc`` local ranks, for ``--spec/--stage`` or a ``--job`` file."""
    args = ["--job", job] if job else ["--spec", spec, "--stage", stage]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "pipeline.launch", *args]
    popen.setdefault("start_new_session", True)  # its own process group: finish() can take every rank down
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for ``proc``; on timeout kill it (torchrun then takes its ranks down) and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(proc.args[-4:])} still running after {timeout:.0f}s:\n{out[-3000:]}") from None
    return proc.returncode, out


def kill_then_resume(spec: str, storage: str, run: str, fault: dict[str, int], stage: str = "pretrain") -> dict:
    """Run ``stage`` of ``spec`` with ``fault`` (a rank SIGKILLs itself), check it died mid-stage, run it
    again to the end; returns its final STATUS."""
    rc, out = finish(torchrun(job=write_job(spec, stage, fault=fault)))
    assert rc != 0 and status(storage, run, stage)["state"] == "running", out[-3000:]
    rc, out = finish(torchrun(spec, stage))
    assert rc == 0, out[-4000:]
    return status(storage, run, stage)


def wait_for(check, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_same_losses(got: list[float], want: list[float], steps: int, tol: float = 1e-6) -> None:
    assert len(got) == len(want) == steps, (len(got), len(want), steps)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= tol, f"step {step}: {a} != {b}"


def download_checkpoint(store: Store, step: int, dest) -> str:
    """Every file of committed checkpoint ``step`` into ``dest``; returns the local directory."""
    ckpt = store.child("checkpoints")
    name = f"step-{step:08d}"
    local = os.path.join(str(dest), name)
    for rel in ckpt.get_json(f"{name}/COMMITTED")["files"]:
        ckpt.get_file(f"{name}/{rel}", os.path.join(local, *rel.split("/")))
    return local


def zero_fp32_state_dict(local_ckpt: str) -> dict:
    """The full fp32 model state of a downloaded engine checkpoint (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = os.path.join(local_ckpt, "engine")  # accelerate's save_state: DeepSpeed tag "pytorch_model"
    tag = None if os.path.exists(os.path.join(engine, "latest")) else "pytorch_model"
    return get_fp32_state_dict_from_zero_checkpoint(engine, tag=tag)


def write_digit_shards(dest: str, images: int = 130, per_shard: int = 40) -> str:
    """Real digit scans (learnable), 32 px RGB PNG, written as shards + manifest without Ray."""
    import hashlib
    import io
    import tarfile
    import tempfile

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from dataprep.manifest import Manifest, ShardInfo, SplitInfo, save_manifest

    digits = load_digits()
    store, infos = Store(dest), []
    with tempfile.TemporaryDirectory(prefix="vf-digits-") as tmp:
        for start in range(0, images, per_shard):
            name, local = f"train/shard-{start // per_shard:06d}.tar", os.path.join(tmp, "shard.tar")
            with tarfile.open(local, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(start, min(images, start + per_shard)):
                    pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels, "L").resize((32, 32), Image.BICUBIC).convert("RGB").save(buf, "PNG")
                    key = hashlib.sha256(buf.getvalue()).hexdigest()[:24]
                    for member, data in ((f"{key}.png", buf.getvalue()), (f"{key}.cls", str(digits.target[i]).encode())):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            blob = open(local, "rb").read()
            store.put_file(local, name)
            infos.append(ShardInfo(name=name, samples=min(images, start + per_shard) - start, bytes=len(blob),
                                   sha256=hashlib.sha256(blob).hexdigest()))
    save_manifest(store, Manifest(splits={"train": SplitInfo(shards=infos)}, classes=[str(c) for c in range(10)],
                                  image_ext="png"))
    return f"{dest}/manifest.json"

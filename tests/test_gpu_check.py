"""bench/gpu_check.sh --dry: every part (MAE and DINO through torchrun + the engine, decode + crop)
runs one step on the CPU and the JSON it writes has every field the GPU run reports."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_runs_every_part_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry", "--work", str(tmp_path / "work"),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry"] is True
    for part in ("mae_vitb16", "dino_vits16"):
        assert res[part]["exit"] == 0 and res[part]["steps"] == 1
        assert res[part]["images_per_s"] > 0
        assert 0 <= res[part]["data_wait_pct"] <= 100  # engine-logged data wait is part of the step time
        assert "mfu" in res[part]  # None on CPU (no peak FLOP/s to divide by); a number on a known GPU
    assert res["gpu_decode"]["images_per_s"] > 0 and res["gpu_decode"]["device"] == "cpu"
    assert set(res["data_wait_pct"]) == {"mae_vitb16", "dino_vits16"}

"""``vitforge report``: PNG plots and an HTML page, uploaded beside the run or written to --out."""

from __future__ import annotations

import os
import re

from cluster.storage import Store
from pipeline.report import write_report
from tests._runroot_util import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_goes_to_the_run_root_on_s3_with_loss_throughput_and_eval(s3_url):
    root = f"{s3_url}/runs/demo"
    make_run(root)
    result = write_report(root)
    assert result.url == f"{root}/report/index.html"
    assert result.files == ["loss.png", "throughput.png", "optim.png", "eval.png", "index.html"]
    report = Store(root).child("report")
    for name in ("loss.png", "throughput.png", "optim.png", "eval.png"):
        width, height = png_size(report.get_bytes(name))
        assert width >= 400 and height >= 200
    page = report.get_bytes("index.html").decode()
    for src in ("loss.png", "throughput.png", "optim.png", "eval.png"):
        assert f"src='{src}'" in page
    assert not re.search(r"(src|href)=['\"]https?://", page)  # self-contained: no external resources
    assert "85.3%" in page and "92.2%" in page  # the eval table
    assert 'class="preempted"' in page and "step-00000030" in page


def test_report_without_metrics_or_eval_still_writes_a_page(tmp_path):
    root = tmp_path / "runs" / "empty"
    Store(str(root)).put_bytes("run.yaml", b"name: empty\nstages: [{name: data, kind: prep}]\n")
    out = tmp_path / "out"
    result = write_report(str(root), out=str(out))
    assert result.files == ["index.html"]
    page = (out / "index.html").read_text()
    assert "No training metrics yet" in page and "pending" in page
    assert not os.path.exists(root / "report")


def test_smoothed_loss_is_bias_corrected_not_dragged_toward_the_first_value():
    from pipeline.report import _ema

    loss = [3.0] + [1.0] * 39  # one high first step, then flat
    smooth = _ema(loss, 0.98)
    assert smooth[0] == 3.0
    assert abs(smooth[-1] - sum(w * v for w, v in zip([0.98 ** (39 - i) for i in range(40)], loss))
               / sum(0.98 ** i for i in range(40))) < 1e-9  # the weighted mean of what came so far
    assert smooth[-1] < 1.1  # the plain EMA started at the first value would still be ~1.9

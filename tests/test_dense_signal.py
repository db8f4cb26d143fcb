"""``bench/dense_signal.py``: the in-process dense learning-signal probe runs each method and the
supervised reference, and its probe sees what an encoder learns about the patch classes."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--images", "60", "--embed-dim", "16", "--heads", "2", "--depth", "2", "--out-dim", "64"]


def _bench():
    spec = importlib.util.spec_from_file_location("dense_signal", os.path.join(ROOT, "bench", "dense_signal.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["dino", "ibot"])
def test_each_method_trains_and_reports_teacher_and_student_miou(kind):
    result = _bench().main(["--kind", kind, "--steps", "4", "--eval-every", "2", *TINY])
    steps = [row[0] for row in result["curve"]]
    assert steps == [0, 2, 4]
    assert all(0.0 <= v <= 1.0 for row in result["curve"][1:] for v in row[1:])


def test_supervised_training_raises_the_probe_miou_well_above_step0():
    """Trained on the patch labels, the encoder's tokens must score far above its step-0 tokens: the probe
    measures learned patch features, so a method's zero gain is its own, not the probe's (measured: 0.480 -> 0.740)."""
    curve = _bench().main(["--supervised", "--steps", "80", "--eval-every", "80", "--colour-cell", "4",
                           "--images", "200", "--embed-dim", "32", "--heads", "2"])["curve"]
    (_, start, _), (_, end, _) = curve
    assert end >= start + 0.15, curve

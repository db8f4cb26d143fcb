"""``jobs/reshard.py``: the batch shape and resume plan for another number of workers (cheap, no gang).

Moved from test_faults_workers.py (the fault suite keeps the end-to-end 2 -> 1 -> 2 scenarios).
"""

from __future__ import annotations

import pytest

from jobs.reshard import ResumePlan, WorldSizeError, batch_shape, resume_plan

pytestmark = pytest.mark.faults


def _meta(batch: int, accum: int, world: int) -> dict:
    return {"step": 6, "world_size": world, "config": {"batch_size": batch, "grad_accum": accum}}


@pytest.mark.parametrize("saved, world, want", [
    ((8, 1, 2), 1, (8, 2)),    # fewer workers: the micro-batch stays, accumulation doubles
    ((8, 2, 1), 2, (8, 1)),    # more workers: accumulation first
    ((8, 1, 1), 2, (4, 1)),    # ... then the micro-batch
    ((6, 1, 2), 4, (3, 1)),
    ((6, 1, 2), 3, (4, 1)),    # global 12 on 3 workers: 4 each, never more than the saved micro-batch
    ((5, 1, 2), 1, (5, 2)),
    ((8, 3, 2), 2, (8, 3)),    # the same number of workers: the checkpoint's own shape
])
def test_batch_shape_keeps_the_checkpoint_global_batch_on_another_number_of_workers(saved, world, want):
    got = batch_shape(_meta(*saved), world, default=(99, 99))
    assert got == want
    assert got[0] <= saved[0] and got[0] * got[1] * world == saved[0] * saved[1] * saved[2]


def test_batch_shape_without_checkpoint_is_the_stage_own():
    assert batch_shape(None, 3, default=(7, 2)) == (7, 2)


def test_a_global_batch_the_workers_cannot_split_is_refused_naming_the_numbers_that_work():
    with pytest.raises(WorldSizeError) as err:
        batch_shape(_meta(4, 1, 2), 3, default=(4, 1), where="checkpoint s3://b/run/stages/p/checkpoints/step-6")
    text = str(err.value)
    assert "written by 2 workers" in text and "global batch of 8" in text and "3 workers cannot split it" in text
    assert "(1, 2, 4, 8)" in text and "step-6" in text


def test_resume_plan_without_a_checkpoint_keeps_the_stage_shape(tmp_path):
    from jobs.mae import MAEConfig

    cfg = MAEConfig(name="p", data="/x", batch_size=6, grad_accum=2)
    plan = resume_plan(str(tmp_path / "stages" / "p"), None, 4, cfg)
    assert plan == ResumePlan(None, 4, 6, 2) and not plan.reshaped and plan.shape(cfg) is cfg
    shaped = ResumePlan(None, 4, 3, 4).shape(cfg)
    assert (shaped.batch_size, shaped.grad_accum) == (3, 4) and shaped.digest() != cfg.digest()

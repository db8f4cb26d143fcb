"""Experiment trackers (jobs/_trackers.py), read back with each tool's own reader.

TensorBoard through its ``EventAccumulator`` (on a local run root, and on real S3 through the
upload + ``vitforge tensorboard`` mirror), a resumed attempt's replayed steps purged; MLflow
through its local file store, one MLflow run continued by every attempt; W&B offline when the
package is installed.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cluster.storage import Store
from jobs._trackers import Trackers, mirror_events, scalars, tracker_env
from pipeline.cli import app


def _records(steps, loss0: float = 2.0):
    for step in steps:
        yield {"step": step, "epoch": 0, "loss": loss0 / step, "lr": 1e-3, "grad_norm": 0.5, "images_per_s": 100.0,
               **({"val_top1": 0.5, "val_count": 10.0} if step % 4 == 0 else {})}


def _scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_name_train_and_val_metrics_and_skip_bookkeeping():
    got = scalars({"step": 3, "epoch": 1, "loss": 0.5, "val_top1": 0.9, "val_count": 30.0, "note": "x", "ok": True})
    assert got == {"train/loss": 0.5, "val/top1": 0.9}


def test_tensorboard_events_on_a_local_run_root_are_readable_and_a_resume_purges_replayed_steps(tmp_path):
    store = Store(str(tmp_path / "run" / "stages" / "pretrain"))
    first = Trackers(["tensorboard"], store, "pretrain", "run", resumed_from=None)
    for record in _records(range(1, 7)):
        first.log(record)
    first.close()
    # the second attempt resumes from the checkpoint at step 4: steps 5 and 6 run again
    second = Trackers(["tensorboard"], store, "pretrain", "run", resumed_from=4)
    for record in _records(range(5, 9), loss0=4.0):
        second.log(record)
    second.close()
    loss = _scalars(store.path("tensorboard"), "train/loss")
    assert [s for s, _ in loss] == list(range(1, 9))               # every step once
    assert loss[5][1] == pytest.approx(4.0 / 6)                     # step 6 from the attempt that went on
    assert _scalars(store.path("tensorboard"), "val/top1") == [(4, 0.5), (8, 0.5)]
    assert {s for s, _ in _scalars(store.path("tensorboard"), "train/lr")} == set(range(1, 9))


def test_tensorboard_events_on_s3_are_uploaded_and_mirrored_by_vitforge_tensorboard(s3, tmp_path):
    root = f"s3://{s3.bucket}/{tmp_path.name}/run"
    Store(root).put_bytes("run.yaml", b"name: run\n")
    store = Store(f"{root}/stages/pretrain")
    trackers = Trackers(["tensorboard"], store, "pretrain", "run", resumed_from=None)
    for record in _records(range(1, 4)):
        trackers.log(record)
    trackers.sync()  # what every heartbeat does while training
    assert any(n.startswith("events.out.tfevents") for n in store.ls("tensorboard"))
    trackers.close()
    out = tmp_path / "mirror"
    result = CliRunner().invoke(app, ["tensorboard", root, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"tensorboard --logdir {out}" in result.output
    assert [s for s, _ in _scalars(str(out / "pretrain"), "train/loss")] == [1, 2, 3]
    assert mirror_events(root, str(tmp_path / "again")) and (tmp_path / "again" / "pretrain").is_dir()


def test_mlflow_file_store_gets_the_metrics_and_a_resumed_attempt_continues_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    store = Store(str(tmp_path / "run" / "stages" / "pretrain"))
    for steps in (range(1, 4), range(4, 6)):  # two attempts of one stage
        trackers = Trackers(["mlflow"], store, "pretrain", "myrun", resumed_from=steps[0] - 1 or None,
                            config={"optim": {"base_lr": 0.001}, "epochs": 2})
        for record in _records(steps):
            trackers.log(record)
        trackers.close()
    run_id = store.get_json("trackers.json")["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    run = client.get_run(run_id)
    assert run.data.params["optim.base_lr"] == "0.001"
    assert client.get_experiment(run.info.experiment_id).name == "myrun"
    assert run.data.tags["vitforge.stage"] == "pretrain"


def test_wandb_offline_run_gets_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    store = Store(str(tmp_path / "run" / "stages" / "pretrain"))
    trackers = Trackers(["wandb"], store, "pretrain", "myrun", resumed_from=None)
    for record in _records(range(1, 3)):
        trackers.log(record)
    assert [n for n, _ in trackers.items] == ["wandb"]  # still there: no step failed
    trackers.close()
    assert store.get_json("trackers.json")["wandb_id"]


def test_a_tracker_whose_package_is_missing_is_refused_with_the_extra_to_install(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"vitforge\[trackers\]"):
        Trackers(["wandb"], Store(str(tmp_path)), "s", "r", resumed_from=None)


def test_tracker_env_forwards_only_tracker_settings():
    env = {"MLFLOW_TRACKING_URI": "http://x", "WANDB_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "no", "HOME": "/root"}
    assert tracker_env(env) == {"MLFLOW_TRACKING_URI": "http://x", "WANDB_API_KEY": "k"}

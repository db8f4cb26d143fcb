"""``kind: eval``: weighted kNN, linear probe, label subsets, eval.json, and `models:` in the spec."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from jobs.evaluate import (EvalConfig, Features, ProbeConfig, format_table, knn_predict, label_subset, linear_probe,
                           run_eval)
from pipeline.spec import SpecError, parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
              "num_heads": 2}


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_weights_each_neighbour_by_exp_similarity_over_temperature():
    # two class-1 neighbours at 60 deg from the query, one class-0 neighbour at 8 deg, one far class-2 sample
    train = torch.tensor([unit(8), unit(60), unit(-60), unit(180)])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit(0)])
    scores = knn_predict(train, labels, query, num_classes=3, k=3, temperature=0.07)
    expect0 = math.exp(math.cos(math.radians(8)) / 0.07)
    expect1 = 2 * math.exp(0.5 / 0.07)
    assert scores.shape == (1, 3)
    assert scores[0, 0].item() == pytest.approx(expect0, rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(expect1, rel=1e-5)
    assert scores[0, 2].item() == 0.0  # not among the k nearest
    assert scores.argmax().item() == 0  # the weighted vote beats the 2-to-1 majority
    # a hot temperature flattens the weights: now the majority wins
    assert knn_predict(train, labels, query, num_classes=3, k=3, temperature=100.0).argmax().item() == 1
    # k larger than the train set is capped; chunking does not change the result
    many = F.normalize(torch.randn(50, 2), dim=1)
    a = knn_predict(train, labels, many, num_classes=3, k=20, temperature=0.07, chunk=7)
    b = knn_predict(train, labels, many, num_classes=3, k=4, temperature=0.07, chunk=1000)
    assert torch.allclose(a, b)


def test_label_subset_is_stratified_seeded_and_keeps_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    sub = label_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[sub]).tolist()
    assert counts == [5, 3, 1]  # round(n * 0.1), at least one per class
    assert torch.equal(sub, label_subset(labels, 0.1, seed=0))
    assert not torch.equal(sub, label_subset(labels, 0.1, seed=1))
    assert torch.equal(label_subset(labels, 1.0, seed=0), torch.arange(len(labels)))


def test_linear_probe_learns_separable_features_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 4
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=gen)
    train, val = Features(x[:300], y[:300]), Features(x[300:], y[300:])
    cfg = ProbeConfig(epochs=30, batch_size=64, lr=1e-2)
    acc = linear_probe(train, val, 4, cfg, seed=0)
    assert acc >= 0.97
    assert linear_probe(train, val, 4, cfg, seed=0) == acc
    # chance on shuffled labels
    shuffled = Features(train.x, train.y[torch.randperm(300, generator=gen)])
    assert linear_probe(shuffled, val, 4, cfg, seed=0) < 0.6


def eval_stage(**over) -> dict:
    return {"name": "report", "kind": "eval", "data": "data", "models": ["pretrain"], **over}


def spec_with(*stages) -> dict:
    return {"name": "r", "storage": "s3://b/runs",
            "stages": [{"name": "data", "kind": "prep", "source": "./d"},
                       {"name": "pretrain", "kind": "mae", "data": "data", "model": TINY_MODEL}, *stages]}


def test_spec_models_name_earlier_training_stages_or_export_urls():
    spec = parse_spec(spec_with(eval_stage(models=["pretrain", "s3://b/other/export", "./local/export"])))
    job = spec.eval_job("report")
    assert [m["url"] for m in job["models"]][:2] == ["s3://b/runs/r/stages/pretrain/export", "s3://b/other/export"]
    assert job["models"][2]["url"].startswith("/") and job["models"][2]["url"].endswith("/local/export")
    assert job["data_url"] == "s3://b/runs/r/stages/data/shards" and job["stage_url"] == "s3://b/runs/r/stages/report"
    assert spec.stage("report").knn_k == 20 and spec.stage("report").knn_temperature == 0.07
    with pytest.raises(ValueError, match="not an eval stage"):
        spec.eval_job("pretrain")

    for models, message in ((["later"], r"models\[0\]: 'later' is neither an earlier stage"),
                            (["pretrain", "data"], r"models\[1\]: stage 'data' is a prep stage"),
                            ([], r"stages\[2\] \(report\) > models")):
        with pytest.raises(SpecError, match=message):
            parse_spec(spec_with(eval_stage(models=models)))
    with pytest.raises(SpecError, match=r"stages\[3\] \(again\) > models\[0\]: stage 'report' is a eval stage"):
        parse_spec(spec_with(eval_stage(), eval_stage(name="again", models=["report"])))
    with pytest.raises(SpecError, match=r"stages\[2\] \(report\) > knn_k"):
        parse_spec(spec_with(eval_stage(knn_k=0)))
    with pytest.raises(SpecError, match=r"stages\[2\] \(report\) > probe > epoch"):
        parse_spec(spec_with(eval_stage(probe={"epoch": 3})))


@pytest.fixture
def labelled_manifest(tmp_path) -> str:
    """Three classes, 40 train and 15 val images (written directly: no prep, no Ray)."""
    from tests._shards_util import write_shards

    dest = str(tmp_path / "shards")
    write_shards(dest, {"train": [16, 16, 8], "val": [15]}, classes=3)
    return dest


def export_random_encoder(dest: str, seed: int, pool: str | None = None) -> None:
    """A random tiny ViT export; ``pool``: the pooling its (pretend) method trained, as the engine records it."""
    from jobs.export import export_encoder
    from jobs.models import ModelConfig, build_encoder

    torch.manual_seed(seed)
    cfg = ModelConfig(**TINY_MODEL)
    export_encoder(build_encoder(cfg), cfg, dest, extra={"pool": pool} if pool else None)


def numbers(report: dict) -> dict:
    return {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in report["models"].items()}


def test_eval_job_writes_eval_json_with_each_models_accuracies_deterministically(labelled_manifest, s3_url, tmp_path):
    from cluster.storage import Store

    export_random_encoder(f"{s3_url}/a/export", seed=0, pool="avg")  # e.g. an MAE export
    export_random_encoder(str(tmp_path / "b"), seed=1)  # records none: the CLS token
    stage = {"name": "report", "kind": "eval", "data": labelled_manifest, "loader_workers": 0, "batch_size": 16,
             "models": [f"{s3_url}/a/export", str(tmp_path / "b")], "probe": {"epochs": 20}}
    spec = parse_spec({"name": "ev", "storage": s3_url, "stages": [stage]})
    report = run_eval(spec.eval_job("report"))

    store = Store(spec.stage_url("report"))
    assert store.get_json("eval.json") == report
    assert store.get_json("STATUS.json")["state"] == "done"
    assert report["classes"] == 3 and report["knn"] == {"k": 20, "temperature": 0.07} and report["pool"] is None
    assert {name: m["pool"] for name, m in report["models"].items()} == {stage["models"][0]: "avg",
                                                                         stage["models"][1]: "token"}
    assert sorted(report["models"]) == sorted(stage["models"])
    for name, entry in report["models"].items():
        assert entry["url"] == name and entry["architecture"] == "vit_tiny_patch16_224" and entry["feature_dim"] == 32
        assert entry["train_samples"] == 40 and entry["val_samples"] == 15  # every sample once, padding dropped
        assert 0.0 <= entry["knn_top1"] <= 1.0 and 0.0 <= entry["linear_top1"] <= 1.0
        assert "reconstruction" not in entry  # export URLs: no MAE checkpoint to rebuild the decoder from
    table = format_table(report)
    assert "kNN top-1" in table and "linear top-1" in table and "a/export" in table

    again = run_eval({**spec.eval_job("report"), "stage_url": f"{s3_url}/again"})
    assert numbers(again) == numbers(report)  # deterministic order, seeded probe
    low = EvalConfig.model_validate({**stage, "label_fraction": 0.2, "pool": "token"})  # overrides the exports'
    few = run_eval({**spec.eval_job("report"), "stage": low.model_dump(), "stage_url": f"{s3_url}/few"})
    for m in few["models"].values():  # labels cycle 0,1,2: round(0.2 x 14) + 2 x round(0.2 x 13)
        assert m["train_samples"] == 3 + 3 + 3 and m["val_samples"] == 15 and m["pool"] == "token"


def test_eval_stage_runs_as_a_ray_task_and_is_skipped_once_done(labelled_manifest, ray_local, tmp_path):
    from cluster.storage import Store
    from pipeline.run import run_spec

    export_random_encoder(str(tmp_path / "m"), seed=0)
    stage = {"name": "report", "kind": "eval", "data": labelled_manifest, "loader_workers": 0,
             "models": [str(tmp_path / "m")], "probe": {"epochs": 5}}
    spec = parse_spec({"name": "ev", "storage": str(tmp_path / "runs"), "stages": [stage]})
    assert run_spec(spec).states == {"report": "done"}
    status = Store(spec.stage_url("report")).get_json("STATUS.json")
    assert status["state"] == "done" and status["attempts"] == 1 and status["kind"] == "eval"
    assert run_spec(spec).states == {"report": "done"}
    assert Store(spec.stage_url("report")).get_json("STATUS.json")["attempts"] == 1  # skipped, not rerun


def test_reconstruction_report_scores_mae_and_both_baselines_on_the_same_masks(labelled_manifest):
    from dataprep.loader import StreamingLoader
    from dataprep.transforms import eval_transform
    from jobs._eval_recon import reconstruction_report
    from jobs.mae import MAEConfig, build_mae

    torch.manual_seed(0)
    cfg = MAEConfig(name="p", data="/x", model={**TINY_MODEL, "patch_size": 4},
                    decoder={"embed_dim": 16, "depth": 1, "num_heads": 2})
    model = build_mae(cfg).eval()
    report = reconstruction_report(model, labelled_manifest, "val", seed=3, batch_size=64)
    assert report["samples"] == 15 and report["mask_ratio"] == 0.75 and report["norm_pix_loss"]

    imgs = next(iter(StreamingLoader(labelled_manifest, split="val", batch_size=64, shuffle=False, partial="pad",
                                     transform=eval_transform(32))))["image"][:15]
    noise = torch.rand(15, 64, generator=torch.Generator().manual_seed(3 * 1_000_003))
    with torch.no_grad():
        loss, _, mask = model(imgs, noise)  # MAE's own objective, on the same masks
        target = model.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert report["loss"] == pytest.approx(float(loss), rel=1e-5)
    zero = float(((target ** 2).mean(-1) * mask).sum() / mask.sum())  # a flat patch at its own mean = 0 here
    assert report["baseline_mean_patch"] == pytest.approx(zero, rel=1e-5)
    assert 0.9 < report["baseline_mean_patch"] < 1.0  # (n - 1) / n for a non-flat normalised patch
    assert report["baseline_visible_mean"] > 0


@pytest.mark.slow
def test_mae_reconstruction_rebuilds_the_full_model_from_the_stages_committed_checkpoint(labelled_manifest, tmp_path):
    import subprocess
    import sys

    import yaml

    from jobs._eval_recon import load_mae_from_checkpoint, mae_reconstruction
    from jobs.export import load_export

    stage = {"name": "pretrain", "kind": "mae", "data": labelled_manifest,
             "model": {**TINY_MODEL, "img_size": 16, "patch_size": 4}, "decoder": {"embed_dim": 16, "depth": 1, "num_heads": 2},
             "max_steps": 3, "batch_size": 8, "zero_stage": 2, "loader_workers": 0,
             "checkpoint": {"every_steps": 100, "keep_last": 1}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "ck", "storage": str(tmp_path / "runs"), "compute": {"workers": 2},
                                    "stages": [stage]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeline.launch",
           "--spec", str(spec), "--stage", "pretrain"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    stage_url = str(tmp_path / "runs" / "ck" / "stages" / "pretrain")
    model, cfg, step = load_mae_from_checkpoint(stage_url)
    assert step == 3 and cfg.name == "pretrain"
    exported = load_export(f"{stage_url}/export").state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in model.encoder.state_dict().items())  # the trained weights
    report = mae_reconstruction(stage_url, labelled_manifest, "val")
    assert report["step"] == 3 and report["samples"] == 15
    assert report["loss"] > 0 and 0.9 < report["baseline_mean_patch"] < 1.0

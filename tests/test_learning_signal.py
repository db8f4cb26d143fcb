"""A real learning signal on scikit-learn's handwritten digits, through ``run_spec`` (slow tier).

1,797 real 8x8 scans (10 classes), upscaled to 16x16 and prepped into train/val shards (1437 /
359). One run spec, as a user runs it, every training stage a 2-worker Ray Train gang (DeepSpeed
ZeRO-2, gloo):

* ``pretrain``  MAE, 25 epochs;
* DINO and iBOT are measured by their own test
  (``test_dino_and_ibot_teacher_cls_tokens_gain_knn_over_their_step0_weights``, two seeds, one spec each,
  scored on the CLS token they train: DINO at least 5 points over its step-0 weights, numbers at
  ``DINO_KNN_MARGIN``; iBOT against DINO and step-0, numbers at ``IBOT_FIELDS``);
* ``ft-mae`` / ``ft-scratch``  ``kind: finetune``, ``mode: linear``, ``label_fraction: 0.1`` (the
  same 143 stratified labels for both): the MAE export vs the same architecture from random
  init (timm's init under the stage seed, no export);
* ``eval``  weighted kNN (k=20, T=0.07, all train labels, avg-pooled) of the MAE and DINO exports
  and of *the same encoders at their initial weights* (each method's model at step 0 under the
  stage seed, exported here by hand: the strictest control), plus MAE's val reconstruction.

Shown with numbers:

1. MAE's val reconstruction loss (fixed masks, ratio 0.75, norm-pix targets) ends well below the
   mean-patch baseline (each masked patch predicted as a flat patch of its own true mean colour)
   and below the visible-mean baseline;
2. the MAE encoder beats its initial weights on kNN, and beats random init on the 10%-label
   fine-tune stage;
3. DINO (its own test): the teacher's CLS token against its initial weights on kNN;
4. iBOT (the same test and spec): its teacher's CLS kNN against DINO's on the same recipe and against the
   step-0 weights (numbers at ``IBOT_FIELDS``).

Measured with ``.venv/bin/python -m pytest tests/test_learning_signal.py -m slow -s -p no:cacheprovider``
(the ``LEARNING-SIGNAL`` JSON line; 1438 train / 359 val; a run is deterministic: two seed-0 runs gave
identical numbers). Seed 0 / seed 1 (``SEED = 1``: another val split too):

* MAE val reconstruction 0.616 / 0.590 vs mean-patch baseline 0.979 / 0.979 (visible-mean 1.206 / 1.202);
* kNN top-1, MAE 76.0% / 80.5% vs its initial weights 71.6% / 61.6%;
* 10%-label linear fine-tune stage (143 / 144 labels): from MAE 52.1% / 60.4% vs from random init
  38.7% / 38.4%;
* DINO (its own test, 2 workers, one-layer head): teacher CLS kNN 57.7% / 65.7% vs its initial weights
  50.4% / 51.3% (linear probe 85.0% / 85.0% vs 77.4% / 76.9%); the search behind the recipe is at
  ``DINO_KNN_MARGIN``.

The MAE init (fixed sin-cos position embeddings) alone gives 62-72% kNN, timm's default init (DINO,
and the fine-tune's random init) 50-55%: hence each kNN control is the method's own step-0 weights.
Asserted with room for seed noise: reconstruction < 0.8 x mean-patch and < visible-mean; MAE kNN
+2 points over its init; 10%-label fine-tune +5 points over random init; DINO's teacher CLS kNN +5
points over its init on both seeds.

Wall time (2 cores, load ~2-3 from other work): 7.7 min; training-stage attempts pretrain 98 s,
dino 173 s, ft-mae 66 s, ft-scratch 72 s, eval 17 s (each gang start costs ~30 s). DINO's CPU cost is
mostly augmentation (colour jitter's hue and the blur take ~2-4 ms per 16 px view in torchvision).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cluster.storage import Store
from jobs.metrics import read_metrics

log = logging.getLogger(__name__)

SEED = 0
ENCODER = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 128,
           "num_heads": 4}
MAE_STAGE = {
    "name": "pretrain", "kind": "mae", "model": ENCODER,
    "decoder": {"embed_dim": 64, "depth": 1, "num_heads": 4},
    "mask_ratio": 0.75, "norm_pix_loss": True, "epochs": 25, "batch_size": 32, "zero_stage": 2, "loader_workers": 0,
    "seed": SEED, "optim": {"base_lr": 6e-3, "warmup_epochs": 2.5, "weight_decay": 0.05},
    "checkpoint": {"every_steps": 100000, "keep_last": 1},
}
DINO_STAGE = {  # a one-layer head (DINOHead(nlayers=1): linear to the bottleneck): see DINO_KNN_MARGIN
    "name": "dino", "kind": "dino", "model": ENCODER,
    "head": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "layers": 1},
    "local_crops": 2, "epochs": 10, "batch_size": 32, "zero_stage": 2, "loader_workers": 0, "seed": SEED,
    "optim": {"base_lr": 1e-2, "warmup_epochs": 1}, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0, "teacher_momentum": 0.99, "export_from": "teacher",
    "checkpoint": {"every_steps": 100000, "keep_last": 1},
}
FINETUNE = {  # a linear probe stage (frozen encoder, BatchNorm + linear head) on 10% of the train labels
    "kind": "finetune", "mode": "linear", "label_fraction": 0.1, "epochs": 30, "batch_size": 16, "zero_stage": 2,
    "loader_workers": 0, "seed": SEED, "crop_scale": [0.5, 1.0],
    "optim": {"base_lr": 1.6, "warmup_epochs": 2, "weight_decay": 0.05, "betas": [0.9, 0.95]},  # as measured
    "checkpoint": {"every_steps": 100000, "keep_last": 1},
}
# DINO's teacher CLS kNN vs its step-0 weights, through this test (2 workers): 57.7% vs 50.4% (seed 0), 65.7% vs
# 51.3% (seed 1), +7.2 / +14.5 points; linear probe 85.0% vs 77.4% / 85.0% vs 76.9%. A one-process search on the
# same digits (1 worker, batch 64; the table is in the issue #17 note) found one change that gains on every seed:
# the head's MLP cut to one layer (+8.1 / +10.6 / +7.8 / +10.3 on seeds 0-3; two layers +7.0 on seed 0). With the
# default three layers the student's CLS features collapse within 10-20 steps (their cosine across images 0.76 ->
# 0.98-0.998) whatever the lr (down to 5e-5), warm-up, Adam eps, centre or teacher momentum, temperatures or
# last-layer norm: its teacher CLS kNN gains -4 to +6 points. The loss still ends at ln(1024) with the one-layer
# head (the teacher's output is uniform by the end): the gain is in the backbone's CLS features, which keep the
# classes apart, not a healthy prototype assignment, and the same collapse shows in a transcription of
# main_dino.py's loop on this recipe (its teacher CLS kNN +12.5 / -0.3 points on seeds 0 / 1 with three layers).
# The partial ``optim:`` merges over DINO's defaults (per-parameter clipping 3, wd 0.04 -> 0.4, betas (0.9, 0.999)).
DINO_KNN_MARGIN = 0.05  # issue #17's bar; measured +7.2 / +14.5 points
# iBOT on DINO_STAGE's recipe (official ViT-S masks, own patch head), teacher CLS kNN ibot / dino / step-0 through
# its test, seeds 0 / 1: patch_weight 1.0 (official lambda2) 55.4 / 57.7 / 50.4 and 46.0 / 65.7 / 51.3 (-2.2 and
# -19.8 points against DINO); shared_head 51.8 and 48.2 (-5.9 / -17.6); patch_weight 0.3 58.2 and 56.0 (+0.5 / -9.7,
# +7.8 / +4.7 over step-0; linear probe 84.1 / 80.5 vs DINO 85.0 / 85.0). On 16 patches a step the patch loss at
# full weight costs the CLS features what DINO gains; the test uses 0.3 and asserts the worst case with room.
IBOT_FIELDS = {"patch_out_dim": 1024, "mask_ratio": [0.0, 0.3], "mask_ratio_var": [0.0, 0.2], "patch_weight": 0.3}
IBOT_KNN_MARGIN, IBOT_INIT_MARGIN = 0.12, 0.02
KNN_MARGIN, FINETUNE_MARGIN = 0.02, 0.05  # measured +4.5 / +18.9 and +13.4 / +22.0 points (seeds 0 / 1)


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory) -> str:
    """All 1,797 digits, 16x16 PNG shards, 20% val."""
    from dataprep.digits import write_digits_imagefolder
    from dataprep.prep import PrepOptions, run_prep

    root = tmp_path_factory.mktemp("digits-all")
    src = write_digits_imagefolder(str(root / "images"), size=16)
    return run_prep(src, str(root / "shards"), PrepOptions(shard_size=200, format="png", val_fraction=0.2,
                                                            seed=SEED)).manifest_url


def export_initial_encoder(stage: dict, dest: str) -> None:
    """A training stage's encoder at step 0: the engine seeds torch with ``seed``, then builds the model.
    The export records the method's pooling, as the engine's does (eval reads it)."""
    from jobs.export import export_encoder
    from jobs.stage import make_method, stage_config_class

    cfg = stage_config_class(stage["kind"]).model_validate({**stage, "data": "/unused"})
    torch.manual_seed(cfg.seed)
    method = make_method(cfg, 0)
    extra = {"pool": method.pool} if method.pool else None
    export_encoder(method.encoder(method.build_model()), cfg.model, dest, extra=extra)


def last_val_top1(spec, stage: str) -> tuple[float, dict]:
    records = read_metrics(Store(spec.stage_url(stage)))
    return [r for r in records if "val_top1" in r][-1]["val_top1"], records[-1]


@pytest.mark.slow
def test_pretraining_on_digits_beats_baselines_on_reconstruction_knn_and_a_low_label_finetune(digits, tmp_path):
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    inits = {"mae": str(tmp_path / "init-mae" / "export")}
    export_initial_encoder(MAE_STAGE, inits["mae"])
    spec = parse_spec({
        "name": "signal", "storage": str(tmp_path / "runs"),
        "compute": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [{**MAE_STAGE, "data": digits},
                   {**FINETUNE, "name": "ft-mae", "data": digits, "init": "pretrain"},
                   {**FINETUNE, "name": "ft-scratch", "data": digits, "model": ENCODER},
                   {"name": "eval", "kind": "eval", "data": digits, "models": ["pretrain", *inits.values()],
                    "pool": "avg", "loader_workers": 0, "probe": {"epochs": 100, "lr": 1e-2}}],
    })
    states = run_spec(spec).states
    assert set(states.values()) == {"done"}, states
    models = Store(spec.stage_url("eval")).get_json("eval.json")["models"]
    mae, mae_init = models["pretrain"], models[inits["mae"]]
    rec = mae["reconstruction"]
    ft_mae, ft_mae_last = last_val_top1(spec, "ft-mae")
    ft_scratch, ft_scratch_last = last_val_top1(spec, "ft-scratch")
    print("LEARNING-SIGNAL", json.dumps({
        "recon": rec, "knn_mae_vs_init": [mae["knn_top1"], mae_init["knn_top1"]],
        "linear_all_labels": {"mae": mae["linear_top1"], "mae_init": mae_init["linear_top1"]},
        "finetune_10pct_mae_vs_scratch": [ft_mae, ft_scratch], "labeled": ft_mae_last["labeled_samples"]}))

    # 1. reconstruction: well below both trivial baselines on held-out images
    assert rec["samples"] == mae["val_samples"] and rec["mask_ratio"] == 0.75 and rec["norm_pix_loss"]
    assert rec["loss"] < 0.8 * rec["baseline_mean_patch"], rec
    assert rec["loss"] < rec["baseline_visible_mean"], rec
    # 2. MAE beats the same encoder at its initial weights on kNN, and random init on a 10%-label fine-tune
    assert mae["knn_top1"] >= mae_init["knn_top1"] + KNN_MARGIN, (mae, mae_init)
    assert ft_mae_last["labeled_samples"] == ft_scratch_last["labeled_samples"] < 0.12 * mae["train_samples"]
    assert ft_mae_last["label_fraction"] == ft_scratch_last["label_fraction"] == 0.1
    assert ft_mae >= ft_scratch + FINETUNE_MARGIN, (ft_mae, ft_scratch)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dino_and_ibot_teacher_cls_tokens_gain_knn_over_their_step0_weights(digits, tmp_path, seed):
    """DINO and iBOT (DINO_STAGE plus IBOT_FIELDS) through one spec (2 workers), scored as they train and as
    main_dino.py evaluates: on the CLS token (the eval stage sets no ``pool``: the exports record ``token``).
    DINO gains DINO_KNN_MARGIN over the step-0 weights (the same for both: iBOT builds its backbone exactly
    as DINO does); iBOT stays within IBOT_KNN_MARGIN of DINO (its patch loss shares the backbone and must not
    cost the image-level features more than that) and gains IBOT_INIT_MARGIN over the step-0 weights."""
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    dino = {**DINO_STAGE, "seed": seed}
    ibot = {**dino, **IBOT_FIELDS, "name": "ibot", "kind": "ibot"}
    init = str(tmp_path / "init-dino" / "export")
    export_initial_encoder(dino, init)
    spec = parse_spec({
        "name": "dino-signal", "storage": str(tmp_path / "runs"),
        "compute": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [{**dino, "data": digits}, {**ibot, "data": digits},
                   {"name": "eval", "kind": "eval", "data": digits, "models": ["dino", "ibot", init],
                    "loader_workers": 0, "probe": {"epochs": 100, "lr": 1e-2}}],
    })
    states = run_spec(spec).states
    assert set(states.values()) == {"done"}, states
    evals = Store(spec.stage_url("eval")).get_json("eval.json")["models"]
    models = {"dino": evals["dino"], "ibot": evals["ibot"], "init": evals[init]}
    knn = {name: m["knn_top1"] for name, m in models.items()}
    print("DINO-SIGNAL", json.dumps({"seed": seed, "knn_cls": knn,
                                     "linear_cls": {name: m["linear_top1"] for name, m in models.items()}}))
    assert {m["pool"] for m in models.values()} == {"token"}
    assert knn["dino"] >= knn["init"] + DINO_KNN_MARGIN, knn
    assert knn["ibot"] >= knn["dino"] - IBOT_KNN_MARGIN, knn
    assert knn["ibot"] >= knn["init"] + IBOT_INIT_MARGIN, knn

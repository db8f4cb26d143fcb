"""Continued self-supervised pretraining on a new domain with PEFT (ExPLoRA-style), slow tier.

Source domain: scikit-learn's 1,797 digits at 16x16, as the learning-signal test. Target domain:
the same digits transformed deterministically so that their pixel statistics clearly differ: inverted
(white background, dark strokes) and Gaussian noise of sigma ``NOISE`` (0.25) on every pixel and channel.

One run spec, each training stage a 1-worker gang:

* ``source``   MAE from scratch on the source digits (``SOURCE_EPOCHS``);
* ``adapt``    MAE continued on the target from ``source`` with ``peft: {lora: {rank: 8}, unfreeze_last: 1}``
               (its first metrics record: the trainable share, at most 15%);
* ``scratch``  MAE from scratch on the target for as many steps as ``adapt`` (printed beside it);
* ``ft-*``     a 10%-label linear fine-tune on the target (the same stratified labels) of each, on the
               mean patch token (``global_pool: avg``: what MAE's loss trains; the exports' own pooling
               is the CLS token, which it barely trains).

Asserted: every stage finishes, the continuation trains at most 15% of the weights (measured 13.0%),
``adapt`` and ``scratch`` ran the same steps, the three fine-tunes used the same labels, and the adapted
encoder beats the unadapted source export on the target fine-tune by ``ADAPT_MARGIN``. Measured with
``.venv/bin/python -m pytest tests/test_domain_shift.py -m slow -s -p no:cacheprovider`` (the
``DOMAIN-SHIFT`` JSON line; 143-144 target labels, 359 val, chance 10%), target 10%-label linear
fine-tune top-1, source / adapt / scratch:

* seed 0: source **31.5%**, adapt **41.8%** (+10.3), scratch 46.5%;
* seed 1 (``SEED = 1``: another val split, labels and noise draw): source **32.3%**, adapt **45.7%** (+13.4),
  scratch 40.7%.

1,320 MAE steps each for source, adapt and scratch (batch 64); 16.8 min per seed with two seeds run side by
side on 2 cores. The same with 30 continuation epochs (660 steps): adapt 38.4% / 35.7% (+7.0 / +3.3). MAE
from scratch on the target at equal steps is as good or better here: the source and target are the same
1,797 digits, so the source has nothing to transfer that the target lacks; what is shown is that a
continuation with 13% of the weights trainable repairs what the shift broke in the source encoder.

Why this target and recipe (measured on the way: these stages and fine-tune, 1 worker, seed 0 unless said):

* A per-image colour (a two-colour gradient or one tint per image, the earlier target) leaves MAE on the
  target nothing to learn at this scale: a logistic regression on the features of MAE trained on it from
  scratch, or continued on it, with 10% of the labels scores 6-8% (below chance), though the same
  encoders score 47-58% on the source digits; their features carry the colour. With it, source 22.0 /
  adapt 13.9 / scratch 11.7 (seed 0), 13.4 / 9.7 / 12.0 (seed 1). Random 90-degree rotations make 6 and 9
  one class (a logistic regression on the raw target pixels: 45% with them, 86-92% without).
* A 20-epoch source (31% on its own domain's fine-tune; logistic regression on its features 54-56%)
  lost little to inversion alone (54%) and gained nothing from continuation on inverted digits with noise
  0.15 (10 epochs). 60 source epochs: 69% (logistic regression) on its own domain. Noise 0.15 with 30
  continuation epochs: source 42.1 / 48.5, adapt 46.2 / 48.5, scratch 44.6 / 45.7 (seeds 0 / 1): no margin
  on seed 1. Noise 0.25 hurts the frozen source more, and a continuation recovers it (one run with another noise
  draw and split: source 24.8, adapt 39.6). A higher continuation lr (1.5e-2, 3e-2) gave less (45.1, 40.7 vs
  47.4).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cluster.storage import Store
from jobs.metrics import read_metrics

SEED = 0
ENCODER = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 12, "embed_dim": 96,
           "num_heads": 3}
MAE = {"kind": "mae", "model": ENCODER, "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 4},
       "mask_ratio": 0.75, "norm_pix_loss": True, "batch_size": 64, "zero_stage": 2, "loader_workers": 0,
       "seed": SEED, "optim": {"base_lr": 6e-3, "warmup_epochs": 1, "weight_decay": 0.05}, "trackers": [],
       "checkpoint": {"every_steps": 100000, "keep_last": 1}}
FINETUNE = {"kind": "finetune", "mode": "linear", "global_pool": "avg", "label_fraction": 0.1, "epochs": 30,
            "batch_size": 16, "zero_stage": 2, "loader_workers": 0, "seed": SEED, "crop_scale": [0.5, 1.0],
            "trackers": [],
            "optim": {"base_lr": 1.6, "warmup_epochs": 2, "weight_decay": 0.05},
            "checkpoint": {"every_steps": 100000, "keep_last": 1}}
SOURCE_EPOCHS, ADAPT_EPOCHS = 60, 60
NOISE = 0.25
ADAPT_MARGIN = 0.05  # adapted vs unadapted source export, 10%-label linear fine-tune on the target (measured
# +10.3 / +13.4 points on seeds 0 / 1: see the module docstring)


def shift(img: np.ndarray, index: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 digit -> the target domain's image (deterministic in ``index``): inverted (white
    background, dark strokes) plus Gaussian noise of sigma ``NOISE`` on every pixel and channel."""
    rng = np.random.default_rng([SEED, index, 0x5817])
    g = 1.0 - img.astype(np.float64) / 255.0
    out = g + rng.normal(0.0, NOISE, g.shape)
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_target(src: str, dest: str) -> str:
    """Every image of the source folder ``src`` shifted into the same class folders under ``dest``."""
    for index, (cls, name) in enumerate(sorted((c, n) for c in os.listdir(src) for n in os.listdir(f"{src}/{c}"))):
        os.makedirs(f"{dest}/{cls}", exist_ok=True)
        img = np.asarray(Image.open(f"{src}/{cls}/{name}").convert("RGB"))
        Image.fromarray(shift(img, index)).save(f"{dest}/{cls}/{name}")
    return dest


@pytest.fixture(scope="module")
def domains(ray_local, tmp_path_factory) -> dict[str, str]:
    """Manifest URLs of the source and target digits, 16x16 PNG shards, 20% val (the same split seed)."""
    from dataprep.digits import write_digits_imagefolder
    from dataprep.prep import PrepOptions, run_prep

    root = tmp_path_factory.mktemp("domains")
    src = write_digits_imagefolder(str(root / "source"), size=16)
    tgt = write_target(src, str(root / "target"))
    opts = PrepOptions(shard_size=200, format="png", val_fraction=0.2, seed=SEED)
    return {name: run_prep(folder, str(root / f"{name}-shards"), opts).manifest_url
            for name, folder in (("source", src), ("target", tgt))}


def records(spec, stage: str) -> list[dict]:
    return read_metrics(Store(spec.stage_url(stage)))


def val_top1(spec, stage: str) -> float:
    return [r for r in records(spec, stage) if "val_top1" in r][-1]["val_top1"]


@pytest.mark.slow
def test_peft_mae_continuation_on_a_shifted_domain_beats_the_unadapted_source_on_a_low_label_finetune(domains,
                                                                                                       tmp_path):
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    peft = {"lora": {"rank": 8}, "unfreeze_last": 1}
    stages = [{**MAE, "name": "source", "data": domains["source"], "epochs": SOURCE_EPOCHS},
              {**MAE, "name": "adapt", "data": domains["target"], "init": "source", "peft": peft,
               "epochs": ADAPT_EPOCHS},
              {**MAE, "name": "scratch", "data": domains["target"], "epochs": ADAPT_EPOCHS}]
    stages += [{**FINETUNE, "name": f"ft-{s['name']}", "data": domains["target"], "init": s["name"]} for s in stages]
    spec = parse_spec({"name": "shift", "storage": str(tmp_path / "runs"),
                       "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0}, "stages": stages})
    states = run_spec(spec).states
    assert set(states.values()) == {"done"}, states

    first = records(spec, "adapt")[0]
    share = first["trainable_params"] / first["total_params"]
    top1 = {name: val_top1(spec, f"ft-{name}") for name in ("source", "adapt", "scratch")}
    steps = {name: records(spec, name)[-1]["step"] for name in ("adapt", "scratch")}
    labeled = {name: records(spec, f"ft-{name}")[-1]["labeled_samples"] for name in top1}
    print("DOMAIN-SHIFT", json.dumps({"trainable_share": share, "finetune_10pct_target_top1": top1,
                                      "mae_steps": steps, "labeled": labeled}))
    assert share <= 0.15, first
    assert steps["adapt"] == steps["scratch"] and len(set(labeled.values())) == 1
    assert top1["adapt"] >= top1["source"] + ADAPT_MARGIN, top1

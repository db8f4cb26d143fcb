"""Patch-level learning signal on the generated shapes set, through ``run_spec`` (slow tier).

Textured shapes with pixel masks (``tests/_shapes.py``), prepped with ``masks:``; DINO and iBOT on the
same encoder (with 2 register tokens), head, crops and number of steps; ``eval`` with ``dense:`` scores
the patch tokens of both exports and of the encoder at its step-0 weights (the same for both methods:
iBOT builds its backbone exactly as DINO does) with a linear patch probe (mIoU on val), and counts the
high-norm patch tokens of each model.

Measured with ``.venv/bin/python -m pytest tests/test_ibot_quality.py -m slow -s -p no:cacheprovider``
(the ``IBOT-QUALITY`` JSON line). The margins are the bar iBOT must clear; the last measurement (in the
xfail reason) did not clear it, so the test is a strict xfail until it does. Also tried (2026-12-03): the
one-layer head that makes DINO's CLS token learn on the digits (``head: {layers: 1}`` for both methods):
mIoU ibot 0.370, dino 0.358, step-0 0.360; image kNN ibot 0.475, dino 0.625, step-0 0.667. No
patch-level gain either, so the recipe stays.

Also tried (2026-12-03, ibot only, one worker, the same data and eval; mIoU with this test's probe / with a
converged probe of 100 epochs at lr 1e-2): this recipe 0.365 / 0.493; ``centering: sinkhorn`` 0.361 / 0.494;
sinkhorn + ``koleo_weight: 0.1`` + 256 prototypes + masks of 10-50% on every image 0.358 / 0.500 (the same
without blur or solarize 0.357 / 0.500); the patch loss alone (``cls_weight: 0``) with sinkhorn 0.370 / 0.491,
with a sharper patch teacher (0.02) and lr 1e-2 0.378 / 0.487, 400 steps 0.384 / 0.468, the same with EMA
centering 0.386 / 0.486 (its patch loss collapses to one prototype). Step-0 weights: 0.360 / 0.487. What it
shows: (1) the bar is reachable by a linear patch probe, a hand-made feature (|FFT| of each 4x4 patch) scores
0.694 / 0.816 (raw patch pixels 0.295); (2) this test's probe is under-trained, the step-0 weights gain 0.13
from a longer probe, as much as the margin asked for; (3) with a converged probe no recipe tried beats the
step-0 weights: the CLS teacher's outputs collapse to one point for every image (mean cosine 0.93-0.997, loss
ln K, Sinkhorn included: the same output for every sample still gives uniform targets) and drag the shared
head MLP with them; without the CLS loss the patch loss falls (to 4.25 at 400 steps) but the patch embedding
moves 1.5% in 200 steps.

Since 2026-12-03 ``dense:`` reads whole images (``crop_pct: 1.0``; the export's 0.875 crop resized these 32 px
images to 36 px, blurring the 2 px stripes that tell the classes apart) and fits its probe to convergence
(L-BFGS); this test then measured mIoU ibot 0.761, dino 0.751, step-0 0.753 (image kNN 0.417 / 0.567 / 0.667),
against 0.365 / 0.366 / 0.360 under the old probe. Also tried with that probe (in-process, one thread, the same
generator and model; L-BFGS mIoU of the teacher): base_lr 2e-2 0.713 after 250 steps (step-0 0.759: training
lowers it); stripes twice as wide (period 8) 0.515 vs step-0 0.520 (DINO 0.512; 400 steps 0.514, base_lr 2e-2
0.499); pixel noise sigma 80 added, base_lr 2e-2, 400 steps 0.427 vs step-0 0.424 (DINO 0.419), where a 3x3
neighbourhood of |FFT| features reaches 0.74: context would pay, and neither method learns it. What it shows: a
random ViT's patch tokens are strong random texture features on this set (|FFT| of each patch, 0.86, is the
ceiling found), and at 200-400 CPU steps both CLS losses sit at ln K from the first steps (DINO's gradient norm ~0.03):
the patch loss alone moves the tokens, not toward the classes. Ten times the steps (2,000, this recipe, in-process,
L-BFGS mIoU of the teacher at 500 / 1,000 / 1,500 / 2,000): ibot 0.747 / 0.740 / 0.777 / 0.781 (student 0.794;
its CLS loss leaves ln K after ~1,000 steps, 6.62 at the end), dino 0.760 / 0.758 / 0.753 / 0.754 (at ln K
throughout), step-0 0.759; with noise sigma 80 and base_lr 2e-2 ibot falls, 0.392 / 0.380 at 500 / 1,000 (step-0
0.424). So iBOT's patch tokens do pull ahead of DINO's once its CLS loss moves (+2.7 at 2,000 steps), by less than
the bar, at 23 CPU minutes per run.

Also tried (2026-12-04, in-process, one thread, 480 train / 120 val images of this generator, L-BFGS mIoU of the
teacher, base_lr 2e-2 unless said): narrower encoders weaken the random features, step-0 0.709 / 0.561 / 0.497 /
0.427 at embed_dim 96 / 48 / 32 / 24, but iBOT barely moves them: embed_dim 48 at 5e-3 0.572 / 0.569 / 0.568 at
200 / 400 / 600 steps; embed_dim 32 at 5e-3 0.508 / 0.505 / 0.504, at 2e-2 0.529 / 0.530 / 0.529; every image
masked 10-50% 0.513 / 0.510 / 0.511 (the patch loss then sits at 6.43 of ln 1024 = 6.93); a patch head with its own MLP
(DINOv2's ``ibot.separate_head``) 0.512 / 0.515 / 0.512, masked 10-50% 0.505 / 0.498. A variant where every 4x4
block of a shape and of the background has its own colour (so a masked block's colour cannot be told from its
neighbours, only its texture): step-0 0.466 (embed_dim 32), iBOT 0.469 / 0.461 / 0.462 at 200 / 400 / 600, DINO
0.496 / 0.502 / 0.502 (CLS loss at ln K throughout), iBOT with KoLeo 0.1 and Sinkhorn 0.465 / 0.457 / 0.452 at
400 / 800 / 1,200, with 64 prototypes for both heads 0.441 / 0.435 / 0.435. The same encoder trained *supervised*
on the patch labels (AdamW 1e-3, 32 images a step, no augmentation) reaches 0.812 / 0.870 after 100 / 200 steps
(the block-colour variant 0.820 / 0.872 / 0.892 at 100 / 200 / 300): the encoder and the probe can express the
bar within a few hundred steps; what is missing at CPU scale is a self-supervised signal that points at the
textures (both CLS losses stay at ln K; the patch loss is met by colour and position). ``bench/dense_signal.py``
packages this in-process run; its batch order differs from the one these figures came from, and it reproduces
them within about 0.02 (embed_dim 32, base_lr 2e-2: DINO 0.501 / 0.501 / 0.501 at 200 / 400 / 600, iBOT 0.521 /
0.522 at 200 / 400, block colours DINO 0.496 / 0.502 / 0.501 and iBOT 0.471 / 0.467; ``--supervised`` 0.782 /
0.864 / 0.875 at 100 / 200 / 300, block colours 0.817 / 0.865 / 0.879).

Why the CLS losses sit at ln K (2026-12-04, embed_dim 32, base_lr 2e-2, 600 images; mean cosine of the
student's CLS features over 256 images, 0.943 at step 0): it is the same for every image within the
first steps, 0.997 at step 6 for DINO (0.991 for iBOT), while the learning rate is still warming up; the
teacher follows (0.997 by step 41) and the targets turn uniform (entropy 6.92 of ln K = 6.93 at step
100: the collapse warning of ``jobs/_collapse.py`` fires at step 96 for DINO, 133 for iBOT). Neither
the center nor the rate causes it: Sinkhorn centering collapses as fast (0.982 at step 6), a 300-step
warm-up at base_lr 5e-3 a little later (0.985 at step 41); without the CLS loss the features stay
apart (0.94 at step 300). The default views leave a random encoder nothing to match between two crops
of these images: without the photometric augmentations, local crops 0 and ``global_scale: [0.9,
1.0]`` the CLS loss leaves ln K (iBOT 4.78 at 300 steps, the features' cosine 0.57), but the patch
tokens do not gain (teacher mIoU 0.490 / 0.481 at 300 / 600, step-0 0.497), and iBOT's patch targets
drift towards uniform as well (entropy 5.48 at step 1, 6.35 at 300 of ln 1024; 6.75 at 200 with the
weak views). A sharper patch teacher (``teacher_patch_temp: 0.04``) gives 0.524 / 0.521 / 0.519 at 200 /
400 / 600 (0.497 / 0.477 / 0.479 with the weak views); ``koleo_weight: 1.0`` spreads the CLS features
(cosine 0.14 at 600) but the head still maps them to uniform targets (entropy 6.91) and the patch
tokens lose (0.484 / 0.439 / 0.434). Longer, on 2,000 images (``--images 2000 --steps 3000``): 0.482 at
step 0, 0.491 / 0.498 / 0.506 / 0.495 / 0.490 / 0.491 every 500 steps, the CLS loss 6.9316 throughout.

Twenty times this test's steps (2026-12-07, ``bench/dense_signal.py --kind ibot|dino --steps 4000 --eval-every
1000``: this recipe and width 96, one thread each, 480 train / 120 val images; L-BFGS mIoU of the teacher at
1,000 / 2,000 / 3,000 / 4,000 steps): step-0 0.709; DINO 0.711 / 0.706 (its CLS loss at ln K, 6.9315, from step
~120 on; the run was stopped there); iBOT 0.689 / 0.772 / 0.788 / 0.792 (student 0.685 / 0.774 / 0.788 /
0.790), its CLS loss 6.66 / 6.35 / 6.07 / 5.94 and the CLS features' cosine between images 0.80 / 0.39 / 0.29 /
0.28. So once iBOT's CLS loss leaves ln K its patch tokens clear the DINO half of the bar (+6.6 at 2,000 steps,
+8.6 at 4,000 against DINO's 2,000-step 0.706) but not the step-0 half (+8.3 at 4,000, the gain flattening:
+1.6 from 2,000 to 3,000, +0.4 from 3,000 to 4,000); a 4,000-step pair through this test (2 workers) would take
about 80 minutes of this machine. A width-96 run of tens of thousands of steps is ``--device cuda`` work.
Also tried then (600 steps): teacher momentum 0.9 with the patch loss alone (width 32: its targets collapse
to one prototype, 0.502 vs step-0 0.497) or with 40-60% masks on every image (0.531 at 200, uniform collapse
at step 472); ``head: {use_bn: true}`` for both methods (the CLS features' cosine still 0.99); and a set where
a patch's class needs context (2x2 mosaics of held-out digit scans, every pixel of a cell labelled with its
digit, 11 classes): step-0 0.149, supervised 0.38 at 300 steps, DINO 0.154 and iBOT 0.159 at 600.
"""

from __future__ import annotations

import json

import pytest
import torch

from _shapes import write_shapes
from cluster.storage import Store

SEED = 0
ENCODER = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96,
           "num_heads": 3, "reg_tokens": 2}
COMMON = {
    "model": ENCODER, "head": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64}, "local_crops": 2,
    "max_steps": 200, "batch_size": 32, "zero_stage": 2, "loader_workers": 0, "seed": SEED,
    "optim": {"base_lr": 5e-3, "warmup_steps": 20}, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0, "teacher_momentum": 0.99, "export_from": "teacher",
    "checkpoint": {"every_steps": 100000, "keep_last": 1},
}
IBOT = {"patch_out_dim": 1024, "mask_ratio": [0.0, 0.3], "mask_ratio_var": [0.0, 0.2]}
MIOU_MARGIN_DINO, MIOU_MARGIN_INIT = 0.05, 0.10  # the bar iBOT has to clear (issue #17), not yet reached


def export_initial_encoder(stage: dict, dest: str) -> None:
    from jobs.export import export_encoder
    from jobs.stage import make_method, stage_config_class

    cfg = stage_config_class(stage["kind"]).model_validate({**stage, "data": "/unused"})
    torch.manual_seed(cfg.seed)
    method = make_method(cfg, 0)
    export_encoder(method.encoder(method.build_model()), cfg.model, dest)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured on this recipe (2026-12-03, converged whole-image probe): patch-probe "
                   "mIoU ibot 0.761, dino 0.751, step-0 0.753 (both CLS losses at ln K): the patch-level gain is not "
                   "reproduced yet (at 4,000 steps, in the bench, iBOT clears DINO by +8.6 and step-0 by only +8.3: "
                   "see the docstring); strict, so the test reports once iBOT clears the bar")
def test_ibot_patch_tokens_segment_shapes_better_than_dino_and_step0_weights(ray_local, tmp_path):
    from dataprep.prep import PrepOptions, run_prep
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    images, masks = write_shapes(str(tmp_path / "shapes"), count=600, size=32, seed=SEED)
    data = run_prep(images, str(tmp_path / "data"), PrepOptions(format="png", masks=masks, val_fraction=0.2,
                                                                shard_size=200, seed=SEED)).manifest_url
    dino = {**COMMON, "name": "dino", "kind": "dino", "data": data}
    ibot = {**COMMON, **IBOT, "name": "ibot", "kind": "ibot", "data": data}
    init = str(tmp_path / "init" / "export")
    export_initial_encoder(dino, init)
    spec = parse_spec({
        "name": "shapes", "storage": str(tmp_path / "runs"),
        "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [dino, ibot, {"name": "eval", "kind": "eval", "data": data, "models": ["dino", "ibot", init],
                                "loader_workers": 0, "probe": {"epochs": 20}, "dense": {}}],
    })
    states = run_spec(spec).states
    assert set(states.values()) == {"done"}, states
    models = Store(spec.stage_url("eval")).get_json("eval.json")["models"]
    dense = {name: models[key]["dense"] for name, key in (("dino", "dino"), ("ibot", "ibot"), ("init", init))}
    print("IBOT-QUALITY", json.dumps({name: {"miou": d["miou"], "high_norm": d["high_norm"]["count"],
                                             "tokens": d["high_norm"]["tokens"], "knn": models[k]["knn_top1"]}
                                      for (name, d), k in zip(dense.items(), ("dino", "ibot", init))}))
    for d in dense.values():  # with reg_tokens: 2 the high-norm count is computed for every model
        assert d["high_norm"]["tokens"] == 120 * 64 and d["high_norm"]["count"] >= 0
    assert dense["ibot"]["miou"] >= dense["dino"]["miou"] + MIOU_MARGIN_DINO, dense
    assert dense["ibot"]["miou"] >= dense["init"]["miou"] + MIOU_MARGIN_INIT, dense

"""How fast a method's patch tokens learn the generated shapes' classes: the dense learning-signal probe.

Trains ``kind: dino`` or ``kind: ibot`` in process (the method's own ``step`` / ``after_step``, its
parameter groups, last-layer freeze, weight-decay schedule, DINO's per-parameter clipping at 3.0 and the
engine's warm-up + cosine learning rate) on ``tests/_shapes.py`` images, one process, no Ray, no
DeepSpeed, and every ``--eval-every`` steps scores the patch tokens of the teacher and of the student as
``eval``'s ``dense:`` section does (whole 32 px images, majority patch labels, L-BFGS logistic
regression on the standardised train tokens, mIoU on val), with the losses, the teacher targets'
entropies (``jobs/_collapse.py``) and the mean cosine of the CLS features between images.
``--supervised`` instead trains the same encoder on the patch labels themselves (AdamW, a linear head,
no augmentation): how fast the encoder *can* learn what the probe measures. The numbers recorded in
``tests/test_ibot_quality.py`` come from this script. Prints one line per evaluation and a final JSON line.

    python bench/dense_signal.py --kind ibot --steps 600 --embed-dim 32 --heads 2 --base-lr 2e-2
    python bench/dense_signal.py --kind dino --steps 600 --colour-cell 4 --embed-dim 32 --heads 2
    python bench/dense_signal.py --supervised --steps 300 --embed-dim 32 --heads 2
    python bench/dense_signal.py --kind ibot --set '{"koleo_weight": 0.1, "centering": "sinkhorn"}'
    python bench/dense_signal.py --kind ibot --steps 20000 --eval-every 2000 --device cuda  # a GPU session

About 4 steps/s at embed_dim 32 on one CPU thread: the long runs the patch-level question needs
(tens of thousands of steps) are for ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from _shapes import shape_sample  # noqa: E402

from dataprep.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from jobs._engine_config import lr_at  # noqa: E402
from jobs._grad_clip import clip_grad_per_param  # noqa: E402
from jobs._eval_dense import majority_patch_labels, miou  # noqa: E402
from jobs._probe import Features, fit_logistic_lbfgs  # noqa: E402
from jobs.stage import make_method, stage_config_class  # noqa: E402

BATCH, CLASSES, CLIP = 32, 4, 3.0


class Shapes:
    """``n`` generated images (uint8 [N, 3, S, S]) and patch labels, split 80 / 20 into train / val."""

    def __init__(self, n: int, seed: int, colour_cell: int | None, patch: int, device: str = "cpu") -> None:
        rng = np.random.default_rng(seed)
        pairs = [shape_sample(32, rng, colour_cell) for _ in range(n)]
        self.images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
        labels = majority_patch_labels(torch.from_numpy(np.stack([p[1] for p in pairs])).long(), patch)
        self.train = int(n * 0.8)
        self.labels = labels
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        self.device = torch.device(device)

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32 on the run's device."""
        return ((x.float() - self.mean) / self.std).to(self.device)


@torch.no_grad()
def dense_miou(vit: torch.nn.Module, data: Shapes) -> float:
    """``eval``'s dense probe on ``vit``'s patch tokens: L-BFGS on train, mIoU on val."""
    vit.eval()
    pre = vit.num_prefix_tokens
    images = data.normalised(data.images)
    tokens = torch.cat([vit.forward_features(images[i:i + 256])[:, pre:] for i in range(0, len(images), 256)])
    d, n = tokens.shape[-1], data.train
    probe = fit_logistic_lbfgs(Features(tokens[:n].reshape(-1, d), data.labels[:n].flatten()), CLASSES,
                               device=data.device)
    return round(miou(probe(tokens[n:].reshape(-1, d)).cpu(), data.labels[n:].flatten(), CLASSES)[0], 4)


@torch.no_grad()
def cls_cosine(vit: torch.nn.Module, data: Shapes) -> float:
    """Mean pairwise cosine of ``vit``'s CLS features over the first 256 images: ~1 when every image
    gets the same output (the collapse behind a CLS loss at ln K)."""
    vit.eval()
    f = F.normalize(vit(data.normalised(data.images[:256])), dim=-1)
    return round(float((f @ f.T).mean()), 4)


def stage_for(args: argparse.Namespace) -> dict:
    stage = {"name": args.kind, "kind": args.kind, "data": "/unused", "seed": args.seed, "batch_size": BATCH,
             "model": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": args.patch, "depth": args.depth,
                       "embed_dim": args.embed_dim, "num_heads": args.heads, "reg_tokens": 2},
             "head": {"out_dim": args.out_dim, "hidden_dim": 256, "bottleneck_dim": 64}, "local_crops": 2,
             "max_steps": max(1, args.steps), "optim": {"base_lr": args.base_lr, "warmup_steps": 20},
             "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
             "teacher_momentum": 0.99, "export_from": "teacher"}  # tests/test_ibot_quality.py's recipe
    if args.kind == "ibot":
        stage.update({"patch_out_dim": args.out_dim, "mask_ratio": [0.0, 0.3], "mask_ratio_var": [0.0, 0.2]})
    return {**stage, **json.loads(args.set)}


def epoch_batches(n: int, seed: int):
    """Index batches of ``BATCH`` over seeded permutations of ``range(n)``, epoch after epoch."""
    epoch, left = 0, []
    while True:
        while len(left) < BATCH:
            left += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
            epoch += 1
        yield left[:BATCH]
        left = left[BATCH:]


def train_ssl(args: argparse.Namespace, data: Shapes) -> list[list]:
    cfg = stage_config_class(args.kind).model_validate(stage_for(args))
    torch.manual_seed(cfg.seed)
    method = make_method(cfg, 0)
    model = method.build_model().to(data.device)
    method.set_run_length(max(1, args.steps), data.train // BATCH)
    transform = method.train_transform()
    opt = torch.optim.AdamW(method.param_groups(model, cfg.optim), lr=0.0, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)
    peak = cfg.optim.base_lr * BATCH / 256
    curve = [[0, dense_miou(method.teacher.backbone, data), None]]
    print("step 0 teacher mIoU", curve[0][1], flush=True)
    batches, losses, t0 = epoch_batches(data.train, cfg.seed), [], time.time()
    for step in range(args.steps):
        idx = next(batches)
        views = [transform(data.images[i], random.Random(cfg.seed * 10**7 + step * 100 + k)) for k, i in enumerate(idx)]
        batch = {"image": [torch.stack(v).to(data.device) for v in zip(*views)], "index": torch.tensor(idx)}
        model.train()
        loss, metrics = method.step(model, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_per_param(model.parameters(), CLIP)
        lr, wd, frozen = lr_at(step, args.steps, 20, peak, cfg.optim.min_lr), method.weight_decay_at(step), \
            method.frozen_groups(step)
        for group in opt.param_groups:
            group["lr"] = 0.0 if group.get("name") in frozen else lr
            if group.get("weight_decay", 0) > 0:
                group["weight_decay"] = wd
        opt.step()
        method.after_step(model, step)
        losses.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append([step + 1, dense_miou(method.teacher.backbone, data), dense_miou(model.backbone, data)])
            parts = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("loss", "entropy"))}
            cosines = cls_cosine(method.teacher.backbone, data), cls_cosine(model.backbone, data)
            print(f"step {step + 1} loss {np.mean(losses[-args.eval_every:]):.4f} {parts} mIoU teacher "
                  f"{curve[-1][1]} student {curve[-1][2]}, CLS cosine teacher {cosines[0]} student {cosines[1]} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return curve


def train_supervised(args: argparse.Namespace, data: Shapes) -> list[list]:
    cfg = stage_config_class("dino").model_validate(stage_for(argparse.Namespace(**{**vars(args), "kind": "dino"})))
    torch.manual_seed(cfg.seed)
    vit = make_method(cfg, 0).build_model().backbone.to(data.device)
    head = torch.nn.Linear(vit.embed_dim, CLASSES).to(data.device)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    curve = [[0, dense_miou(vit, data), None]]
    for step in range(args.steps):
        vit.train()
        idx = torch.randint(0, data.train, (BATCH,), generator=g)
        out = head(vit.forward_features(data.normalised(data.images[idx]))[:, vit.num_prefix_tokens:])
        loss = F.cross_entropy(out.reshape(-1, CLASSES), data.labels[idx].flatten().to(data.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append([step + 1, dense_miou(vit, data), None])
            print(f"step {step + 1} loss {loss.item():.4f} mIoU {curve[-1][1]}", flush=True)
    return curve


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kind", choices=("dino", "ibot"), default="ibot")
    ap.add_argument("--supervised", action="store_true", help="train the encoder on the patch labels instead")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--images", type=int, default=600, help="generated images (80%% train, 20%% val)")
    ap.add_argument("--colour-cell", type=int, default=None, help="one colour per N x N block (tests/_shapes.py)")
    ap.add_argument("--embed-dim", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=1024, help="prototypes of the CLS head (and of the patch head)")
    ap.add_argument("--base-lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the model trains and the probe fits (e.g. cuda)")
    ap.add_argument("--set", default="{}", help="JSON of further stage fields, e.g. '{\"koleo_weight\": 0.1}'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Shapes(args.images, args.seed, args.colour_cell, args.patch, args.device)
    t0 = time.time()
    curve = train_supervised(args, data) if args.supervised else train_ssl(args, data)
    result = {"args": vars(args), "curve": curve, "seconds": round(time.time() - t0), "load": os.getloadavg()[0]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

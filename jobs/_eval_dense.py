"""``kind: eval``'s ``dense:`` section: what a frozen ViT's *patch tokens* know, per model.

    - {name: report, kind: eval, data: shapes, models: [ibot, dino], dense: {}}

1. ``patch_probe`` (needs a prep with ``masks:``): the train and val splits through the eval
   transform, each mask moved with its image (NEAREST) and reduced to the patch grid by majority
   vote over each patch's pixels (ties: the smaller class); a linear classifier on the frozen,
   standardised patch tokens (``forward_features``' output without the prefix tokens) is trained
   on the train tokens: by default multinomial logistic regression to convergence (full-batch
   L-BFGS, scikit-learn's objective at ``C``; a minibatch probe stops while its score still climbs and
   then measures the probe's schedule, not the tokens), or ``solver: adamw`` as the image probe
   (AdamW, cosine, seeded) when the tokens do not fit in memory. The images are read whole
   (``crop_pct: 1.0``: resized to the model's input, no classification crop). Reported:
   per-class IoU and their mean (**mIoU**, at the patch grid) on the val tokens, and patch accuracy.
   A class absent from both the val targets and the predictions is left out of the mean.
   ``ignore_index`` (void / unlabelled pixels, as mmsegmentation's): those pixels do not vote, and a
   patch of nothing else is in neither the probe's training nor the scores; when it is the largest
   mask value (VOC's 255) it is not counted as a class.
2. ``high_norm_tokens``: on the val split, the count of patch tokens whose L2 norm is more than
   ``high_norm_factor`` (default 4) times the median patch-token norm of that model: the
   high-norm "artefact" tokens that register tokens remove (Darcet et al. 2023, "Vision
   Transformers Need Registers", whose outliers sit about an order of magnitude above the rest).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from jobs._probe import Features, fit_linear, fit_logistic_lbfgs
from jobs.config.evaluate import DenseConfig, ProbeConfig  # noqa: F401  (re-exported)


def majority_patch_labels(masks: torch.Tensor, patch: int, ignore: int | None = None) -> torch.Tensor:
    """[N, H, W] classes -> [N, (H/p) * (W/p)]: each patch's most frequent class (ties: the smallest).
    ``ignore``: that value's pixels do not vote; a patch of nothing else gets ``ignore``."""
    n, h, w = masks.shape
    blocks = masks.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).flatten(3)  # [N,h,w,p*p]
    classes = max(int(masks.max()), -1 if ignore is None else ignore) + 1
    counts = F.one_hot(blocks.long(), classes).sum(dim=3)  # [N, h, w, C]
    if ignore is None:
        return counts.argmax(dim=-1).flatten(1)  # argmax takes the first (smallest) class on ties
    void = counts[..., ignore] == patch * patch
    counts[..., ignore] = -1
    return torch.where(void, ignore, counts.argmax(dim=-1)).flatten(1)


@torch.no_grad()
def patch_tokens(model: torch.nn.Module, loader, device: torch.device, max_images: int | None = None,
                 plan: Any = None, ignore: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, L, D], patch labels [N, L]) of every unpadded sample of ``loader`` (a masks loader).

    ``plan`` (a :class:`~jobs._channels.ChannelPlan`): the data channels the model reads. A ChannelViT
    gives ``k x L`` tokens for ``k`` channels; a patch's token is then the mean of its ``k`` channel
    tokens, so the probe sees one token per image patch, whatever the number of channels."""
    model.eval()
    patch = model.patch_embed.patch_size[0]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    xs, ys, seen = [], [], 0
    for batch in loader:
        keep = ~batch["pad"]
        images = batch["image"][keep] if plan is None else plan.select(batch["image"][keep])
        out = model.forward_features(images.to(device))[:, prefix:]  # [B, L, D], a ChannelViT [B, k*L, D]
        grid = (images.shape[-2] // patch) * (images.shape[-1] // patch)
        if out.shape[1] != grid:
            out = out.reshape(out.shape[0], out.shape[1] // grid, grid, out.shape[2]).mean(dim=1)
        xs.append(out.float().cpu())
        ys.append(majority_patch_labels(batch["mask"][keep], patch, ignore))
        seen += int(keep.sum())
        if max_images is not None and seen >= max_images:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:max_images], y[:max_images]) if max_images else (x, y)


def miou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[float, list[float | None]]:
    """Mean IoU over the classes present in ``target`` or ``pred`` (per-class IoU, None where absent)."""
    ious: list[float | None] = []
    for c in range(classes):
        p, t = pred == c, target == c
        union = int((p | t).sum())
        ious.append(None if union == 0 else int((p & t).sum()) / union)
    present = [i for i in ious if i is not None]
    return (sum(present) / len(present) if present else 0.0), ious


def labelled(tokens: torch.Tensor, labels: torch.Tensor, ignore: int | None) -> Features:
    """Tokens [N, L, D] and patch labels [N, L] as flat Features, without the ``ignore`` patches."""
    x, y = tokens.reshape(-1, tokens.shape[-1]), labels.flatten()
    if ignore is None:
        return Features(x, y)
    keep = y != ignore
    return Features(x[keep], y[keep])


def high_norm_tokens(tokens: torch.Tensor, factor: float) -> dict[str, Any]:
    """Patch tokens [N, L, D] whose norm exceeds ``factor`` x the median norm: how many, of how many."""
    norms = tokens.norm(dim=-1).flatten()
    median = float(norms.median())
    count = int((norms > factor * median).sum())
    return {"count": count, "tokens": int(norms.numel()), "fraction": count / max(1, norms.numel()),
            "median_norm": median, "max_norm": float(norms.max()), "threshold": factor * median}


def dense_report(model: torch.nn.Module, cfg: DenseConfig, loaders: dict[str, Any], classes: int, seed: int,
                 device: torch.device, plan: Any = None) -> dict[str, Any]:
    """The ``dense`` entry of one model in ``eval.json``; ``loaders``: ``train`` / ``val`` mask loaders;
    ``plan``: the channels the model reads (eval's ``channels:``)."""

    ignore = cfg.ignore_index
    train_x, train_y = patch_tokens(model, loaders["train"], device, cfg.max_train_images, plan, ignore)
    val_x, val_y = patch_tokens(model, loaders["val"], device, plan=plan, ignore=ignore)
    train, val = (labelled(x, y, ignore) for x, y in ((train_x, train_y), (val_x, val_y)))
    if ignore is not None and ignore == classes - 1:  # a void value above every class (255): not a class
        classes = 1 + max((int(f.y.max()) for f in (train, val) if f.y.numel()), default=0)
    if not train.y.numel() or not val.y.numel():
        raise ValueError(f"dense: every {'train' if not train.y.numel() else 'val'} patch is ignore_index "
                         f"{ignore}: nothing to fit or score; check the masks or ignore_index")
    if cfg.solver == "lbfgs":
        predict = fit_logistic_lbfgs(train, classes, *cfg.lbfgs(), device=device)
    else:
        predict = fit_linear(train, classes, cfg.adamw(), seed, device)
    pred = predict(val.x)
    mean, per_class = miou(pred, val.y, classes)
    return {"miou": mean, "iou_per_class": per_class, "patch_accuracy": float((pred == val.y).float().mean()),
            "train_tokens": int(train.y.numel()), "val_tokens": int(val.y.numel()), "classes": classes,
            "ignore_index": ignore,
            "high_norm": high_norm_tokens(val_x, cfg.high_norm_factor)}

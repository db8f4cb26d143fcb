"""Mixup / cutmix as a batch transform of the loader, keyed by (seed, epoch, sample id).

The rule (a pure function of the data's per-shard counts, the served ids, ``seed``, ``epoch`` and
the sample id; never of the step, the rank, the batch or the world size):

* **partner**: within each shard, the served ids of that shard are permuted by a generator seeded
  by (seed, epoch, shard); sample ``i`` (the k-th served id of its shard) mixes with the k-th id
  of the permutation. Every sample is a partner exactly once per epoch (as timm's batch flip), a
  sample may draw itself (it is then unchanged). The partner is read from the same shard the
  loader is reading anyway and gets its own augmentation, the crop it gets as itself:
  ``sample_seed(seed, epoch, partner)``. Each sample is decoded and augmented twice per epoch.
* **lambda and mode**: per sample (timm's ``elem`` mode), from ``random.Random`` seeded by
  ``sample_seed(seed, epoch, id) ^ MIX_TAG``: with probability ``1 - prob`` no mixing (lambda 1);
  else cutmix when only ``cutmix`` is on, or both are on and a draw is ``< switch_prob``, mixup
  otherwise; lambda ~ Beta(alpha, alpha). Cutmix pastes the partner's box (timm's ``rand_bbox``:
  side ``sqrt(1 - lambda)``, centre uniform, clipped) and lambda becomes the area kept.
* **targets**: the caller mixes its per-sample targets with the batch's ``mix_lam``:
  ``lam * y(i) + (1 - lam) * y(partner)``, using ``partner_label`` / ``partner_index``.

So the mixed image of (epoch, sample) is the same on any number of ranks, any batch size and
any batch split, and a ``teacher_outputs`` stage that reads the shard with the same rule sees the
very image the student will see (``jobs/teacher_cache.py``). This module imports no torch: it
works on the loader's tensors through their methods.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from dataprep._order import sample_seed, shard_offsets

MIX_TAG = 0x6D69_7875_7063  # separates the mixing draws from the augmentation's, seeded by the same numbers
_PARTNER_TAG = 0x7061_7274


class MixFields(BaseModel):
    """A training stage's mixup / cutmix fields (off by default); see :mod:`dataprep.mixing`."""

    mixup: float | None = Field(default=0.0, ge=0, description="mixup alpha; 0 disables")
    cutmix: float | None = Field(default=0.0, ge=0, description="cutmix alpha; 0 disables")
    mix_prob: float = Field(default=1.0, ge=0, le=1, description="share of samples mixed")
    switch_prob: float = Field(default=0.5, ge=0, le=1, description="cutmix instead of mixup when both are on")

    def mix(self, seed: int) -> "Mix | None":
        """The loader's :class:`Mix` for these fields, None when mixing is off."""
        m = Mix(float(self.mixup or 0.0), float(self.cutmix or 0.0), self.mix_prob, self.switch_prob, int(seed))
        return m if m.enabled else None


@dataclass(frozen=True)
class Mix:
    """Mixup / cutmix settings of a loader (alphas 0: off)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def recipe(self) -> dict[str, Any]:
        """What shapes the mixed image (compared between a cache and its student)."""
        return {k: v for k, v in asdict(self).items() if k != "seed"}


def partner_table(counts: Sequence[int], seed: int, epoch: int, keep: np.ndarray | None = None) -> np.ndarray:
    """The partner id of every sample id of epoch ``epoch`` (``-1`` for ids not served; ``keep``: the served mask)."""
    offsets = shard_offsets(counts)
    table = np.full(int(offsets[-1]), -1, np.int64)
    for shard in range(len(counts)):
        members = np.arange(offsets[shard], offsets[shard + 1], dtype=np.int64)
        if keep is not None:
            members = members[keep[members]]
        if len(members):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [_PARTNER_TAG, seed & 0xFFFFFFFF, seed >> 32, epoch, shard])))
            table[members] = members[rng.permutation(len(members))]
    return table


def sample_mix(mix: Mix, epoch: int, sample_id: int, height: int, width: int) -> tuple[float, tuple[int, ...] | None]:
    """(lambda, cutmix box ``(y0, y1, x0, x1)`` or None) of one sample: the rule in the module docstring."""
    rng = random.Random(sample_seed(mix.seed, epoch, sample_id) ^ MIX_TAG)
    if rng.random() >= mix.prob:
        return 1.0, None
    use_cutmix = mix.cutmix > 0 and (mix.mixup <= 0 or rng.random() < mix.switch_prob)
    alpha = mix.cutmix if use_cutmix else mix.mixup
    lam = rng.betavariate(alpha, alpha)
    if not use_cutmix:
        return lam, None
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)


def mix_images(images: Any, partners: Any, ids: Sequence[int], epoch: int, mix: Mix) -> tuple[Any, list[float]]:
    """A batch ``[N, C, H, W]`` mixed with its partners' images ``[N, C, H, W]``; returns (images, lambdas).
    Each row depends only on its own (seed, epoch, id) and its partner's image."""
    if not hasattr(images, "shape") or len(images.shape) != 4 or not images.is_floating_point():
        raise TypeError("mixup/cutmix needs one float image tensor [N, C, H, W] per batch (a single-view transform "
                        f"that normalises), got {type(images).__name__}")
    h, w = int(images.shape[-2]), int(images.shape[-1])
    out, lams = images.clone(), []
    for row, sid in enumerate(ids):
        lam, box = sample_mix(mix, epoch, int(sid), h, w)
        if box is not None:
            y0, y1, x0, x1 = box
            out[row, :, y0:y1, x0:x1] = partners[row, :, y0:y1, x0:x1]
        elif lam < 1.0:
            out[row] = images[row] * lam + partners[row] * (1.0 - lam)
        lams.append(float(lam))
    return out, lams


def mix_targets(targets: Any, partner_targets: Any, lams: Any) -> Any:
    """``lam * targets + (1 - lam) * partner_targets`` per row (``lams``: [N] on the targets' device)."""
    lam = lams.reshape(-1, *([1] * (targets.ndim - 1)))
    return targets * lam + partner_targets * (1.0 - lam)

"""Reading a ``teacher_outputs`` cache: targets of (epoch, sample ids), with bounded memory.

The reader holds at most ``max_units`` (epoch, shard) units in memory (least recently used goes
first): the loader's epoch order visits shards a window at a time (``window_shards``), so a rank
touches a few units at once and memory stays ~``max_units`` x one unit, whatever the dataset size.

Soft targets from top-k (TinyViT's rule, in the temperature-T probability space): the k stored
probabilities ``p_i = exp(logprob_i)`` are kept as they are, and the remaining mass
``1 - sum(p_i)`` is spread uniformly over the other ``C - k`` classes (clamped at 0 against fp16
rounding). With ``k = C`` the distribution is the teacher's, up to fp16 rounding of the
log-probabilities (relative error <= 2**-11 each).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from cluster.storage import Store
from jobs._cache_codec import decode_unit
from jobs.teacher_cache import MANIFEST, UNITS, unit_name


class CacheMismatchError(ValueError):
    """The cache was made for another recipe, data, teacher or range than the student stage."""


class CacheReader:
    """Targets of a ``teacher_outputs`` stage's cache (``<stage>/cache``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, max_units: int = 8) -> None:
        self.store = Store(url, storage_options)
        try:
            self.manifest = self.store.get_json(MANIFEST)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.store.url_of(MANIFEST)} does not exist: the teacher_outputs stage has "
                                    "not finished (run it first)") from None
        self.offsets = np.concatenate([[0], np.cumsum(self.manifest["shard_samples"])]).astype(np.int64)
        self.num_classes, self.topk = int(self.manifest["num_classes"]), int(self.manifest["topk"])
        self.max_units = max_units
        self._units: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def check(self, expect: dict[str, Any], where: str) -> None:
        """Refuse a cache whose recipe / data / teacher / temperature differ from ``expect``, naming each."""
        diffs = []
        for key, want in expect.items():
            have = self.manifest.get(key)
            if key == "recipe":
                diffs += [f"recipe.{k}: cache {have.get(k)!r}, student {v!r}" for k, v in want.items()
                          if have.get(k) != v]
            elif have != want:
                diffs.append(f"{key}: cache {have!r}, student {want!r}")
        if diffs:
            raise CacheMismatchError(f"{where}: the cache {self.store.url} was made for another setting than this "
                                     f"stage; differs: {'; '.join(diffs)}. Re-run the teacher_outputs stage with "
                                     "the student's settings, or make the student match the cache")

    def epochs(self) -> tuple[int, int]:
        return int(self.manifest["epochs"][0]), int(self.manifest["epochs"][1])

    def _unit(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        name = unit_name(epoch, shard)
        if name in self._units:
            self._units.move_to_end(name)
            return self._units[name]
        blob = self.store.get_bytes(f"{UNITS}/{name}.npz")
        if hashlib.sha256(blob).hexdigest() != self.manifest["units"].get(name):
            raise ValueError(f"cache unit {self.store.url_of(UNITS)}/{name}.npz does not match the cache manifest's "
                             "sha256: it is corrupt or from another run; re-run the teacher_outputs stage")
        arrays = decode_unit(blob, int(self.manifest.get("format", 1)))
        self._units[name] = arrays
        while len(self._units) > self.max_units:
            self._units.popitem(last=False)
        return arrays

    def lookup(self, epoch: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logprobs" [N, k] fp32, "indices" [N, k] int64 (when k < C), "feature" [N, D] fp32}`` of ``ids``."""
        lo, hi = self.epochs()
        if not lo <= epoch < hi:
            raise CacheMismatchError(f"epoch {epoch} is not in the cache {self.store.url} (epochs [{lo}, {hi})): "
                                     "train fewer epochs or extend the teacher_outputs stage's range")
        ids_np = ids.detach().cpu().numpy().astype(np.int64)
        shards = np.searchsorted(self.offsets, ids_np, side="right") - 1
        out: dict[str, list] = {}
        for i, (sid, shard) in enumerate(zip(ids_np.tolist(), shards.tolist())):
            unit = self._unit(epoch, shard)
            for key, arr in unit.items():
                out.setdefault(key, []).append(arr[sid - self.offsets[shard]])
        result = {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}
        result["logprobs"] = result["logprobs"].float()
        if "indices" in result:
            result["indices"] = result["indices"].long()
        if "feature" in result:
            result["feature"] = result["feature"].float()
        return result


def soft_targets(logprobs: torch.Tensor, indices: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[N, k] top-k log-probabilities (+ their class indices) -> the [N, C] target distribution (module doc)."""
    probs = logprobs.float().exp()
    k = probs.shape[-1]
    if indices is None or k == num_classes:
        return probs if indices is None else torch.zeros_like(probs).scatter_(-1, indices, probs)
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
    return rest.expand(-1, num_classes).contiguous().scatter_(-1, indices, probs)


def kl_soft(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || softmax(student / T)) times T**2, batch mean: :func:`jobs.distill.kl_logits` for a
    target given as probabilities (entries that are 0 contribute 0)."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    per = (torch.xlogy(target, target) - target * log_q).sum(-1)
    return per.mean() * temperature * temperature

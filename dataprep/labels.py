"""Labels of a split and seeded, stratified label subsets (low-label fine-tuning and evaluation).

    labels = split_labels(manifest_url, "train")          # [N] int64, sample-id order, -1 = none
    keep = label_subset(labels, 0.1, seed=0)              # sorted sample ids: ~10% of every class

Sample ids are the loader's (``dataprep/_order.py``): a sample's index in manifest order within
its split. A subset is a pure function of (labels, fraction, seed), so every rank, every attempt
and every stage that asks with the same arguments gets the same ids; hand them to
:class:`~dataprep.loader.StreamingLoader` as ``subset=`` to train on them only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dataprep._shards import ShardRef, ShardSource, SampleFetcher
from dataprep.manifest import load_manifest

log = logging.getLogger(__name__)


def split_labels(manifest_url: str, split: str = "train", storage_options: dict[str, Any] | None = None,
                 readahead_shards: int = 4) -> np.ndarray:
    """Every sample's label in sample-id order (``-1``: no ``.cls`` member or unreadable sample).

    Reads the split's shards once (no image is decoded); a missing shard raises
    :class:`~dataprep._shards.MissingShardError`.
    """
    manifest, store = load_manifest(manifest_url, storage_options)
    shards = [ShardRef(s.name, s.samples, s.bytes, s.sha256) for s in manifest.split(split).shards]
    plan = [(s, i) for s, ref in enumerate(shards) for i in range(ref.samples)]
    fetcher = SampleFetcher(ShardSource(store.url, storage_options, None), shards, plan, readahead_shards)
    try:
        labels = np.fromiter((_label(fetcher.take(s, i)) for s, i in plan), dtype=np.int64, count=len(plan))
    finally:
        fetcher.close()
    log.info("read %d labels of split %r from %s", len(labels), split, store.url)
    return labels


def _label(raw: Any) -> int:
    return -1 if raw.error else int(raw.label)


def label_subset(labels: torch.Tensor | np.ndarray, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified random ``fraction`` of ``labels`` (at least one per class), sorted.

    Each class ``c`` with ``n_c`` samples keeps ``max(1, round(n_c * fraction))`` of them, drawn with
    a generator seeded by ``seed``; ``fraction >= 1`` keeps everything. Negative labels (none) count
    as a class of their own: drop them first where they must not be drawn.
    """
    labels = torch.as_tensor(labels)
    if fraction >= 1.0:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        take = max(1, round(len(idx) * fraction))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    return torch.sort(torch.cat(keep)).values

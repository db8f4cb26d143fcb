"""The streaming shard reader: deterministic, exactly resumable (also on another world size), fast.

    loader = StreamingLoader("s3://bucket/run/stages/data/shards", split="train", batch_size=64,
                             seed=0, rank=rank, world_size=world, transform=mae_transform(224),
                             num_workers=8, cache_dir="/local/nvme/shards", cache_limit_bytes=200 << 30)
    loader.load_state_dict(saved)              # optional: continue exactly where a run stopped
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                # keeps a just-loaded position in that same epoch
        for batch in loader:                   # {"image", "label", "key", "index", "pad", "epoch"} (+ "mask";
                                               #  with mix: "mix_lam", "partner_index", "partner_label")
            ...
            state = loader.state_dict()        # after the step: the position after this batch

Order (see ``dataprep/_order.py``): the epoch order is a pure function of the manifest's
per-shard counts, ``seed`` and the epoch — shards permuted, grouped into windows of
``window_shards``, samples permuted within a window — and never depends on the data, the
rank or ``num_workers``. Rank r serves the r-th of ``world_size`` contiguous, balanced chunks
of it, so each rank reads its own ~1/W of the shards. The state is that split plus how many
samples each rank consumed (equal on every rank), so it is the same on every rank.

Workers: the rank's stream is cut into batches; DataLoader worker w builds batches
w, w+K, w+2K, ... and DataLoader hands them back round-robin, i.e. in stream order, so the
batches (and, with per-sample seeded augmentation, their tensors) do not depend on K. The main
process counts the batches it hands out; that count is the position.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from dataprep._batchpool import BatchPool, PoolReturns
from dataprep._bounds import MAX_PIXELS_DEFAULT, pixels_of
from dataprep._decode import decode
from dataprep._order import Plan, epoch_order, rank_stream, sample_seed, shard_offsets
from dataprep._shards import MissingShardError, ShardCache, ShardError, ShardRef, ShardSource, SampleFetcher
from dataprep.manifest import load_manifest
from dataprep.mixing import Mix, mix_images, partner_table
from dataprep.transforms import bind_channels

log = logging.getLogger(__name__)

__all__ = ["StreamingLoader", "ShardError", "MissingShardError"]

STATE_VERSION = 1
SKIP_BUDGET_ENV = "VITFORGE_SKIP_BUDGET"  # a fraction of an epoch (< 1) or a number of samples (>= 1)
_DEFAULT_BUDGET = -1.0  # sentinel: $VITFORGE_SKIP_BUDGET, else 0.001


def _skip_budget(budget: float | None, epoch_samples: int) -> int | None:
    """Skipped samples allowed per epoch: ``budget`` as a fraction (< 1) or a count (>= 1); None: unlimited."""
    if budget == _DEFAULT_BUDGET:
        raw = os.environ.get(SKIP_BUDGET_ENV, "").strip()
        budget = None if raw.lower() in ("none", "off") else float(raw) if raw else 0.001
    if budget is None:
        return None
    if budget < 0:
        raise ValueError(f"skip_budget must be >= 0 (a fraction of an epoch or a count), got {budget}")
    return int(budget * epoch_samples) if budget < 1 else int(budget)


@dataclass(frozen=True)
class _ReadSpec:
    """Everything a worker needs to read shards (picklable)."""

    root_url: str
    storage_options: dict | None
    shards: tuple[ShardRef, ...]
    cache_dir: str | None
    cache_limit_bytes: int | None
    block_size: int
    readahead_shards: int
    verify_shards: bool = True
    max_member_bytes: int | None = None
    max_pixels: int = MAX_PIXELS_DEFAULT

    def fetcher(self, plan: list[tuple[int, int]]) -> SampleFetcher:
        cache = ShardCache(self.cache_dir, self.cache_limit_bytes) if self.cache_dir else None
        source = ShardSource(self.root_url, self.storage_options, cache, self.block_size, self.verify_shards,
                             self.max_member_bytes)
        return SampleFetcher(source, list(self.shards), plan, self.readahead_shards)


class _RankBatches(IterableDataset):
    """One rank's remaining batches of one epoch; under DataLoader workers, worker w builds every K-th."""

    def __init__(self, spec: _ReadSpec, ids: np.ndarray, pads: np.ndarray, batch_size: int, seed: int, epoch: int,
                 transform: Callable | None, on_error: str, image_type: str, masks: bool = False,
                 mix: Mix | None = None, partners: np.ndarray | None = None, flags: torch.Tensor | None = None,
                 depth: int = 3) -> None:
        self.spec, self.ids, self.pads, self.batch_size = spec, ids, pads, batch_size
        self.flags, self.depth = flags, depth  # PoolReturns.flags (workers only); buffers kept per shape
        self.seed, self.epoch, self.transform = seed, epoch, transform
        self.on_error, self.image_type, self.masks = on_error, image_type, masks
        self.mix, self.partners = mix, partners  # partners[j]: the mixing partner of ids[j] (same shard)
        self.offsets = shard_offsets([s.samples for s in spec.shards])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(worker, len(self.ids) // self.batch_size, workers)
        spans = [slice(i * self.batch_size, (i + 1) * self.batch_size) for i in mine]
        my_ids = np.concatenate([self._reads(s) for s in spans]) if spans else np.zeros(0, np.int64)
        shard_of = np.searchsorted(self.offsets, my_ids, side="right") - 1
        fetcher = self.spec.fetcher(list(zip(shard_of.tolist(), (my_ids - self.offsets[shard_of]).tolist())))
        pool = BatchPool(_new_batch, self.depth, self.flags[worker] if info and self.flags is not None else None)
        try:
            for i, span in zip(mine, spans):
                batch = self._batch(fetcher, span, i, pool)
                sent = pool.batch_done(batch)
                if pool.flags is not None:
                    batch["_pooled"], batch["_worker"] = sent, worker
                    _small_as_numpy(batch)
                yield batch
                del batch  # the pool's free check counts this frame's reference too
        finally:
            fetcher.close()

    def _reads(self, span: slice) -> np.ndarray:
        """The ids batch ``span`` takes, in order: each sample, then (mixing) its partner."""
        if self.partners is None:
            return self.ids[span]
        return np.stack([self.ids[span], self.partners[span]], axis=1).reshape(-1)

    def _batch(self, fetcher: SampleFetcher, span: slice, number: int, pool: BatchPool) -> dict[str, Any]:
        before = fetcher.source.bytes_read
        rows, partner_rows = self._read_rows(fetcher, span)
        skipped = [r for r in rows if isinstance(r, str)]  # a partner is counted where it is served itself
        good = [k for k, r in enumerate(rows) if not isinstance(r, str)]
        if not good:
            raise ShardError(f"every sample of batch {number} of epoch {self.epoch} is unreadable: {skipped}")
        for k, r in enumerate(rows):  # an unreadable sample: a flagged repeat of a readable one (and its partner)
            if isinstance(r, str):
                g = good[k % len(good)]
                rows[k] = (*rows[g][:4], True, rows[g][5])
                if partner_rows:
                    partner_rows[k] = partner_rows[g]
        images, labels, keys, sids, flags, masks = zip(*rows)
        normalize = self.transform.normalize if _normalize_batched(self.transform) else None
        batch = {
            "image": _collate(images, normalize, pool),
            **({"mask": _stack([m.long() for m in masks], None, pool)} if self.masks else {}),
            "label": torch.tensor(labels, dtype=torch.long),
            "key": list(keys),
            "index": torch.tensor(sids, dtype=torch.long),
            "pad": torch.tensor(flags, dtype=torch.bool),
            "epoch": self.epoch,
            "_skipped": skipped,
        }
        if self.partners is not None:
            self._mix(batch, rows, partner_rows, normalize, pool)
        batch["_bytes_read"] = fetcher.source.bytes_read - before
        return batch

    def _read_rows(self, fetcher: SampleFetcher, span: slice) -> tuple[list, list]:
        """Rows of the batch's samples (and of their partners), a skipped sample's name in place of its row."""
        rows: list = []
        partner_rows: list = []
        saved = _GlobalRng.save() if self.transform is not None and not _takes_rng(self.transform) else None
        partners = self.partners[span].tolist() if self.partners is not None else None
        try:
            for j, (sid, pad) in enumerate(zip(self.ids[span].tolist(), self.pads[span].tolist())):
                skipped: list[str] = []
                rows.append(self._row(fetcher, sid, pad, skipped) or skipped[0])
                if partners is not None:
                    partner_rows.append(self._row(fetcher, partners[j], False, skipped) or skipped[-1])
        finally:
            if saved:
                _GlobalRng.restore(saved)
        return rows, partner_rows

    def _mix(self, batch: dict[str, Any], rows: list, partner_rows: list, normalize: Any, pool: BatchPool) -> None:
        """Mixup / cutmix (``dataprep/mixing.py``): an unreadable partner is replaced by the sample itself."""
        partner_rows = [p if not isinstance(p, str) else r for r, p in zip(rows, partner_rows)]
        partners = _collate([p[0] for p in partner_rows], normalize, pool)
        batch["image"], lams = mix_images(batch["image"], partners, batch["index"].tolist(), self.epoch, self.mix)
        batch["mix_lam"] = lams  # a list of floats: not cast to the model's dtype on its way to the device
        batch["partner_index"] = torch.tensor([p[3] for p in partner_rows], dtype=torch.long)
        batch["partner_label"] = torch.tensor([p[1] for p in partner_rows], dtype=torch.long)

    def _row(self, fetcher: SampleFetcher, sid: int, pad: bool, skipped: list[str]) -> tuple | None:
        shard = int(np.searchsorted(self.offsets, sid, side="right") - 1)
        raw = fetcher.take(shard, sid - int(self.offsets[shard]))
        try:
            if raw.error:
                raise ValueError(raw.error)
            if (pixels := pixels_of(raw.image, raw.ext)) and pixels > self.spec.max_pixels:
                raise ValueError(f"image of {pixels} pixels is over the limit of {self.spec.max_pixels} (prep's "
                                 "max_pixels): a decompression bomb, refused undecoded")
            img = decode(raw.image, raw.ext, self.image_type)
            mask = _sample_mask(raw, img) if self.masks else None
        except Exception as exc:  # any codec error means a corrupt sample; policy decides
            where = f"shard {raw.shard!r} sample #{raw.index} key {raw.key!r}"
            if self.on_error == "fail":
                raise ShardError(f"unreadable sample in {where}: {exc}. Re-run prep for this shard, "
                                 "or pass on_error='skip' to skip such samples") from exc
            log.warning("skipping unreadable sample in %s: %s", where, exc)
            skipped.append(f"{raw.shard}:{raw.key if raw.key is not None else '#' + str(raw.index)}")
            return None
        out = self._augment(img, sid, mask)
        img, mask = out if self.masks else (out, None)
        return img, raw.label, raw.key or "", sid, pad, mask

    def _augment(self, img, sid: int, mask: torch.Tensor | None = None):
        if self.transform is None:
            return img if mask is None else (img, mask)
        seed = sample_seed(self.seed, self.epoch, sid)
        if mask is not None:  # the same geometric draws for the image and its mask
            return self.transform.augment_pair(img, mask, random.Random(seed))
        if _normalize_batched(self.transform):  # normalized per batch in _collate
            return self.transform.augment(img, random.Random(seed))
        if _takes_rng(self.transform):
            return self.transform(img, rng=random.Random(seed))
        _GlobalRng.seed(seed)
        return self.transform(img)


# per-sample vectors of a batch: a worker sends them as numpy arrays, pickled by value, since each
# tensor would cross in a shared-memory segment of its own (~1 ms per tensor to pass its descriptor)
_SMALL = ("label", "index", "pad", "partner_index", "partner_label")


def _small_as_numpy(batch: dict[str, Any]) -> None:
    for key in _SMALL:
        if isinstance(batch.get(key), torch.Tensor):
            batch[key] = batch[key].numpy()


def _small_as_tensors(batch: dict[str, Any]) -> None:
    for key in _SMALL:
        if isinstance(batch.get(key), np.ndarray):
            batch[key] = torch.from_numpy(batch[key])


def _sample_mask(raw: Any, img: Any) -> torch.Tensor:
    """The sample's ``[H, W]`` class mask; ValueError when it is missing, corrupt or not its image's size."""
    from dataprep._masks import decode_mask

    if raw.mask is None:
        raise ValueError("no mask member (<key>.mask.png) although the manifest says the shards carry masks")
    mask = torch.from_numpy(decode_mask(raw.mask, "mask member").astype(np.int32))
    hw = tuple(img.shape[-2:]) if isinstance(img, torch.Tensor) else (img.height, img.width)
    if tuple(mask.shape) != hw:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} px, its image {hw[1]}x{hw[0]}: re-run prep")
    return mask


def _takes_rng(transform: Callable) -> bool:
    return bool(getattr(transform, "takes_rng", False))


class _GlobalRng:
    """Seeds torch's CPU generator and ``random`` per sample for transforms that use global RNG."""

    @staticmethod
    def save() -> tuple:
        return torch.default_generator.get_state(), random.getstate()

    @staticmethod
    def restore(saved: tuple) -> None:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])

    @staticmethod
    def seed(seed: int) -> None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)


def _normalize_batched(transform: Callable | None) -> bool:
    return transform is not None and bool(getattr(transform, "normalize_batched", False))


def _collate(items: tuple, normalize: Callable | None = None, pool: BatchPool | None = None) -> Any:
    if isinstance(items[0], (list, tuple)):  # multi-crop: one stacked tensor per view
        return [_stack([it[v] for it in items], normalize, pool) for v in range(len(items[0]))]
    return _stack(list(items), normalize, pool)


def _stack(items: list, normalize: Any = None, pool: BatchPool | None = None) -> Any:
    """Stack equal-shaped tensors (else a list) into a batch tensor from ``pool`` (in a worker: shared
    memory). With ``normalize``: uint8 in, normalized float out, written straight into the batch."""
    if not (all(isinstance(t, torch.Tensor) for t in items) and len({tuple(t.shape) for t in items}) == 1):
        return [normalize(t) for t in items] if normalize else items
    shape = (len(items), *items[0].shape)
    if normalize is not None:
        return normalize.into(items, pool.take(shape, torch.float32) if pool else _new_batch(shape, torch.float32))
    if pool is None or len({t.dtype for t in items}) != 1:
        return default_collate(items)
    return torch.stack(items, out=pool.take(shape, items[0].dtype))


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(numel)).view(shape)  # as default_collate does


class StreamingLoader:
    """Batches of one rank from a shard manifest (local path or any fsspec URL).

    Every rank must be built with the same manifest, split, batch_size, seed, shuffle,
    window_shards, resample and partial; then every rank yields ``len(loader)`` batches, the
    same number, so no collective waits forever.

    ``partial``: ``"pad"`` fills the last batches of short ranks with repeats from their own
    chunk (flagged in ``batch["pad"]``), ``"drop"`` drops each rank's tail (< batch_size + 1).
    ``on_error``: ``"skip"`` replaces an unreadable sample by a repeat of a readable one from the
    same batch (flagged in ``pad``; counted in ``stats["skipped"]``; logged with shard and key; a
    batch without a single readable sample raises :class:`ShardError`),
    ``"fail"`` raises :class:`ShardError` naming shard and key. A shard missing from the store
    always raises :class:`MissingShardError`. ``skip_budget``: skipped samples allowed per epoch
    (per rank), a fraction of the epoch (< 1) or a count; default ``$VITFORGE_SKIP_BUDGET`` or
    0.001; beyond it :class:`ShardError` names the shards; ``None``: no limit.
    ``verify_shards``: each shard's sha256 is checked against the manifest while it is streamed
    (read to its end once); a mismatch makes every sample of it unreadable (``skip``: skipped and
    counted; ``fail``: an error naming the shard). A tar member larger than the shard's size in the
    manifest (or ``max_member_bytes``) is refused unread; an image over ``max_pixels`` (prep's limit)
    is refused undecoded.
    ``subset``: serve only these sample ids of the split (indices in manifest order, e.g. a
    labelled subset from :func:`dataprep.labels.label_subset`). The epoch order is the full one
    with every other id left out, so order, resume and re-splitting work as without it; the
    state records a digest of the subset and refuses a position saved for another one.
    ``masks``: when the manifest has ``masks``, each batch also has ``"mask"``, long ``[B, S, S]`` classes
    under the same geometric augmentation as the image (NEAREST; the transform needs ``augment_pair``);
    a sample whose mask is missing, corrupt or not its image's size is unreadable (``on_error``).
    ``mix``: mixup / cutmix as a batch transform (:mod:`dataprep.mixing`): each sample is mixed with a
    partner from its own shard under a per-sample lambda, both functions of (seed, epoch, sample id)
    only, so a mixed image replays identically on any world size or batch split; the batch gains
    ``mix_lam`` (a list of floats), ``partner_index`` and ``partner_label`` for mixing the targets.
    ``cache_dir``: shards are downloaded whole into it (shared by workers and by ranks on one
    node; LRU-evicted to ``cache_limit_bytes``); without it they are streamed with ``block_size``
    read-ahead, each DataLoader worker reading the shards of its own batches.
    """

    def __init__(self, manifest_url: str, split: str = "train", batch_size: int = 64, seed: int = 0, rank: int = 0,
                 world_size: int = 1, transform: Callable | None = None, num_workers: int = 0,
                 pin_memory: bool = False, partial: str = "pad", on_error: str = "skip", resample: bool = False,
                 shuffle: bool = True, cache_dir: str | None = None, cache_limit_bytes: int | None = None,
                 storage_options: dict | None = None, window_shards: int = 4, readahead_shards: int = 4,
                 block_size: int = 8 << 20, image_type: str = "tensor", prefetch_factor: int = 2,
                 timeout: float = 0, multiprocessing_context: Any = None,
                 subset: Sequence[int] | np.ndarray | None = None, skip_budget: float | None = _DEFAULT_BUDGET,
                 verify_shards: bool = True, max_member_bytes: int | None = None,
                 max_pixels: int = MAX_PIXELS_DEFAULT, masks: bool = False, mix: Mix | None = None) -> None:
        _check_args(batch_size, rank, world_size, partial, on_error, image_type, window_shards)
        manifest, store = load_manifest(manifest_url, storage_options)
        shards = tuple(ShardRef(s.name, s.samples, s.bytes, s.sha256) for s in manifest.split(split).shards)
        self.manifest, self.split = manifest, split
        self.spec = _ReadSpec(store.url, storage_options, shards, cache_dir, cache_limit_bytes, block_size,
                              readahead_shards, verify_shards, max_member_bytes, max_pixels)
        self.counts = [s.samples for s in shards]
        self._keep, self.subset_digest = _subset_mask(subset, int(sum(self.counts)), split, resample)
        self.num_samples = int(sum(self.counts)) if self._keep is None else int(self._keep.sum())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.transform = bind_channels(transform, manifest.channels)  # [C, H, W] data: per-channel normalisation
        self.with_masks = masks and manifest.masks is not None
        if self.with_masks and self.transform is not None and not getattr(self.transform, "takes_mask", False):
            raise ValueError(f"masks=True needs a transform that moves masks with the image (takes_mask: mae_transform, "
                             f"eval_transform); {type(self.transform).__name__} does not")
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.partial, self.on_error, self.resample, self.shuffle = partial, on_error, resample, shuffle
        self.window_shards, self.image_type = window_shards, image_type
        self.mix = mix if mix is not None and mix.enabled else None
        if self.mix is not None and (resample or self.with_masks):
            raise ValueError("mix (mixup/cutmix) with resample or masks is not supported: a partner is a served "
                             "sample of the same shard, and masks would need mixing too; drop one of them")
        self._partner_cache: tuple[int, np.ndarray] | None = None
        self._dl_kwargs = {"timeout": timeout, "multiprocessing_context": multiprocessing_context}
        if num_workers > 0:
            self._dl_kwargs["prefetch_factor"] = prefetch_factor
        self.stats = {"batches": 0, "samples": 0, "padded": 0, "skipped": 0, "bytes_read": 0}
        self.skip_budget = _skip_budget(skip_budget, int(sum(self.counts)))  # samples per epoch, None: no limit
        self._epoch_skipped: list[str] = []
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._generation = 0
        self._start_epoch(0)

    # ---- position -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches a full epoch yields on every rank at this world size."""
        return Plan.full(self.num_samples, self.world_size).batches(self.batch_size, self.partial)

    def __len__(self) -> int:
        """Batches the next ``for batch in loader`` yields (the rest of the current epoch)."""
        if self._served_out:
            return self.batches_per_epoch
        return max(0, self._plan.stream_length(self.batch_size, self.partial) - self._plan.consumed) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning — unless a position in that very epoch was just
        loaded with :meth:`load_state_dict`, which is then kept (so resume needs no special case)."""
        if self._held and epoch == self._epoch:
            return
        self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch_skipped = []
        self._epoch, self._plan = epoch, Plan.full(self.num_samples, self.world_size)
        self._held = self._served_out = False
        self._generation += 1

    def _exhausted(self) -> bool:
        return self._plan.consumed >= self._plan.stream_length(self.batch_size, self.partial)

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out so far: small, JSON-able, equal on every rank."""
        plan = self._plan
        epoch = self._epoch
        if self._served_out or self._exhausted():
            segments, consumed = [], 0  # the epoch is over (a dropped tail is not 'remaining')
        else:
            segments, consumed = [list(s) for s in plan.segments], plan.consumed
        return {
            "version": STATE_VERSION, "epoch": epoch, "segments": segments, "consumed": consumed,
            "world_size": plan.world_size, "batch_size": self.batch_size, "partial": self.partial,
            "samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
            "window_shards": self.window_shards, "resample": self.resample, "subset": self.subset_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the identical stream on the same world size; on another one,
        every sample of the epoch not yet served is served exactly once, then epochs run normally."""
        order_defining = {"samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                          "window_shards": self.window_shards, "resample": self.resample,
                          "subset": self.subset_digest}
        for name, mine in order_defining.items():
            if state.get(name) != mine:
                raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader has {mine!r}: "
                                 "the saved position belongs to a different data order")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        plan = Plan(tuple((int(a), int(b)) for a, b in state["segments"]), int(state["world_size"]),
                    int(state["consumed"]))
        if (plan.world_size, state["batch_size"], state["partial"]) != (self.world_size, self.batch_size,
                                                                        self.partial):
            plan = Plan(plan.remainder(int(state["batch_size"]), state["partial"]), self.world_size, 0)
        self._start_epoch(int(state["epoch"]))
        self._plan, self._held = plan, True

    # ---- iteration ------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(self.counts, self.seed, epoch, self.shuffle, self.window_shards, self.resample)
            if self._keep is not None:
                order = order[self._keep[order]]  # the subset, in the full order's sequence
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _partners(self, epoch: int, ids: np.ndarray) -> np.ndarray | None:
        """The mixing partner of each of ``ids`` (``dataprep.mixing.partner_table``), None without mixing."""
        if self.mix is None:
            return None
        if self._partner_cache is None or self._partner_cache[0] != epoch:
            self._partner_cache = (epoch, partner_table(self.counts, self.mix.seed, epoch, self._keep))
        return self._partner_cache[1][ids]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._served_out:
            self._start_epoch(self._epoch + 1)
        self._held = False
        self._generation += 1
        generation, plan, epoch = self._generation, self._plan, self._epoch
        stream = rank_stream(plan, self.rank, self.batch_size, self.partial)
        start = plan.consumed
        if start >= len(stream.positions):
            self._served_out = True
            return
        ids = self._order(epoch)[stream.positions[start:]]
        # buffers kept per shape: a worker's queued batches + the one being received + the consumer's
        returns = PoolReturns(self.num_workers) if self.num_workers > 0 else None
        depth = self._dl_kwargs.get("prefetch_factor", 1) + 2
        dataset = _RankBatches(self.spec, ids, stream.pad[start:], self.batch_size, self.seed, epoch,
                               self.transform, self.on_error, self.image_type, self.with_masks, self.mix,
                               self._partners(epoch, ids), returns.flags if returns else None, depth)
        pin = self.pin_memory and torch.accelerator.is_available()  # no warning on CPU-only machines
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=pin, **self._dl_kwargs)
        consumed = start
        batches = iter(loader)
        try:
            for batch in batches:
                if generation != self._generation:  # set_epoch / load_state_dict happened meanwhile
                    return
                consumed += self.batch_size
                self._plan = replace(plan, consumed=consumed)
                if returns is not None:
                    returns.track(batch)
                    _small_as_tensors(batch)
                self._count(batch)
                yield batch
        finally:  # stop workers now, even when an error's traceback keeps this frame alive
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown:
                shutdown()
        if generation == self._generation:
            self._served_out = True

    def _count(self, batch: dict[str, Any]) -> None:
        skipped = batch.pop("_skipped")
        self.stats["bytes_read"] += int(batch.pop("_bytes_read"))
        self.stats["batches"] += 1
        self.stats["samples"] += len(batch["key"])
        self.stats["padded"] += int(batch["pad"].sum())
        self.stats["skipped"] += len(skipped)
        self._epoch_skipped += skipped
        if self.skip_budget is not None and len(self._epoch_skipped) > self.skip_budget:
            shards = sorted({s.rsplit(":", 1)[0] for s in self._epoch_skipped})
            raise ShardError(
                f"{len(self._epoch_skipped)} unreadable samples skipped in epoch {self._epoch} on rank {self.rank}, "
                f"over the skip budget of {self.skip_budget} per epoch ({SKIP_BUDGET_ENV}, default 0.1% of the "
                f"epoch's {int(sum(self.counts))} samples); shards: {', '.join(shards)}. Re-run prep for these "
                "shards, or raise the budget")


def _subset_mask(subset: Sequence[int] | np.ndarray | None, total: int, split: str,
                 resample: bool) -> tuple[np.ndarray | None, str | None]:
    """(boolean mask over the split's sample ids, digest of the subset) — (None, None) without one."""
    if subset is None:
        return None, None
    ids = np.unique(np.asarray(subset, dtype=np.int64))
    if len(ids) == 0:
        raise ValueError(f"subset of split {split!r} is empty: give at least one sample id")
    if ids[0] < 0 or ids[-1] >= total:
        raise ValueError(f"subset of split {split!r} names sample id {int(ids[0] if ids[0] < 0 else ids[-1])}, "
                         f"outside [0, {total}): ids are indices in the split's manifest order")
    if resample:
        raise ValueError("subset and resample=True do not combine: resampling draws from the whole split")
    mask = np.zeros(total, dtype=bool)
    mask[ids] = True
    return mask, hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def _check_args(batch_size: int, rank: int, world_size: int, partial: str, on_error: str, image_type: str,
                window_shards: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if partial not in ("pad", "drop"):
        raise ValueError(f"partial must be 'pad' or 'drop', got {partial!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if image_type not in ("tensor", "pil"):
        raise ValueError(f"image_type must be 'tensor' or 'pil', got {image_type!r}")
    if window_shards < 1:
        raise ValueError(f"window_shards must be >= 1, got {window_shards}")

"""Building a rank's batches: reading its samples, decoding, augmenting, stacking into reused buffers.

:class:`RankBatches` is the dataset a :class:`~dataprep.loader.StreamingLoader` hands to its
DataLoader: one :class:`Pass` (the rank's remaining batches of one epoch) at a time, in one process
or in DataLoader workers, where worker w builds batches w, w+K, ... and DataLoader returns them in
stream order. Workers are persistent: they take each pass from their own queue, so the process and
its batch buffers (``dataprep/_batchpool.py``) outlive an epoch (each pass opens its own shard reader).
"""

from __future__ import annotations

import logging
import os
import queue
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from dataprep._batchpool import BatchPool
from dataprep._bounds import MAX_PIXELS_DEFAULT, pixels_of
from dataprep._decode import decode
from dataprep._order import sample_seed, shard_offsets
from dataprep._shards import ShardCache, ShardError, ShardRef, ShardSource, SampleFetcher
from dataprep.mixing import Mix, mix_images

log = logging.getLogger("dataprep.loader")


@dataclass(frozen=True)
class ReadSpec:
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


@dataclass(frozen=True)
class Pass:
    """One pass over a rank's remaining batches of one epoch: what a worker needs to build its share.
    ``number`` counts the loader's passes; a persistent worker takes the pass whose number is its own
    count of ``iter(dataset)`` calls, so a pass the consumer abandoned before a worker started it is
    skipped, never served late."""

    number: int
    ids: np.ndarray
    pads: np.ndarray
    epoch: int
    partners: np.ndarray | None = None  # partners[j]: the mixing partner of ids[j] (same shard)


class RankBatches(IterableDataset):
    """A rank's batches, one :class:`Pass` at a time; under DataLoader workers, worker w builds every K-th.

    In one process the loader sets :attr:`current` before each pass. Persistent workers take each
    pass from their own queue in ``jobs`` (the loader puts the pass on every worker's queue before it
    starts or resets the DataLoader iterator)."""

    def __init__(self, spec: ReadSpec, batch_size: int, seed: int, transform: Callable | None, on_error: str,
                 image_type: str, masks: bool = False, mix: Mix | None = None, depth: int = 3) -> None:
        self.spec, self.batch_size, self.seed, self.transform = spec, batch_size, seed, transform
        self.on_error, self.image_type, self.masks, self.mix = on_error, image_type, masks, mix
        self.depth = depth  # batch buffers kept per shape (BatchPool)
        self.offsets = shard_offsets([s.samples for s in spec.shards])
        self.current: Pass | None = None
        self.jobs: list | None = None  # one queue of passes per worker (persistent workers)
        self.flags: torch.Tensor | None = None  # PoolReturns.flags (workers only)
        self._passes = 0
        self._pool: BatchPool | None = None
        self.job: Pass | None = None  # the pass this process is building

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._passes += 1  # counted when the iterator is made, even if it never runs
        return self._run(self._passes)

    def _take_pass(self, number: int, worker: int) -> Pass:
        """This worker's pass ``number`` from its queue (older ones were abandoned before they started)."""
        parent = os.getppid()
        while True:
            try:
                job = self.jobs[worker].get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the loader's process is gone: nothing will come
                    raise RuntimeError("the StreamingLoader's process exited") from None
                continue
            if job.number == number:
                return job
            if job.number > number:
                raise RuntimeError(f"worker {worker} expected pass {number} and got {job.number}")

    def _run(self, number: int) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        job = self._take_pass(number, worker) if info and self.jobs else self.current
        self.job = job
        mine = range(worker, len(job.ids) // self.batch_size, workers)
        spans = [slice(i * self.batch_size, (i + 1) * self.batch_size) for i in mine]
        my_ids = np.concatenate([self._reads(s) for s in spans]) if spans else np.zeros(0, np.int64)
        shard_of = np.searchsorted(self.offsets, my_ids, side="right") - 1
        fetcher = self.spec.fetcher(list(zip(shard_of.tolist(), (my_ids - self.offsets[shard_of]).tolist())))
        if self._pool is None:
            flags = self.flags[worker] if info and self.flags is not None else None
            self._pool = BatchPool(new_batch, self.depth, flags)
        pool = self._pool
        try:
            for i, span in zip(mine, spans):
                batch = self._batch(fetcher, span, i, pool)
                sent = pool.batch_done(batch, mark=job.number)
                if pool.flags is not None:
                    batch["_pooled"], batch["_worker"] = sent, worker
                    small_as_numpy(batch)
                yield batch
                del batch  # the pool's free check counts this frame's reference too
        finally:
            fetcher.close()

    def _reads(self, span: slice) -> np.ndarray:
        """The ids batch ``span`` takes, in order: each sample, then (mixing) its partner."""
        if self.job.partners is None:
            return self.job.ids[span]
        return np.stack([self.job.ids[span], self.job.partners[span]], axis=1).reshape(-1)

    def _batch(self, fetcher: SampleFetcher, span: slice, number: int, pool: BatchPool) -> dict[str, Any]:
        before = fetcher.source.bytes_read
        rows, partner_rows = self._read_rows(fetcher, span)
        skipped = [r for r in rows if isinstance(r, str)]  # a partner is counted where it is served itself
        good = [k for k, r in enumerate(rows) if not isinstance(r, str)]
        if not good:
            raise ShardError(f"every sample of batch {number} of epoch {self.job.epoch} is unreadable: {skipped}")
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
            "epoch": self.job.epoch,
            "_skipped": skipped,
        }
        if self.job.partners is not None:
            self._mix(batch, rows, partner_rows, normalize, pool)
        batch["_bytes_read"] = fetcher.source.bytes_read - before
        return batch

    def _read_rows(self, fetcher: SampleFetcher, span: slice) -> tuple[list, list]:
        """Rows of the batch's samples (and of their partners), a skipped sample's name in place of its row."""
        rows: list = []
        partner_rows: list = []
        saved = _GlobalRng.save() if self.transform is not None and not _takes_rng(self.transform) else None
        partners = self.job.partners[span].tolist() if self.job.partners is not None else None
        try:
            for j, (sid, pad) in enumerate(zip(self.job.ids[span].tolist(), self.job.pads[span].tolist())):
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
        batch["image"], lams = mix_images(batch["image"], partners, batch["index"].tolist(), self.job.epoch, self.mix)
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
        seed = sample_seed(self.seed, self.job.epoch, sid)
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


def small_as_numpy(batch: dict[str, Any]) -> None:
    for key in _SMALL:
        if isinstance(batch.get(key), torch.Tensor):
            batch[key] = batch[key].numpy()


def small_as_tensors(batch: dict[str, Any]) -> None:
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
        return normalize.into(items, pool.take(shape, torch.float32) if pool else new_batch(shape, torch.float32))
    if pool is None or len({t.dtype for t in items}) != 1:
        return default_collate(items)
    return torch.stack(items, out=pool.take(shape, items[0].dtype))


def new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(numel)).view(shape)  # as default_collate does

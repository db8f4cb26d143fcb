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
process counts the batches it hands out; that count is the position. Workers are persistent
(``persistent_workers``, the default): started on the first pass, they take each later pass (epoch,
or the rest of one after ``load_state_dict``) from a queue, so an epoch does not pay for starting
processes and re-reading its first window, and batch buffers are reused across epochs
(``dataprep/_batchpool.py``). :meth:`StreamingLoader.close` stops them; so does dropping the loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader

from dataprep._batchpool import PoolReturns
from dataprep._bounds import MAX_PIXELS_DEFAULT
from dataprep._order import Plan, epoch_order, rank_stream
from dataprep._rank_batches import Pass, RankBatches, ReadSpec, small_as_tensors
from dataprep._shards import MissingShardError, ShardError, ShardRef
from dataprep.manifest import load_manifest
from dataprep.mixing import Mix, partner_table
from dataprep.transforms import bind_channels

__all__ = ["StreamingLoader", "ShardError", "MissingShardError"]

STATE_VERSION = 1
log = logging.getLogger(__name__)
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
                 max_pixels: int = MAX_PIXELS_DEFAULT, masks: bool = False, mix: Mix | None = None,
                 persistent_workers: bool = True) -> None:
        _check_args(batch_size, rank, world_size, partial, on_error, image_type, window_shards)
        manifest, store = load_manifest(manifest_url, storage_options)
        shards = tuple(ShardRef(s.name, s.samples, s.bytes, s.sha256) for s in manifest.split(split).shards)
        self.manifest, self.split = manifest, split
        self.spec = ReadSpec(store.url, storage_options, shards, cache_dir, cache_limit_bytes, block_size,
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
        self.persistent_workers = persistent_workers and num_workers > 0
        # batch buffers kept per shape: a worker's queued batches + the one being received + the consumer's
        self._dataset = RankBatches(self.spec, batch_size, seed, self.transform, on_error, image_type,
                                    self.with_masks, self.mix, depth=(prefetch_factor if num_workers else 1) + 2)
        self._workers: Any = None  # the persistent DataLoader (and its iterator) once started
        self._returns: PoolReturns | None = None
        self._passes = 0
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
        self._passes += 1
        job = Pass(self._passes, ids, stream.pad[start:], epoch, self._partners(epoch, ids))
        consumed, batches = start, None
        try:
            batches, returns = self._start_pass(job)
            while generation == self._generation:  # set_epoch / load_state_dict meanwhile: this pass is over
                batch = _next_batch(batches, self.rank)
                if batch is None:
                    break
                consumed += self.batch_size
                self._plan = replace(plan, consumed=consumed)
                if returns is not None:
                    returns.track(batch)
                    small_as_tensors(batch)
                self._count(batch)
                yield batch
        except GeneratorExit:  # the consumer left the pass: persistent workers wait for the next one
            if not self.persistent_workers:
                _shutdown(batches)
            raise
        except BaseException:  # stop workers now, even when an error's traceback keeps this frame alive
            if self.persistent_workers:
                self.close()  # the next pass starts new ones
            else:
                _shutdown(batches)
            raise
        if not self.persistent_workers:
            _shutdown(batches)
        if generation == self._generation:
            self._served_out = True

    def _start_pass(self, job: Pass) -> tuple[Iterator[dict[str, Any]], PoolReturns | None]:
        """The DataLoader iterator serving ``job``, and (workers) the tracker of their batch buffers."""
        pin = self.pin_memory and torch.accelerator.is_available()  # no warning on CPU-only machines
        self._dataset.current = job
        if not self.persistent_workers:
            returns = PoolReturns(self.num_workers) if self.num_workers else None
            self._dataset.flags, self._dataset.jobs = (returns.flags if returns else None), None
            loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers, pin_memory=pin,
                                **self._dl_kwargs)
            return iter(loader), returns
        if self._workers is None:
            context = self._dl_kwargs["multiprocessing_context"] or torch.multiprocessing
            if isinstance(context, str):
                context = torch.multiprocessing.get_context(context)
            self._returns = PoolReturns(self.num_workers)
            self._dataset.flags = self._returns.flags
            self._dataset.jobs = [context.Queue() for _ in range(self.num_workers)]
            self._workers = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers, pin_memory=pin,
                                       persistent_workers=True, **self._dl_kwargs)
        for jobs in self._dataset.jobs:
            jobs.put(job)
        batches = iter(self._workers)  # the first pass starts the workers; a later one resets them
        self._returns.discard_undelivered(job.number)
        return batches, self._returns

    def close(self) -> None:
        """Stop the persistent DataLoader workers now (the next pass starts new ones)."""
        workers, self._workers = self._workers, None
        self._passes = 0  # new workers count their passes from 1 again, whatever stopping these does
        if workers is not None:
            try:
                _shutdown(getattr(workers, "_iterator", None))
            except RuntimeError as exc:  # torch's SIGCHLD check: one of them had died (its cleanup still ran)
                log.warning("stopping the DataLoader workers of rank %d: %s", self.rank, exc)

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


def _next_batch(batches: Iterator[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """The next batch of the DataLoader iterator, None at its end. A worker killed after queueing a batch
    leaves its tensors unreachable (they travel as file descriptors its process hands over), which
    surfaces as a connection error while unpickling: reported as the dead worker it is."""
    try:
        return next(batches, None)
    except (ConnectionError, EOFError, FileNotFoundError) as exc:
        if not _in_tensor_handover(exc):  # an error of the data itself (a missing shard, a storage outage)
            raise
        raise RuntimeError(f"a DataLoader worker of rank {rank} died while handing over a batch "
                           f"({type(exc).__name__}: {exc}); the next pass starts new workers") from exc


def _in_tensor_handover(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while this process rebuilt a worker's shared tensor storage."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if name.endswith(("multiprocessing/resource_sharer.py", "torch/multiprocessing/reductions.py")):
            return True
        tb = tb.tb_next
    return False


def _shutdown(batches: Any) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown:
        shutdown()


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

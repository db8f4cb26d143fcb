"""Reused batch buffers (dataprep/_batchpool.py): a batch anyone still holds is never written again,
in one process and across DataLoader workers; a released one is reused."""

from __future__ import annotations

import pytest
import torch

from dataprep._batchpool import SLOTS, BatchPool, PoolReturns
from dataprep.loader import StreamingLoader
from dataprep.transforms import dino_transform, mae_transform
from tests._shards_util import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    write_shards(root, [10, 7, 13, 5, 9, 11])
    return root


def loader(root, workers: int, transform=None) -> StreamingLoader:
    return StreamingLoader(root, batch_size=3, seed=7, window_shards=2, num_workers=workers,
                           transform=transform or mae_transform(16))


def images(batch) -> list[torch.Tensor]:
    return batch["image"] if isinstance(batch["image"], list) else [batch["image"]]


def reference(root, transform=None) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in images(b)] for b in loader(root, 0, transform)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("views", ["one", "multi-crop"])
def test_batches_held_by_the_consumer_are_never_overwritten(shards, workers, views):
    transform = dino_transform(16, local_crops=2) if views == "multi-crop" else None
    ref = reference(shards, transform)
    held = list(loader(shards, workers, transform))  # every batch kept until the epoch is over
    assert len(held) == len(ref)
    for got, want in zip(held, ref):
        assert all(torch.equal(a, b) for a, b in zip(images(got), want))
    ptrs = [t.data_ptr() for b in held for t in images(b)]
    assert len(set(ptrs)) == len(ptrs)


def test_a_released_batch_is_reused_and_a_slice_kept_of_one_keeps_it(shards):
    ref = reference(shards)
    seen, kept = [], None
    for i, batch in enumerate(loader(shards, 0)):
        assert torch.equal(batch["image"], ref[i][0])
        seen.append(batch["image"].data_ptr())
        if i == 1:
            kept = batch["image"][1:]  # a view keeps the buffer's storage in use
    assert len(set(seen)) < len(seen)  # released batches' memory came back
    assert seen.count(seen[1]) == 1 and torch.equal(kept, ref[1][0][1:])


def test_a_workers_buffer_comes_back_only_after_the_main_process_released_it():
    made = []

    def alloc(shape, dtype):
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    returns = PoolReturns(workers=1)
    pool = BatchPool(alloc, depth=2, flags=returns.flags[0])
    first = pool.take((2, 3), torch.float32)
    sent = pool.batch_done({"image": first, "key": ["a", "b"]})
    assert sent == [("image", -1, 0)] and int(returns.flags[0, 0]) == 1
    del first  # the worker dropped it, but the main process has not released it yet
    second = pool.take((2, 3), torch.float32)
    assert second.data_ptr() != made[0].data_ptr()
    pool.batch_done({"image": second})
    # the main process's own mapping of slot 0's shared memory: another storage over the same pages
    received = {"image": torch.empty(2, 3), "_pooled": sent, "_worker": 0}
    returns.track(received)
    assert "_pooled" not in received and int(returns.flags[0, 0]) == 1
    del received
    returns.sweep()
    assert int(returns.flags[0, 0]) == 0
    del second  # slot 1 went out in a batch too: only slot 0 is free
    again = pool.take((2, 3), torch.float32)
    assert again.data_ptr() == made[0].data_ptr() and len(made) == 2 and pool.reused == 1


def test_the_pool_keeps_at_most_depth_buffers_per_shape_and_use():
    pool = BatchPool(lambda shape, dtype: torch.empty(shape, dtype=dtype), depth=2)
    held = []
    for _ in range(5):  # a consumer holding five batches of one tensor each
        held.append(pool.take((4,), torch.float32))
        pool.batch_done({"image": held[-1]})
    assert len(pool.slots) == 2 and len({t.data_ptr() for t in held}) == 5
    assert SLOTS >= 64

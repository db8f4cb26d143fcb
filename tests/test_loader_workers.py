"""Persistent DataLoader workers: the same processes serve every pass (epochs, resumed positions,
abandoned passes) with the batches an in-process loader makes; errors and close() stop them."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import torch

from dataprep.loader import StreamingLoader
from dataprep.transforms import mae_transform
from tests._shards_util import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    write_shards(root, [10, 7, 13, 5, 9, 11])
    return root


def make(root, workers: int = 2, **kw) -> StreamingLoader:
    return StreamingLoader(root, batch_size=3, seed=7, window_shards=2, num_workers=workers,
                           transform=mae_transform(16), **kw)


def served(batches) -> list[tuple[list[str], torch.Tensor]]:
    return [(b["key"], b["image"].clone()) for b in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def worker_pids(loader: StreamingLoader) -> set[int]:
    return {p.pid for p in loader._workers._iterator._workers}


def test_the_same_workers_serve_every_epoch_with_the_in_process_batches(shards):
    ref = make(shards, 0)
    want = [served(ref) for _ in range(3)]
    loader = make(shards)
    got, pids = [], []
    for _ in range(3):
        got.append(served(loader))
        pids.append(worker_pids(loader))
    assert all(same(g, w) for g, w in zip(got, want))
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    loader.close()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids[0])
    assert same(served(loader), served(ref))  # epoch 3, by new workers
    assert len(worker_pids(loader)) == 2 and worker_pids(loader).isdisjoint(pids[0])


def test_an_abandoned_pass_never_leaks_its_batches_into_the_next_one(shards):
    ref = make(shards, 0)
    epoch0 = served(ref)
    loader = make(shards)
    it = iter(loader)
    head = [next(it) for _ in range(2)]  # workers have prefetched more of epoch 0
    state = loader.state_dict()
    del it
    loader.set_epoch(1)
    assert same(served(loader), served(ref))  # epoch 1 whole, nothing of epoch 0 in it
    loader.load_state_dict(state)
    loader.set_epoch(0)
    assert same(served(head) + served(loader), epoch0)
    it = iter(loader)  # a pass started and left before any batch, twice
    del it
    it = iter(loader)
    next(it)
    del it
    loader.set_epoch(2)
    ref.set_epoch(2)
    assert same(served(loader), served(ref))
    flags = loader._returns.flags
    held = {(w, s) for w, s, _ in loader._returns._pending}
    stale = [(w, s) for w, s in (flags > 0).nonzero().tolist() if (w, s) not in held]
    assert not [ws for ws in stale if int(flags[ws]) < loader._passes], "buffers of dropped batches not freed"


def test_a_killed_worker_is_an_error_and_the_next_pass_starts_new_workers(shards):
    loader = make(shards)
    it = iter(loader)
    next(it)
    victim = sorted(worker_pids(loader))[0]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker"):
        for _ in it:
            pass
    assert loader._workers is None  # closed on the error
    loader.set_epoch(0)
    assert same(served(loader), served(make(shards, 0)))
    assert victim not in worker_pids(loader)


def test_without_persistent_workers_each_pass_has_its_own(shards):
    loader = make(shards, persistent_workers=False)
    assert same(served(loader), served(make(shards, 0)))
    assert loader._workers is None


def test_spawned_workers_serve_the_same_batches_across_epochs(shards):
    """A CUDA process cannot fork its workers: with spawn, the passes reach them the same way."""
    ref = make(shards, 0)
    loader = make(shards, multiprocessing_context="spawn")
    for _ in range(2):
        assert same(served(loader), served(ref))
    loader.close()


def test_a_worker_dying_while_handing_over_a_batch_is_named_and_data_errors_keep_their_type():
    from dataprep.loader import _next_batch

    scope: dict = {}  # a frame of multiprocessing's resource sharer, where rebuilding a dead worker's tensor fails
    exec(compile("def fetch():\n    raise ConnectionResetError(104, 'Connection reset by peer')\n",
                 "/usr/lib/python3.11/multiprocessing/resource_sharer.py", "exec"), scope)

    def handover():
        scope["fetch"]()
        yield

    with pytest.raises(RuntimeError, match="worker of rank 3 died while handing over a batch") as info:
        _next_batch(handover(), 3)
    assert isinstance(info.value.__cause__, ConnectionResetError)

    def outage():
        raise ConnectionError("could not reach the object store")
        yield

    with pytest.raises(ConnectionError, match="object store"):  # the data's own error, as raised
        _next_batch(outage(), 0)
    assert _next_batch(iter([]), 0) is None

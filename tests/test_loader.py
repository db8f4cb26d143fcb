"""StreamingLoader: order, epochs, uneven division, exact resume (same and other world sizes), workers."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from dataprep.loader import StreamingLoader
from dataprep.transforms import dino_transform, mae_transform
from tests._shards_util import shard_keys, write_shards

COUNTS = [10, 7, 13, 5, 9, 11]  # 55 samples, uneven shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    write_shards(root, COUNTS)
    return root


def make(root, world=1, rank=0, **kw) -> StreamingLoader:
    kw.setdefault("batch_size", 4)
    kw.setdefault("seed", 7)
    kw.setdefault("window_shards", 2)
    return StreamingLoader(root, rank=rank, world_size=world, **kw)


def ranks(root, world, **kw) -> list[StreamingLoader]:
    return [make(root, world, r, **kw) for r in range(world)]


def take(loaders, n=None) -> list[list[dict]]:
    """Iterate every rank's loader in lockstep; up to ``n`` batches each. Returns batches per rank."""
    its = [iter(ld) for ld in loaders]
    out: list[list[dict]] = [[] for _ in loaders]
    while n is None or len(out[0]) < n:
        got = [next(it, None) for it in its]
        assert len({g is None for g in got}) == 1, "ranks yielded different numbers of batches"
        if got[0] is None:
            break
        for r, g in enumerate(got):
            out[r].append(g)
    return out


def real_keys(batches_per_rank) -> list[str]:
    return [k for batches in batches_per_rank for b in batches for k, p in zip(b["key"], b["pad"].tolist()) if not p]


def all_keys(root) -> list[str]:
    return [k for keys in shard_keys(root) for k in keys]


def test_epoch_visits_every_sample_exactly_once(shards):
    batches = take(ranks(shards, 1))
    assert collections.Counter(real_keys(batches)) == collections.Counter(all_keys(shards))
    first = batches[0][0]
    assert first["image"].dtype == torch.uint8 and first["image"].shape[0] == 4
    assert first["label"].dtype == torch.long and len(first["key"]) == 4


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("partial", ["pad", "drop"])
def test_uneven_division_gives_every_rank_the_same_batch_count(shards, world, partial):
    loaders = ranks(shards, world, partial=partial)
    batches = take(loaders)  # asserts lockstep
    assert all(len(b) == loaders[0].batches_per_epoch for b in batches)
    assert all(len(b["key"]) == 4 for per_rank in batches for b in per_rank)
    counts = collections.Counter(real_keys(batches))
    assert max(counts.values()) == 1
    if partial == "pad":
        assert set(counts) == set(all_keys(shards))
    else:
        assert len(counts) >= sum(COUNTS) - world * 4


def test_shard_order_and_samples_change_per_epoch_but_not_per_run(shards):
    a, b = make(shards), make(shards)
    e0 = real_keys([list(a)])
    e1 = real_keys([list(a)])  # a second loop goes on to epoch 1
    assert a.epoch == 1
    b.set_epoch(1)
    assert real_keys([list(b)]) == e1
    assert e0 != e1 and sorted(e0) == sorted(e1)


def test_without_shuffle_the_order_is_manifest_order(shards):
    loader = make(shards, shuffle=False, batch_size=5)
    keys = [k for batch in loader for k in batch["key"]]
    assert keys == all_keys(shards)


def test_num_workers_do_not_change_the_sequence_or_the_augmented_tensors(shards):
    kw = dict(transform=mae_transform(16), batch_size=3)
    ref = take([make(shards, **kw)])[0]
    two = take([make(shards, num_workers=2, **kw)])[0]
    assert [b["key"] for b in ref] == [b["key"] for b in two]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ref, two))


def test_multi_crop_batches_from_workers_equal_in_process_ones(shards):
    """Workers hand uint8 views across the process boundary; the consumer normalises them to the
    float32 values an in-process loader makes."""
    kw = dict(transform=dino_transform(16, local_crops=2), batch_size=3)
    ref = take([make(shards, **kw)], n=3)[0]
    two = take([make(shards, num_workers=2, **kw)], n=3)[0]
    for x, y in zip(ref, two):
        assert "_normalize" not in y and len(y["image"]) == 4
        assert all(b.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(x["image"], y["image"]))


@pytest.mark.faults
def test_resume_same_world_size_yields_identical_sequence_and_tensors(shards):
    kw = dict(transform=mae_transform(16), batch_size=4)
    full = [make(shards, 2, r, **kw) for r in range(2)]
    epoch0, epoch1 = take(full), take(full)
    reference = [epoch0[r] + epoch1[r] for r in range(2)]

    first = [make(shards, 2, r, **kw) for r in range(2)]
    head = take(first, n=5)
    states = [ld.state_dict() for ld in first]
    assert states[0] == states[1]
    state = json.loads(json.dumps(states[0]))

    resumed = [make(shards, 2, r, num_workers=r, **kw) for r in range(2)]  # workers may differ too
    for ld in resumed:
        ld.load_state_dict(state)
        ld.set_epoch(0)  # keeps the loaded position
    tail = take(resumed)
    for ld in resumed:
        ld.set_epoch(1)
    nxt = take(resumed)
    for r in range(2):
        got = head[r] + tail[r] + nxt[r]
        assert [b["key"] for b in got] == [b["key"] for b in reference[r]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(got, reference[r]))


@pytest.mark.faults
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resume_on_another_world_size_serves_each_remaining_sample_once(shards, before, after):
    first = ranks(shards, before)
    head = take(first, n=3)
    state = first[0].state_dict()

    second = ranks(shards, after)
    for ld in second:
        ld.load_state_dict(state)
    tail = take(second)
    counts = collections.Counter(real_keys(head) + real_keys(tail))
    assert counts == collections.Counter(all_keys(shards))

    normal = ranks(shards, after)  # the following epoch is an ordinary one at the new size
    for ld in normal:
        ld.set_epoch(1)
    expected = take(normal)
    got = take(second)
    assert second[0].epoch == 1
    assert [[b["key"] for b in r] for r in got] == [[b["key"] for b in r] for r in expected]


@pytest.mark.faults
def test_two_world_size_changes_in_one_epoch_still_serve_each_sample_once(shards):
    seen = []
    state = None
    for world, n in [(2, 2), (3, 1), (1, None)]:
        loaders = ranks(shards, world)
        if state:
            for ld in loaders:
                ld.load_state_dict(state)
        got = take(loaders, n)
        seen += real_keys(got)
        state = loaders[0].state_dict()
    assert collections.Counter(seen) == collections.Counter(all_keys(shards))


def test_state_at_epoch_end_resumes_into_the_next_epoch(shards):
    a = make(shards)
    list(a)
    state = a.state_dict()
    b = make(shards)
    b.load_state_dict(state)
    b.set_epoch(0)
    assert list(b) == []  # epoch 0 is over
    assert len(b) == b.batches_per_epoch
    c = make(shards)
    c.set_epoch(1)
    assert [x["key"] for x in b] == [x["key"] for x in c]


def test_len_counts_the_remaining_batches(shards):
    loader = make(shards)
    n = loader.batches_per_epoch
    assert len(loader) == n == -(-sum(COUNTS) // 4)
    it = iter(loader)
    next(it), next(it)
    assert len(loader) == n - 2


def test_state_from_a_different_order_is_refused(shards):
    state = make(shards).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make(shards, seed=8).load_state_dict(state)


def test_resample_draws_with_replacement_and_keeps_the_epoch_length(shards):
    loader = make(shards, resample=True)
    keys = real_keys(take([loader]))
    assert len(keys) == sum(COUNTS)
    assert len(set(keys)) < len(keys)


def test_pin_memory_batches_are_usable(shards):
    loader = make(shards, pin_memory=True, num_workers=1, transform=mae_transform(16))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["image"].is_pinned() == torch.cuda.is_available()


def test_user_transform_with_global_rng_is_seeded_per_sample(shards):
    def noisy(img):
        return img.float() + torch.rand(1)

    a = take([make(shards, transform=noisy)], n=2)[0]
    b = take([make(shards, transform=noisy, num_workers=2)], n=2)[0]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))

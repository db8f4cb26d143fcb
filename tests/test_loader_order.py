"""Property tests of the pure order function and the rank split (no data read)."""

from __future__ import annotations

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dataprep._order import Plan, epoch_order, rank_stream, shard_offsets

counts_st = st.lists(st.integers(0, 12), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(counts=counts_st, seed=st.integers(0, 2**40), epoch=st.integers(0, 50), window=st.integers(1, 4))
def test_epoch_order_is_a_permutation_grouped_by_window(counts, seed, epoch, window):
    order = epoch_order(counts, seed, epoch, True, window)
    assert sorted(order.tolist()) == list(range(sum(counts)))
    assert np.array_equal(order, epoch_order(counts, seed, epoch, True, window))  # pure
    offsets = shard_offsets(counts)
    shard_of = np.searchsorted(offsets, order, side="right") - 1
    first_seen: dict[int, int] = {}
    for i, s in enumerate(shard_of.tolist()):
        first_seen.setdefault(s, i)
    last_seen = {s: i for i, s in enumerate(shard_of.tolist())}
    spans = sorted((first_seen[s], last_seen[s]) for s in first_seen)
    # at most `window` shards are ever open at once
    for i in range(len(order)):
        assert sum(1 for a, b in spans if a <= i <= b) <= window


@settings(max_examples=150, deadline=None)
@given(total=st.integers(0, 60), w1=st.integers(1, 5), w2=st.integers(1, 5), batch=st.integers(1, 6),
       steps=st.integers(0, 20), partial=st.sampled_from(["pad", "drop"]))
def test_resplit_serves_every_remaining_sample_exactly_once(total, w1, w2, batch, steps, partial):
    plan = Plan.full(total, w1)
    streams = [rank_stream(plan, r, batch, partial) for r in range(w1)]
    assert len({len(s.positions) for s in streams}) == 1  # equal batches on every rank
    consumed = min(steps * batch, len(streams[0].positions))
    served = [int(p) for s in streams for p, pad in zip(s.positions[:consumed], s.pad[:consumed]) if not pad]
    after = Plan(plan.segments, w1, consumed).resplit(w2, batch, partial)
    assert after.world_size == w2
    rest_streams = [rank_stream(after, r, batch, partial) for r in range(w2)]
    assert len({len(s.positions) for s in rest_streams}) == 1
    rest = [int(p) for s in rest_streams for p, pad in zip(s.positions[after.consumed:], s.pad[after.consumed:])
            if not pad]
    counts = collections.Counter(served + rest)
    assert max(counts.values(), default=1) == 1
    if partial == "pad":
        assert sorted(counts) == list(range(total))
    else:  # drop: only tails smaller than one batch per rank are dropped, in each phase
        assert len(counts) >= total - (w1 + w2) * batch


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 80), world=st.integers(1, 6), batch=st.integers(1, 8))
def test_padding_only_repeats_samples_of_the_epoch(total, world, batch):
    plan = Plan.full(total, world)
    for r in range(world):
        s = rank_stream(plan, r, batch, "pad")
        assert len(s.positions) == plan.batches(batch, "pad") * batch
        assert all(0 <= p < total for p in s.positions.tolist())
        assert s.pad.sum() < batch + 1 or total < world

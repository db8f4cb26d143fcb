"""The driver's columnar scan results (dataprep/_table.py) and the numpy plan (dataprep/_plan.py).

The plan's rule is restated here in plain Python (``_reference``) and the numpy code must agree
with it on random listings with rejects, duplicates, masks and mixed label types."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from dataprep._arrays import Layout
from dataprep._images import DUPLICATE, MASK
from dataprep._plan import PrepError, _argsort_u64, make_plan
from dataprep._sources import Entry
from dataprep._table import EntryTable
from dataprep.options import PrepOptions

_LAYOUTS = [Layout(3, "uint8", 8, 8, True), Layout(6, "uint16", 16, 16, False), Layout(-1, "float32", 4, 4, False)]


def _entries(rng: random.Random, n: int) -> list[Entry]:
    pool = [hashlib.sha256(f"bytes {i}".encode()).hexdigest() for i in range(max(1, n // 2))]  # forces duplicates
    out = []
    for i in range(n):
        kind = rng.choice("fmtp")
        if kind == "f":
            ref = ("f", f"s3://b/img/{i}.png")
        elif kind == "m":
            ref = ("m", tuple(f"s3://b/{i}_c{c}.tif" for c in range(3)))
        else:
            ref = (kind, f"s3://b/part-{rng.randrange(3)}", rng.randrange(10**12), rng.randrange(10**6))
        label = rng.choice([None, 1, "1", "cat", 2.5])
        name = f"dir/é{i}-{rng.randrange(10**6)}"
        if rng.random() < 0.15:
            out.append(Entry(name, ref, label, None, rng.randrange(100), None, rng.choice(["corrupt", "small"]),
                             rng.choice(["", "truncated at byte 12"])))
        else:
            out.append(Entry(name, ref, label, rng.choice(pool), rng.randrange(1, 10**9), rng.choice([None, "jpg", "png"]),
                             layout=rng.choice(_LAYOUTS + [None])))
    return out


def _same_row(table: EntryTable, i: int, e: Entry) -> None:
    assert table.item(i) == (e.key, e.name, e.ref, e.label)
    assert type(table.label_of(i)) is type(e.label)  # 1 and "1" stay apart
    assert (table.fmt_of(i), table.layout_of(i), int(table.size[i])) == (e.fmt, e.layout, e.size)
    assert table.reject_of(i) == ((e.reject, e.detail) if e.reject else None)


def test_table_round_trips_every_entry_field():
    entries = _entries(random.Random(0), 300)
    table = EntryTable.from_entries(entries, seed=3)
    assert len(table) == 300
    for i, e in enumerate(entries):
        _same_row(table, i, e)


def test_concat_remaps_each_tables_codes_and_rows():
    rng = random.Random(1)
    parts = [_entries(rng, n) for n in (40, 0, 75, 1)]
    # tables built apart see values in different orders, so their codes differ
    merged = EntryTable.concat([EntryTable.from_entries(p, seed=s) for p, s in zip(parts, (0, 0, 7, 0))])
    flat = [e for p in parts for e in p]
    assert len(merged) == len(flat)
    for i, e in enumerate(flat):
        _same_row(merged, i, e)
    assert merged.with_seed(5).order.tolist() == EntryTable.from_entries(flat, seed=5).order.tolist()


def test_argsort_u64_is_a_stable_sort_by_every_column():
    rng = np.random.default_rng(0)
    cols = rng.integers(0, 4, size=(2000, 3)).astype(np.uint64) << np.uint64(62)  # many ties in every column
    cols[::7, 0] = np.uint64(2**64 - 1)
    perm = _argsort_u64(cols[:, 0], lambda idx: cols[idx, 1:])
    assert perm.tolist() == np.lexsort((cols[:, 2], cols[:, 1], cols[:, 0])).tolist()


def _reference(entries: list[Entry], options: PrepOptions, masks: dict[str, str] | None):
    """The plan's rule in plain Python: (kept names in sample order, {(input, reason)} rejected early)."""
    early, seen, kept = set(), set(), []
    for pos, e in enumerate(entries):
        if e.reject:
            early.add((e.name, e.reject))
        elif e.key in seen:
            early.add((e.name, DUPLICATE))
        elif masks is not None and e.name not in masks:
            early.add((e.name, MASK))
        else:
            seen.add(e.key)
            kept.append((hashlib.sha256(f"{options.seed}:{e.key}".encode()).digest(), pos, e.name))
    return [name for _, _, name in sorted(kept)], early


@pytest.mark.parametrize("trial", range(6))
def test_plan_follows_the_reference_rule(trial):
    rng = random.Random(100 + trial)
    entries = _entries(rng, rng.randrange(1, 400))
    options = PrepOptions(seed=trial, val_fraction=rng.choice([0.0, 0.25]), to_rgb=True,
                          **({"shard_size": rng.randrange(1, 40)} if trial % 2 else {"shard_bytes": 3 * 10**9}))
    masks = {e.name: f"s3://m/{e.name}.png" for e in entries if rng.random() < 0.8} if trial % 3 == 0 else None
    want_kept, want_early = _reference(entries, options, masks)

    cut = rng.randrange(len(entries) + 1)
    table = EntryTable.concat([EntryTable.from_entries(entries[:cut], seed=9), EntryTable.from_entries(entries[cut:])])
    plan = make_plan(table, None, options, masks)
    shards = list(plan.shards)
    val = [s for s in shards if s.split == "val"]
    got = [name for s in val + [s for s in shards if s.split == "train"] for _, name, _, _ in s.items]
    assert got == want_kept
    assert {(r["input"], r["reason"]) for r in plan.early_rejects} == want_early
    assert len(plan.early_rejects) == len(want_early)
    assert sum(len(s.items) for s in val) == round(len(want_kept) * options.val_fraction)
    keys = sorted(it[0] for s in shards for it in s.items)
    assert plan.content_digest == hashlib.sha256("".join(keys).encode()).hexdigest()
    if masks is not None:
        assert all(s.masks == tuple(masks[it[1]] for it in s.items) for s in shards)

    again = make_plan(entries, None, options, masks)  # Entry objects plan the same as columns
    assert [(s.split, s.index, s.items, s.digest) for s in again.shards] == [(s.split, s.index, s.items, s.digest)
                                                                             for s in shards]
    assert again.content_digest == plan.content_digest


def test_two_keys_sharing_an_order_key_are_refused_not_merged():
    a, b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    table = EntryTable.from_entries([Entry("a", ("f", "s3://b/a")), Entry("b", ("f", "s3://b/b"))])
    table.keys[0] = np.frombuffer(bytes.fromhex(a), np.uint8)
    table.keys[1] = np.frombuffer(bytes.fromhex(b), np.uint8)
    table.order[:], table.seed = 42, 0  # a forged 128-bit collision
    with pytest.raises(PrepError, match="another --seed"):
        make_plan(table, None, PrepOptions(seed=0))


def test_table_holds_about_a_hundred_bytes_per_input():
    """A Parquet-like listing: the columns are the driver's whole per-input cost through the plan."""
    n = 20_000
    entries = [Entry(f"part-{i // 5000:05d}/row-{i:09d}", ("p", f"s3://b/part-{i // 5000:05d}.parquet", i // 1000, i % 1000),
                     i % 10, hashlib.sha256(str(i).encode()).hexdigest(), 110_000, "jpg") for i in range(n)]
    table = EntryTable.from_entries(entries, seed=0)
    per_input = table.nbytes() / n
    assert per_input < 140, per_input  # 32 key + 16 order + 8 name end + 24 name + 3x8 refs/size + codes
    plan = make_plan(table, None, PrepOptions(shard_size=1000))
    assert plan.shards.rows.nbytes / n == 8  # the plan adds one row index per kept input
    assert len(plan.shards) == 20 and plan.shards[3].items[0][1] == table.name(int(plan.shards.rows[3000]))

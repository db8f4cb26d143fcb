"""Mixup / cutmix as the loader's batch transform: keyed by (seed, epoch, sample id), so the mixed
image of a sample is the same on 1 or 2 ranks, under any batch size, and after a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _train_util import write_digit_shards
from dataprep.loader import StreamingLoader
from dataprep.mixing import Mix, partner_table, sample_mix
from dataprep.transforms import dino_transform, mae_transform

MIX = Mix(mixup=0.8, cutmix=1.0, prob=0.9, switch_prob=0.5, seed=7)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return write_digit_shards(str(tmp_path_factory.mktemp("mix") / "data"), images=72, per_shard=24)


def mixed_samples(data_url: str, epoch: int, batch_size: int, world: int, **kw) -> dict[int, tuple]:
    """(image, lambda, partner id, partner label) of every sample the ranks of ``world`` serve in ``epoch``."""
    out: dict[int, tuple] = {}
    for rank in range(world):
        loader = StreamingLoader(data_url, batch_size=batch_size, seed=7, rank=rank, world_size=world,
                                 transform=mae_transform(32, scale=(0.3, 1.0)), mix=MIX, partial="drop", **kw)
        loader.set_epoch(epoch)
        for batch in loader:
            for j, sid in enumerate(batch["index"].tolist()):
                out[sid] = (batch["image"][j], batch["mix_lam"][j], int(batch["partner_index"][j]),
                            int(batch["partner_label"][j]))
    return out


def test_the_mixed_image_of_a_sample_is_the_same_on_one_or_two_ranks_and_any_batch_split(digits):
    one = mixed_samples(digits, 1, batch_size=24, world=1)
    two = mixed_samples(digits, 1, batch_size=8, world=2)
    odd = mixed_samples(digits, 1, batch_size=5, world=1, num_workers=2)
    assert len(one) == 72 and len(two) == 64 and len(odd) == 70  # drop: each rank's tail
    for other in (two, odd):
        for sid, (img, lam, partner, label) in other.items():
            assert torch.equal(img, one[sid][0]) and (lam, partner, label) == one[sid][1:], sid
    lams = np.array([v[1] for v in one.values()])
    assert (lams == 1.0).any() and (lams < 1.0).sum() >= 50  # mix_prob 0.9: a few unmixed
    plain = mixed_samples(digits, 1, batch_size=24, world=1)
    assert all(torch.equal(plain[s][0], one[s][0]) for s in one)  # a pure function: the same again
    assert not torch.equal(mixed_samples(digits, 2, batch_size=24, world=1)[0][0], one[0][0])  # another epoch


def test_partners_are_a_permutation_of_each_shard_and_of_the_served_subset():
    table = partner_table([24, 24, 24], seed=7, epoch=1)
    for shard in range(3):
        ids = np.arange(24 * shard, 24 * (shard + 1))
        assert sorted(table[ids].tolist()) == ids.tolist()  # every sample a partner exactly once, same shard
    assert not np.array_equal(table, partner_table([24, 24, 24], seed=7, epoch=2))
    keep = np.zeros(72, bool)
    keep[::3] = True
    sub = partner_table([24, 24, 24], seed=7, epoch=1, keep=keep)
    assert (sub[~keep] == -1).all() and keep[sub[keep]].all()  # a label subset mixes only within itself


def test_cutmix_lambda_is_the_area_kept_and_mixup_lambda_a_beta_draw():
    kinds = {"cut": 0, "mix": 0, "none": 0}
    for sid in range(200):
        lam, box = sample_mix(MIX, 3, sid, 32, 32)
        assert (lam, box) == sample_mix(MIX, 3, sid, 32, 32)
        if box is not None:
            y0, y1, x0, x1 = box
            assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)
        kinds["cut" if box is not None else "mix" if lam < 1 else "none"] += 1
    assert min(kinds.values()) > 0 and kinds["none"] < 50


def test_resume_after_a_world_size_change_mixes_the_remaining_samples_as_before(digits):
    full = mixed_samples(digits, 0, batch_size=8, world=1)
    first = StreamingLoader(digits, batch_size=8, seed=7, world_size=2, rank=0,
                            transform=mae_transform(32, scale=(0.3, 1.0)), mix=MIX, partial="drop")
    it = iter(first)
    next(it)
    state = first.state_dict()
    resumed = StreamingLoader(digits, batch_size=8, seed=7, transform=mae_transform(32, scale=(0.3, 1.0)),
                              mix=MIX, partial="drop")
    resumed.load_state_dict(state)
    seen = 0
    for batch in resumed:
        for j, sid in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["image"][j], full[sid][0]) and batch["mix_lam"][j] == full[sid][1]
            seen += 1
    assert seen >= 40


def test_a_multi_view_transform_or_resample_with_mix_is_refused_clearly(digits):
    with pytest.raises(ValueError, match="resample"):
        StreamingLoader(digits, batch_size=8, mix=MIX, resample=True)
    loader = StreamingLoader(digits, batch_size=8, mix=MIX, transform=dino_transform(32, local_crops=2, local_size=16))
    with pytest.raises(TypeError, match=r"one float image tensor \[N, C, H, W\]"):
        next(iter(loader))


def test_an_unreadable_sample_is_skipped_once_and_an_unreadable_partner_leaves_its_sample_unmixed(tmp_path):
    from _shards_util import write_shards

    write_shards(str(tmp_path), [24, 24], corrupt={5})
    loader = StreamingLoader(str(tmp_path), batch_size=8, seed=7, transform=mae_transform(32), mix=MIX,
                             skip_budget=None)
    rows = [(sid, partner, lam) for batch in loader
            for sid, partner, lam in zip(batch["index"].tolist(), batch["partner_index"].tolist(), batch["mix_lam"])]
    assert loader.stats["skipped"] == 1  # counted where it is served, not again as a partner
    assert 5 not in {sid for sid, _, _ in rows} and 5 not in {p for _, p, _ in rows}
    orphan = [(sid, p) for sid, p, _ in rows if p == sid and partner_table([24, 24], 7, 0)[sid] == 5]
    assert len(orphan) == 1  # the sample whose partner is unreadable mixes with itself

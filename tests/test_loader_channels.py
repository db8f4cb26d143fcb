"""The loader and transforms on ``[C, H, W]`` data at any dtype: decode without PIL, per-channel
normalisation from the manifest, geometry / jitter / dropout for any C, exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from _cells import cells, write_npy_shards
from dataprep._stats import ChannelStats
from dataprep.loader import StreamingLoader
from dataprep.manifest import ChannelInfo
from dataprep.transforms import (ChannelNormalize, ChannelTransform, bind_channels, channel_dropout, dino_transform,
                                 eval_transform, mae_transform)


def test_loader_yields_the_arrays_bit_exact_without_a_transform(tmp_path):
    arrays = [a for a, _ in cells(per_class=8, classes=3, size=16)]
    write_npy_shards(str(tmp_path), arrays)
    loader = StreamingLoader(str(tmp_path), batch_size=6, shuffle=False, partial="drop")
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.uint16 and batch["image"].shape[1:] == (6, 16, 16)
        for key, img in zip(batch["key"], batch["image"]):
            assert np.array_equal(img.numpy(), arrays[int(key)])
            seen += 1
    assert seen == 24


def test_channel_normalisation_uses_manifest_stats_mean_std_or_percentiles():
    x = np.stack([a for a, _ in cells(per_class=4, classes=2, size=16)])  # [8, 6, 16, 16] uint16
    stats = ChannelStats(6, "uint16")
    for a in x:
        stats.add(a)
    info = ChannelInfo.build(list("abcdef"), "uint16", stats.summary())
    z = torch.stack([ChannelNormalize(info)(torch.from_numpy(a)) for a in x])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    p = ChannelNormalize(info, "percentile")(torch.from_numpy(x[0]))
    lo, hi = np.array(info.p01)[:, None, None], np.array(info.p99)[:, None, None]
    assert torch.allclose(p, torch.from_numpy(np.clip((x[0] - lo) / (hi - lo), 0, 1)).float(), atol=1e-6)
    with pytest.raises(ValueError, match="scaling"):
        ChannelNormalize(info, "minmax")


@pytest.mark.parametrize("channels,dtype", [(6, np.uint16), (4, np.float32), (1, np.int16), (3, np.uint8)])
def test_every_transform_takes_any_channel_count_and_is_a_pure_function_of_the_rng(channels, dtype):
    rng = np.random.default_rng(channels)
    img = torch.from_numpy((rng.normal(100, 20, (channels, 24, 24))).astype(dtype))
    stats = ChannelStats(channels, np.dtype(dtype).name)
    stats.add(img.numpy())
    info = ChannelInfo.build([str(i) for i in range(channels)], np.dtype(dtype).name, stats.summary())
    for base, check in ((mae_transform(16), lambda y: y.shape == (channels, 16, 16)),
                        (eval_transform(16), lambda y: y.shape == (channels, 16, 16)),
                        (dino_transform(16, local_crops=2),
                         lambda y: len(y) == 4 and y[0].shape == (channels, 16, 16) and y[2].shape[0] == channels)):
        t = bind_channels(base, info)
        assert isinstance(t, ChannelTransform) and t.takes_rng and not t.normalize_batched
        a, b, c = t(img, random.Random(7)), t(img, random.Random(7)), t(img, random.Random(8))
        assert check(a)
        flat = lambda y: torch.cat([v.flatten() for v in y]) if isinstance(y, list) else y.flatten()  # noqa: E731
        assert flat(a).dtype == torch.float32 and torch.equal(flat(a), flat(b))
        assert isinstance(base, type(eval_transform(16))) or not torch.equal(flat(a), flat(c))
    assert bind_channels(mae_transform(16), None).__class__.__name__ == "MAETransform"  # RGB data: unchanged


def test_channel_dropout_zeroes_channels_but_always_keeps_one():
    img = torch.ones(5, 4, 4)
    for seed in range(50):
        out = channel_dropout(img, random.Random(seed), p=0.9)
        kept = int((out.flatten(1).abs().sum(1) > 0).sum())
        assert 1 <= kept <= 5
    assert torch.equal(channel_dropout(img, random.Random(0), p=0.0), img)


def test_resume_mid_epoch_on_channel_data_yields_identical_augmented_batches(tmp_path):
    arrays = [a for a, _ in cells(per_class=10, classes=3, size=16)]
    write_npy_shards(str(tmp_path), arrays)

    def loader():
        return StreamingLoader(str(tmp_path), batch_size=4, seed=5, transform=dino_transform(16, local_crops=1))

    full = [b["image"] for b in loader()]
    first = loader()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["image"] for b in resumed]
    assert len(rest) == len(full) - 3
    for got, want in zip(rest, full[3:]):
        assert all(g.shape[1] == 6 and torch.equal(g, w) for g, w in zip(got, want))


def test_mae_and_eval_channel_transforms_move_the_mask_with_the_image_dino_refuses():
    """Four one-hot quadrant channels and a mask of quadrant ids: after any crop, flip and rotation the
    mask names the channel that is hot at every unambiguous pixel; the image is what ``__call__`` draws."""
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[:16, 16:], ids[16:, :16], ids[16:, 16:] = 1, 2, 3
    img = torch.nn.functional.one_hot(ids, 4).permute(2, 0, 1).float() * 100.0  # [4, 32, 32]
    stats = ChannelStats(4, "float32")
    stats.add(img.numpy())
    info = ChannelInfo.build(list("abcd"), "float32", stats.summary())
    for base in (mae_transform(16, scale=(0.3, 1.0)), eval_transform(16)):
        t = bind_channels(base, info)
        assert t.takes_mask
        checked = 0
        for seed in range(20):
            out, mask = t.augment_pair(img, ids, random.Random(seed))
            assert torch.equal(out, t(img, random.Random(seed))) and mask.shape == (16, 16) == out.shape[1:]
            top2 = out.topk(2, dim=0).values
            sure = (top2[0] - top2[1]) > 0.5 * (out.max() - out.min())  # far from any blended boundary
            assert torch.equal(mask[sure], out.argmax(dim=0)[sure]), (type(base).__name__, seed)
            checked += int(sure.sum())
        assert checked > 0.6 * 20 * 256
    dino = bind_channels(dino_transform(16, local_crops=2), info)
    assert not dino.takes_mask
    with pytest.raises(ValueError, match="masks go with"):
        dino.augment_pair(img, ids, random.Random(0))

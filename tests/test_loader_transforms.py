"""MAE, DINO multi-crop and eval transforms: shapes relative to img_size, exact determinism per rng."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from dataprep._order import sample_seed
from dataprep.loader import StreamingLoader
from dataprep.transforms import dino_transform, eval_transform, mae_transform
from tests._shards_util import write_shards


def image(h=40, w=48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size", [32, 224])
def test_mae_transform_shape_and_normalization(size):
    out = mae_transform(size)(image(), rng=random.Random(1))
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert -3 < out.mean().item() < 3


def test_dino_transform_gives_two_global_and_n_local_crops_sized_relative_to_img_size():
    views = dino_transform(32, local_crops=3)(image(), rng=random.Random(2))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    big = dino_transform(224, local_crops=2)(image(256, 300), rng=random.Random(2))
    assert [tuple(v.shape) for v in big] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
    custom = dino_transform(32, local_crops=1, local_size=12)(image(), rng=random.Random(2))
    assert custom[-1].shape == (3, 12, 12)


def test_dino_view_probabilities_change_only_their_own_op_and_reach_the_stage_config():
    import torchvision.transforms.v2.functional as F
    from pydantic import ValidationError

    from jobs.dino import DINOConfig, DINOMethod

    img = image(64, 64)
    plain = dino_transform(32, local_crops=2, solarize_p=0.0).augment(img, random.Random(5))
    always = dino_transform(32, local_crops=2, solarize_p=1.0).augment(img, random.Random(5))
    assert torch.equal(always[1], F.solarize(plain[1], 128))  # the same crop and draws, then solarized
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(plain, always)) if i != 1)
    default = dino_transform(32, local_crops=2).augment(img, random.Random(5))
    official = dino_transform(32, local_crops=2, blur_p=(1.0, 0.1, 0.5), solarize_p=0.2, color_jitter_p=0.8,
                              grayscale_p=0.2).augment(img, random.Random(5))
    assert all(torch.equal(a, b) for a, b in zip(default, official))  # main_dino.py's values by default
    none = dino_transform(32, local_crops=2, blur_p=(0, 0, 0), solarize_p=0, color_jitter_p=0, grayscale_p=0)
    assert none.augment(img, random.Random(5))[0].shape == (3, 32, 32)

    cfg = DINOConfig(name="d", data="/unused", views={"solarize_p": 0, "blur_p": [0, 0, 0.5]})
    t = DINOMethod(cfg).train_transform()
    assert (t.global2.solarize_p, t.global1.blur_p, t.local.blur_p, t.global1.color_jitter_p) == (0, 0, 0.5, 0.8)
    assert DINOConfig(name="d", data="/unused").digest() != cfg.digest()
    with pytest.raises(ValidationError, match=r"blur_p \[1.0, 2.0, 0.5\]: each probability must be in \[0, 1\]"):
        DINOConfig(name="d", data="/unused", views={"blur_p": [1, 2, 0.5]})


def test_eval_transform_resizes_and_center_crops():
    out = eval_transform(32)(image(40, 80))
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, eval_transform(32)(image(40, 80)))


@pytest.mark.parametrize("make", [lambda: mae_transform(32), lambda: dino_transform(32, local_crops=2)])
def test_transforms_are_deterministic_per_rng_seed(make):
    t = make()
    a, b, c = (t(image(), rng=random.Random(s)) for s in (5, 5, 6))
    flat = lambda x: torch.cat([v.flatten() for v in x]) if isinstance(x, list) else x  # noqa: E731
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_transforms_accept_pil_and_grayscale_images():
    pil = Image.fromarray(image().permute(1, 2, 0).numpy())
    assert mae_transform(16)(pil, rng=random.Random(0)).shape == (3, 16, 16)
    gray = image()[:1]
    assert dino_transform(32, local_crops=1)(gray, rng=random.Random(0))[0].shape == (3, 32, 32)


def test_loader_collates_multi_crop_views_into_one_tensor_per_view(tmp_path):
    write_shards(str(tmp_path), [5, 6], sizes=[(32, 32), (40, 36)])
    loader = StreamingLoader(str(tmp_path), batch_size=4, transform=dino_transform(32, local_crops=2))
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch["image"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    raw = next(iter(StreamingLoader(str(tmp_path), batch_size=4, shuffle=False)))
    assert isinstance(raw["image"], (list, torch.Tensor))  # mixed sizes without a transform: a list


@pytest.mark.parametrize("make", [lambda: mae_transform(16), lambda: dino_transform(32, local_crops=2)])
def test_loader_images_equal_the_transform_called_with_the_per_sample_seed(tmp_path, make):
    write_shards(str(tmp_path), [5, 6])
    t = make()
    loader = StreamingLoader(str(tmp_path), batch_size=4, seed=3, transform=t)
    loader.set_epoch(2)
    batch = next(iter(loader))
    raw = StreamingLoader(str(tmp_path), batch_size=4, seed=3)
    raw.set_epoch(2)
    plain = next(iter(raw))
    assert plain["key"] == batch["key"]
    for i, sid in enumerate(batch["index"].tolist()):
        expected = t(plain["image"][i], rng=random.Random(sample_seed(3, 2, sid)))
        if isinstance(expected, list):  # multi-crop: one batch tensor per view
            assert all(torch.equal(v[i], e) for v, e in zip(batch["image"], expected))
        else:
            assert torch.equal(batch["image"][i], expected)

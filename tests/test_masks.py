"""Per-sample segmentation masks: prep pairs, checks and writes them; the loader moves them with the image."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from _shapes import write_shapes
from dataprep._masks import decode_mask, encode_mask
from dataprep.loader import StreamingLoader
from dataprep.manifest import load_manifest
from dataprep.prep import PrepOptions, run_prep
from torchvision.transforms import InterpolationMode

from dataprep.transforms import RandomResizedCropFlip, eval_transform, mae_transform, resize_nearest


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_masks_decode_8_and_16_bit_and_refuse_colour_and_jpeg():
    eight = np.arange(12, dtype=np.uint8).reshape(3, 4)
    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)
    assert np.array_equal(decode_mask(encode_mask(eight)), eight)
    assert np.array_equal(decode_mask(encode_mask(sixteen)), sixteen)
    with pytest.raises(ValueError, match="mode RGB"):
        decode_mask(_png(np.zeros((3, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match="not a PNG"):
        decode_mask(b"\xff\xd8\xff\xe0 jpeg")
    with pytest.raises(ValueError, match="corrupt"):
        decode_mask(encode_mask(eight)[:40])


def test_pair_augmentation_moves_mask_with_image_and_is_deterministic():
    """A mask equal to a channel of the image stays equal to it after crop, flip and resize (NEAREST)."""
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 4, (8, 8), generator=g)
    big = classes.repeat_interleave(8, 0).repeat_interleave(8, 1)  # [64, 64], blocks of 8 px
    img = (big * 60).to(torch.uint8).expand(3, -1, -1).contiguous()
    t = mae_transform(16, scale=(0.3, 1.0))
    for seed in range(5):
        out, mask = t.augment_pair(img, big.int(), random.Random(seed))
        again, mask2 = t.augment_pair(img, big.int(), random.Random(seed))
        assert torch.equal(out, again) and torch.equal(mask, mask2) and mask.shape == (16, 16)
        assert torch.equal(out, t.augment(img, random.Random(seed)))  # the image draws as without a mask
        exact = RandomResizedCropFlip(16, (0.3, 1.0), interpolation=InterpolationMode.NEAREST_EXACT)
        out, mask = exact.pair(img, big.int(), random.Random(seed))
        assert torch.equal(out[0].long(), mask.long() * 60)  # the same pixels, crop, flip and sampling
    e_img, e_mask = eval_transform(16).augment_pair(img, big.int())
    assert e_mask.shape == (16, 16) and torch.equal(e_img, eval_transform(16).augment(img))
    assert torch.equal(resize_nearest(classes, (16, 16))[::2, ::2], classes)


def test_prep_writes_masks_from_a_paired_folder_and_the_loader_serves_them(tmp_path, ray_local):
    images, masks = write_shapes(str(tmp_path / "shapes"), count=24, size=32, seed=1)
    # one mask of the wrong size and one missing: both inputs rejected with the reason
    victims = sorted((tmp_path / "shapes/masks").rglob("*.png"))[:2]
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(victims[0])
    victims[1].unlink()
    dest = str(tmp_path / "out")
    opts = PrepOptions(shard_size=8, format="png", masks=masks, val_fraction=0.25, reject_threshold=0.2)
    result = run_prep(images, dest, opts, progress=False)
    m = result.manifest
    assert m.masks is not None and m.masks.classes == 4
    assert m.rejects == {"mask": 2} and m.totals["written"] == 22
    rejects = [json.loads(line) for line in open(f"{dest}/rejects.jsonl")]
    details = " ".join(r["detail"] for r in rejects)
    assert "16x16 px but its image is 32x32" in details and "no mask" in details

    loader = StreamingLoader(dest, "train", batch_size=4, transform=mae_transform(16), masks=True, partial="drop")
    batch = next(iter(loader))
    assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == torch.long
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3} and batch["mask"].max() > 0
    again = next(iter(StreamingLoader(dest, "train", batch_size=4, transform=mae_transform(16), masks=True,
                                      partial="drop")))
    assert torch.equal(batch["mask"], again["mask"]) and torch.equal(batch["image"], again["image"])
    plain = next(iter(StreamingLoader(dest, "train", batch_size=4, transform=mae_transform(16), partial="drop")))
    assert "mask" not in plain and torch.equal(plain["image"], batch["image"])  # masks change no image draw
    raw = next(iter(StreamingLoader(dest, "val", batch_size=2, masks=True, shuffle=False)))
    for img, mask in zip(raw["image"], raw["mask"]):
        assert mask.shape == img.shape[-2:]
    assert load_manifest(dest)[0].masks.classes == 4


def test_list_column_masks_and_clear_errors_for_sources_that_cannot_carry_them(tmp_path):
    from dataprep._images import Reject
    from dataprep._masks import process_mask
    from dataprep._sources import SourceError, attach_masks, list_source

    (tmp_path / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "list.csv").write_text("path,label,mask\na.png,1,m/a.png\nb.png,0,\n")
    listing = list_source(str(tmp_path / "list.csv"))
    attach_masks(listing, "column")
    assert listing.masks == {"a.png": str(tmp_path / "m" / "a.png")}  # b.png has none: prep rejects it
    assert [label for _, _, label in listing.files] == ["1", "0"]
    (tmp_path / "list.jsonl").write_text('{"path": "a.png", "mask": "m/a.png"}\n')
    jsonl = list_source(str(tmp_path / "list.jsonl"))
    before = jsonl.fingerprint
    attach_masks(jsonl, "column")
    assert jsonl.masks == {"a.png": str(tmp_path / "m" / "a.png")} and jsonl.fingerprint != before
    flat = list_source(str(tmp_path / "list.csv").replace("list.csv", ""), kind="flat")
    with pytest.raises(SourceError, match="masks: column needs a CSV"):
        attach_masks(flat, "column")
    with pytest.raises(SourceError, match="does not exist"):
        attach_masks(flat, str(tmp_path / "nowhere"))
    with pytest.raises(Reject, match="corrupt PNG"):
        process_mask(encode_mask(np.zeros((8, 8), np.uint8))[:30], (8, 8), (8, 8), "m/a.png")
    png, top = process_mask(encode_mask(np.full((8, 8), 300, np.uint16)), (8, 8), (4, 4), "m/a.png")
    assert top == 300 and decode_mask(png).shape == (4, 4) and decode_mask(png).dtype == np.uint16

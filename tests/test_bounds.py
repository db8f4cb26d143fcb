"""The training-time pixel bound (dataprep/_bounds.py ``pixels_of``): header sizes without a decode."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dataprep._bounds import pixels_of
from dataprep.loader import StreamingLoader
from tests._shards_util import write_shards


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_a_forged_frame_header_counts_at_the_size_it_claims_and_a_broken_header_is_an_error():
    jpeg = _encode(Image.new("RGB", (16, 16)), "JPEG")
    sof = jpeg.index(b"\xff\xc0")

    def forged(side: int) -> bytes:
        return jpeg[:sof + 5] + side.to_bytes(2, "big") + side.to_bytes(2, "big") + jpeg[sof + 9:]

    assert pixels_of(forged(10000), "jpg") == 10000 * 10000  # over prep's max_pixels: the loader refuses it
    with pytest.raises(Image.DecompressionBombError):
        pixels_of(forged(60000), "jpg")  # PIL refuses to open it at all: unreadable, skipped the same way
    assert pixels_of(_encode(Image.new("L", (7, 5)), "PNG"), "png") == 35
    with pytest.raises(Exception):
        pixels_of(jpeg[:3], "jpg")  # no frame header to read: an error (the loader skips the sample)


def test_the_loader_refuses_an_image_over_max_pixels_undecoded(tmp_path):
    write_shards(str(tmp_path), [6], ext="jpg", sizes=[(32, 32), (64, 64)])
    loader = StreamingLoader(str(tmp_path), batch_size=6, max_pixels=32 * 32, on_error="skip", skip_budget=None,
                             shuffle=False)
    batch = next(iter(loader))
    assert loader.stats["skipped"] == 3 and int(batch["pad"].sum()) == 3
    assert all(img.shape[-2:] == (32, 32) for img in batch["image"])

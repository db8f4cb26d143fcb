"""dataprep/_arrays.py and _stats.py without Ray: every source layout decodes to the same
``[C, H, W]`` array, resizing rounds back within half a count, statistics are exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from _cells import cells, tiff_bytes
from dataprep._arrays import ArraySpec, encode_npy, probe, process_array, read_array, read_sample
from dataprep._images import Reject
from dataprep._stats import ChannelStats


@pytest.fixture(scope="module")
def cell() -> np.ndarray:
    return cells(per_class=1, classes=1, size=32)[0][0]  # [6, 32, 32] uint16


def _png16(plane: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG")
    return buf.getvalue()


def test_every_layout_decodes_to_the_source_array_and_probes_its_layout(cell):
    npy = encode_npy(cell)
    for data in (tiff_bytes(cell, "multipage"), tiff_bytes(cell, "multisample"), npy):
        arr = read_array(data)
        assert arr.dtype == np.uint16 and np.array_equal(arr, cell)
        layout = probe(data)
        assert (layout.channels, layout.dtype, layout.height, layout.width, layout.rgb_safe) == (6, "uint16", 32, 32, False)
    parts = [_png16(p) for p in cell]  # one 16-bit PNG per channel
    assert np.array_equal(read_sample(parts), cell) and probe(parts[0]).dtype == "uint16"
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert probe(buf.getvalue()).rgb_safe and np.array_equal(read_array(buf.getvalue()), rgb.transpose(2, 0, 1))


def test_rejects_name_what_was_wrong(cell):
    with pytest.raises(Reject) as e:
        read_sample([_png16(cell[0]), _png16(cell[1][:16])])
    assert e.value.reason == "channels" and "1 x uint16 16x32" in e.value.detail
    with pytest.raises(Reject) as e:
        process_array([encode_npy(cell)], ArraySpec(channels=5, dtype="uint16"))
    assert e.value.reason == "channels" and "had 6 x uint16, expected 5 x uint16" in e.value.detail
    bad = cell.astype(np.float32)
    bad[4, 0, 0] = np.inf
    with pytest.raises(Reject) as e:
        process_array([encode_npy(bad)], ArraySpec())
    assert e.value.reason == "non_finite" and "[4]" in e.value.detail
    with pytest.raises(Reject) as e:
        process_array([encode_npy(cell.astype(np.int64))], ArraySpec())
    assert e.value.reason == "unsupported"


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "float32", "float16"])
def test_resize_resamples_each_channel_in_float32_and_rounds_back_within_half_a_count(cell, dtype):
    src = (cell.astype(np.int64) - (1000 if dtype == "int16" else 0)).astype(dtype) if dtype != "uint8" else \
        (cell // 8).astype(np.uint8)
    data, out = process_array([encode_npy(src)], ArraySpec(resize=16))
    assert out.shape == (6, 16, 16) and out.dtype == src.dtype and np.array_equal(np.load(io.BytesIO(data)), out)
    ref = torch.nn.functional.interpolate(torch.from_numpy(src.astype(np.float32))[None], size=(16, 16),
                                          mode="bilinear", antialias=True)[0].numpy()
    tol = 0.5 if np.dtype(dtype).kind in "ui" else (1e-3 * np.abs(ref).max() if dtype == "float16" else 0.0)
    assert np.abs(out.astype(np.float64) - ref).max() <= tol + 1e-9
    _, same = process_array([encode_npy(src)], ArraySpec(resize=64))  # never enlarges: bit-exact
    assert np.array_equal(same, src)


def test_channel_stats_merge_to_numpys_values_for_every_dtype():
    rng = np.random.default_rng(0)
    for dtype in ("uint8", "uint16", "int16", "float16", "float32"):
        if np.dtype(dtype).kind == "f":
            arrays = [rng.normal(-3, 2, (3, 9, 11)).astype(dtype) for _ in range(6)]
        else:
            info = np.iinfo(dtype)
            arrays = [rng.integers(max(info.min, -900), min(info.max, 4000), (3, 9, 11)).astype(dtype) for _ in range(6)]
        a, b = ChannelStats(3, dtype), ChannelStats(3, dtype)
        for x in arrays[:2]:
            a.add(x)
        for x in arrays[2:]:
            b.add(x)
        merged = ChannelStats.from_json(a.to_json())
        merged.merge(ChannelStats.from_json(b.to_json()))
        got, x = merged.summary(), np.stack(arrays).astype(np.float64)
        exact = dtype != "float32"
        for c in range(3):
            assert got["mean"][c] == pytest.approx(x[:, c].mean(), rel=1e-12)
            assert got["std"][c] == pytest.approx(x[:, c].std(), rel=1e-12)
            for key, q in (("p01", 1), ("p99", 99)):
                assert got[key][c] == pytest.approx(np.percentile(x[:, c], q), rel=1e-12 if exact else 2 ** -7)

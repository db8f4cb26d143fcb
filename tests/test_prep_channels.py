"""``format: npy``: multi-channel, 16-bit and float inputs kept bit-exact from source to tensor
(real Ray, plain webdataset, the streaming loader), per-channel statistics in the manifest, and
every input that cannot be kept so refused with a reason."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tifffile
import webdataset as wds

from _cells import CHANNELS, cells, tiff_bytes, write_channel_list, write_float_npy, write_tiff_folder
from _prep_util import download, output_objects
from cluster.storage import Store
from dataprep.loader import StreamingLoader
from dataprep.manifest import load_manifest
from dataprep.prep import PrepError, PrepOptions, run_prep


def _read_back(dest: str, tmp_path, tag: str) -> tuple[dict[str, tuple[np.ndarray, str]], object]:
    """{source name: (array, split)} as the plain webdataset library decodes the shards."""
    m, _ = load_manifest(dest)
    paths = download(output_objects(dest, m), str(tmp_path / f"read-{tag}"))
    out = {}
    for name, path in paths.items():
        for s in wds.WebDataset([path], shardshuffle=False).decode():  # default decoders: np.load for .npy
            out[s["json"]["src"]] = (s["npy"], name.split("/")[0])
    assert len(out) == m.totals["written"] and m.totals["inputs"] == m.totals["written"] + m.totals["rejected"]
    return out, m


def _check_stats(m, train: list[np.ndarray]) -> None:
    x = np.stack(train).astype(np.float64)  # [N, C, H, W]
    for c in range(x.shape[1]):
        xc = x[:, c]
        for got, want in ((m.channels.mean[c], xc.mean()), (m.channels.std[c], xc.std())):
            assert got == pytest.approx(want, rel=1e-6)
        for got, q in ((m.channels.p01[c], 1), (m.channels.p99[c], 99)):
            tol = 1e-6 if np.issubdtype(np.dtype(m.channels.dtype), np.integer) else 2 ** -7  # see dataprep/_stats
            assert got == pytest.approx(np.percentile(xc, q), rel=tol)


def _loader_arrays(dest: str) -> dict[str, np.ndarray]:
    """key -> tensor as the streaming loader yields it (no transform)."""
    out = {}
    for split in load_manifest(dest)[0].splits:
        loader = StreamingLoader(dest, split=split, batch_size=8, shuffle=False, partial="drop")
        for batch in loader:
            for key, img in zip(batch["key"], batch["image"]):
                out[key] = img.numpy()
    return out


def test_npy_prep_keeps_every_layout_bit_exact_with_exact_channel_stats(tmp_path, ray_local):
    samples = cells(per_class=8, classes=3, size=32)
    layouts = {
        "multipage": (str(tmp_path / "mp"), write_tiff_folder(str(tmp_path / "mp"), samples, "multipage"), None),
        "multisample": (str(tmp_path / "ms"), write_tiff_folder(str(tmp_path / "ms"), samples, "multisample"), None),
        "list": (*write_channel_list(str(tmp_path / "list"), samples), CHANNELS),
        "float": (str(tmp_path / "sar"), write_float_npy(str(tmp_path / "sar"), samples), None),
    }
    for tag, (src, sources, channels) in layouts.items():
        dest = str(tmp_path / f"out-{tag}")
        options = PrepOptions(format="npy", shard_size=10, val_fraction=0.25, channels=channels)
        run_prep(src, dest, options, progress=False)
        got, m = _read_back(dest, tmp_path, tag)
        assert set(got) == set(sources), tag  # nothing rejected, nothing lost
        for name, (arr, _) in got.items():
            want = sources[name]
            assert arr.dtype == want.dtype and arr.shape == want.shape == (6, 32, 32), (tag, name)
            assert np.array_equal(arr, want), (tag, name)
        assert m.image_ext == "npy" and m.channels.dtype == next(iter(sources.values())).dtype.name
        assert m.channels.names == (channels or [str(i) for i in range(6)]) and len(m.channels.digest) == 64
        assert m.classes == ["0", "1", "2"]
        _check_stats(m, [arr for arr, split in got.values() if split == "train"])
        if tag == "multipage":  # the loader hands the same arrays over as tensors, no PIL in between
            by_key = _loader_arrays(dest)
            assert len(by_key) >= m.totals["written"] - 2 * 7  # partial='drop' may leave a short tail
            keys = {s["__key__"]: s["json"]["src"] for p in download(output_objects(dest, m), str(tmp_path / "k")).values()
                    for s in wds.WebDataset([p], shardshuffle=False).decode()}
            for key, arr in by_key.items():
                assert arr.dtype == np.uint16 and np.array_equal(arr, sources[keys[key]])


def _lzw_tiff(arr: np.ndarray) -> bytes:
    """A TIFF whose compression tag says LZW: tifffile cannot decode it without imagecodecs."""
    data = bytearray(_single_page(arr))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags["Compression"]
        offset = tag.valueoffset
    data[offset:offset + 2] = (5).to_bytes(2, "little")
    return bytes(data)


def _single_page(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(arr.transpose(1, 2, 0)), photometric="minisblack", planarconfig="contig")
    return buf.getvalue()


def test_npy_prep_rejects_other_channel_counts_nan_and_unreadable_compression_with_reasons(tmp_path, ray_local):
    samples = cells(per_class=6, classes=2, size=16)
    src = tmp_path / "mixed"
    write_tiff_folder(str(src), samples, "multipage")
    four = samples[0][0][:4].copy()
    (src / "0" / "four-channels.tif").write_bytes(tiff_bytes(four + 1, "multipage"))
    (src / "1" / "lzw.tif").write_bytes(_lzw_tiff(samples[1][0] + 2))
    dest = str(tmp_path / "out")
    run_prep(str(src), dest, PrepOptions(format="npy", shard_size=5, reject_threshold=0.5), progress=False)
    m, _ = load_manifest(dest)
    rejects = {r["input"]: r for r in map(json.loads, Store(dest).get_bytes("rejects.jsonl").decode().splitlines())}
    assert {k: r["reason"] for k, r in rejects.items()} == {"0/four-channels.tif": "channels", "1/lzw.tif": "unsupported"}
    assert "had 4 x uint16, expected 6 x uint16" in rejects["0/four-channels.tif"]["detail"]
    assert m.totals == {**m.totals, "inputs": 14, "written": 12, "rejected": 2}
    assert m.rejects == {"channels": 1, "unsupported": 1}

    floats = tmp_path / "floats"
    write_float_npy(str(floats), samples[:6])
    bad = np.load(floats / "0" / "sar-0000.npy")
    bad[2, 3, 4] = np.nan
    np.save(floats / "0" / "nan.npy", bad)
    dest = str(tmp_path / "out-float")
    run_prep(str(floats), dest, PrepOptions(format="npy", reject_threshold=0.5), progress=False)
    m, _ = load_manifest(dest)
    rejects = [json.loads(x) for x in Store(dest).get_bytes("rejects.jsonl").decode().splitlines()]
    assert [(r["input"], r["reason"]) for r in rejects] == [("0/nan.npy", "non_finite")]
    assert "channel(s) [2]" in rejects[0]["detail"]
    assert (m.totals["inputs"], m.totals["written"], m.totals["rejected"]) == (7, 6, 1)


def test_rgb_formats_refuse_inputs_that_would_lose_channels_or_bit_depth_unless_to_rgb(tmp_path, ray_local):
    from PIL import Image

    src = tmp_path / "png16"
    os.makedirs(src)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / f"rgb-{i}.png")
    Image.fromarray((1000 + rng.integers(0, 200, (16, 16))).astype(np.uint16)).save(src / "sixteen.png")
    with pytest.raises(PrepError, match=r"sixteen\.png \(1 x uint16 16x16\).*format: npy.*--to-rgb"):
        run_prep(str(src), str(tmp_path / "refused"), PrepOptions(format="png"), progress=False)
    assert not os.path.exists(tmp_path / "refused" / "manifest.json")
    result = run_prep(str(src), str(tmp_path / "converted"), PrepOptions(format="png", to_rgb=True), progress=False)
    assert result.manifest.totals["written"] == 4 and result.manifest.channels is None


def test_one_file_per_channel_lists_from_s3_jsonl_and_parquet_via_the_cli(tmp_path, s3_url, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipeline.cli import app

    samples = cells(per_class=4, classes=2, size=16)
    csv_path, sources = write_channel_list(str(tmp_path / "list"), samples)
    store = Store(f"{s3_url}/src")
    for name in os.listdir(tmp_path / "list" / "plate1"):
        store.put_file(str(tmp_path / "list" / "plate1" / name), f"plate1/{name}")
    order = ["Mito", "DNA", "ER"]  # a subset, in another order than the files' columns
    rows = [dict(zip(CHANNELS, [f"plate1/w{i:04d}_{c}.tif" for c in CHANNELS]), label=str(lb))
            for i, (_, lb) in enumerate(samples)]
    store.put_bytes("cells.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "list" / "cells.parquet"))
    expected = {f"plate1/w{i:04d}_Mito.tif": a[[CHANNELS.index(c) for c in order]] for i, (a, _) in enumerate(samples)}

    for tag, src in (("jsonl", f"{s3_url}/src/cells.jsonl"), ("parquet", str(tmp_path / "list" / "cells.parquet"))):
        dest = str(tmp_path / f"out-{tag}")
        result = CliRunner().invoke(app, ["prep", src, dest, "--format", "npy", "--channels", ",".join(order),
                                          "--shard-size", "5", "--no-progress"])
        assert result.exit_code == 0, result.output
        got, m = _read_back(dest, tmp_path, tag)
        assert m.channels.names == order and m.classes == ["0", "1"]
        assert set(got) == set(expected) and all(np.array_equal(a, expected[k]) for k, (a, _) in got.items())
    result = CliRunner().invoke(app, ["prep", csv_path, str(tmp_path / "bad"), "--format", "npy", "--channels",
                                      "DNA,Golgi", "--no-progress"])
    assert result.exit_code != 0 and "no column(s) ['Golgi']" in result.output


def test_npy_files_are_samples_wherever_a_source_is_scanned(tmp_path, ray_local):
    import tarfile

    from dataprep._arrays import encode_npy
    from dataprep._sources import SourceError, list_source

    samples = cells(per_class=3, classes=2, size=16)
    tar_path = tmp_path / "wds" / "part-000.tar"  # a WebDataset tar of <key>.npy + <key>.cls members
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for i, (arr, label) in enumerate(samples):
            for member, data in ((f"s{i:03d}.npy", encode_npy(arr)), (f"s{i:03d}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dest = str(tmp_path / "out")
    run_prep(str(tmp_path / "wds"), dest, PrepOptions(format="npy", shard_size=4), progress=False)
    got, m = _read_back(dest, tmp_path, "wds")
    assert m.totals["rejected"] == 0 and len(got) == len(samples)
    want = {f"part-000.tar:s{i:03d}": a for i, (a, _) in enumerate(samples)}
    assert all(np.array_equal(a, want[k]) and a.dtype == np.uint16 for k, (a, _) in got.items())

    folder = tmp_path / "folder"  # class folders of .npy: an ImageFolder; a .npy at the root is an input too
    (folder / "0").mkdir(parents=True)
    np.save(folder / "0" / "a.npy", samples[0][0])
    (folder / "README.txt").write_text("not an image")
    listing = list_source(str(folder))
    assert listing.kind == "imagefolder" and [f[0] for f in listing.files] == ["0/a.npy"]
    np.save(folder / "stray.npy", samples[1][0])  # as a stray .jpg would: the folder is flat, nothing dropped
    assert {f[0] for f in list_source(str(folder)).files} == {"0/a.npy", "stray.npy", "README.txt"}
    with pytest.raises(SourceError, match=r"images outside class folders \(e\.g\. 'stray\.npy'\)"):
        list_source(str(folder), kind="imagefolder")

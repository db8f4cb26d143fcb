"""``run_prep`` end to end on real SeaweedFS S3 and real Ray: accounting, rejects, interop, determinism,
reruns. Ray runs are few and each checks many facts (task start-up dominates on 2 cores)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile

import pytest
import io

from PIL import Image

from _prep_util import bad_inputs, download, odd_but_good, output_objects, read_with_webdataset, sha, write_files
from cluster.storage import Store
from dataprep.manifest import load_manifest
from dataprep.prep import DestConflictError, PrepOptions, TooManyRejectsError, run_prep


@pytest.fixture
def messy_imagefolder(images_dir) -> tuple[str, dict[str, str]]:
    """The 3-class digits ImageFolder plus awkward-but-valid images, bad inputs and a duplicate.

    Returns (root, expected reject reason per input name)."""
    odd = odd_but_good()
    write_files(images_dir, {f"1/{name}": data for name, data in odd.items()})
    bad = bad_inputs()
    write_files(images_dir, {f"0/{name}": data for name, (data, _) in bad.items()})
    shutil.copy(os.path.join(images_dir, "2", sorted(os.listdir(os.path.join(images_dir, "2")))[0]),
                os.path.join(images_dir, "2", "zz copy.png"))
    expected = {f"0/{name}": reason for name, (_, reason) in bad.items()}
    expected["2/zz copy.png"] = "duplicate"
    return images_dir, expected


def _source_files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.mark.faults
def test_prep_to_s3_accounts_rejects_reads_back_with_webdataset_and_is_byte_identical(
        messy_imagefolder, s3_url, ray_local, tmp_path):
    src, expected_rejects = messy_imagefolder
    options = PrepOptions(shard_size=16, resize=16, val_fraction=0.2, seed=3, reject_threshold=0.2,
                          to_rgb=True)  # the 16-bit PNG among the odd inputs becomes 8-bit RGB on purpose
    result = run_prep(src, s3_url, options, progress=False)
    m, _ = load_manifest(s3_url)

    # accounting: every input is written or rejected, with the reason each bad input deserves
    inputs = _source_files(src)
    assert m.totals["inputs"] == len(inputs) == m.totals["written"] + m.totals["rejected"]
    rejects = [json.loads(line) for line in Store(s3_url).get_bytes("rejects.jsonl").decode().splitlines()]
    assert {r["input"]: r["reason"] for r in rejects} == expected_rejects
    assert all(r["detail"] for r in rejects)
    assert m.rejects == {reason: list(expected_rejects.values()).count(reason) for reason in set(expected_rejects.values())}
    assert m.totals["duplicates"] == 1 and m.classes == ["0", "1", "2"] and m.image_ext == "jpg"
    # val holds 20 % of the distinct inputs, less those rejected while decoding
    assert set(m.splits) == {"train", "val"} and m.totals["train"] + m.totals["val"] == m.totals["written"]
    assert round(0.2 * (len(inputs) - 2)) - 5 <= m.totals["val"] <= round(0.2 * (len(inputs) - 2))
    assert all(s.samples <= 16 for split in m.splits.values() for s in split.shards)

    # the manifest's bytes/sha256 describe the objects; the plain webdataset library reads them back exactly
    objects = output_objects(s3_url, m)
    for split in m.splits.values():
        for shard in split.shards:
            assert (len(objects[shard.name]), sha(objects[shard.name])) == (shard.bytes, shard.sha256)
    paths = download(objects, str(tmp_path / "shards"))
    for path in paths.values():  # member names never carry input names: <sha256>.<ext>, fixed metadata
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert re.fullmatch(r"[0-9a-f]{64}\.(cls|jpg|json)", member.name), member.name
                assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
    written = {name for name in inputs if name not in expected_rejects}
    seen = []
    for split_name, split in m.splits.items():
        samples = read_with_webdataset([paths[s.name] for s in split.shards])
        assert len(samples) == split.samples
        for s in samples:
            src_name = s["json"]["src"]
            assert s["__key__"] == sha(inputs[src_name])  # key = content hash of the original bytes
            assert s["cls"] == m.classes.index(src_name.split("/")[0])
            img = s["jpg"]
            assert isinstance(img, Image.Image) and img.mode == "RGB" and min(img.size) == 16
            seen.append(src_name)
    assert sorted(seen) == sorted(written)
    # EXIF orientation applied: stored 40x30 with orientation 6 -> shown upright, 16 wide x 21 high
    rotated = next(s for s in read_with_webdataset(list(paths.values())) if s["json"]["src"] == "1/rotated exif.jpg")
    assert rotated["jpg"].size == (16, 21)
    # shards mix classes (seeded shuffle), so no training shard is single-class
    for shard in m.splits["train"].shards:
        labels = {s["cls"] for s in read_with_webdataset([paths[shard.name]])}
        assert len(labels) > 1 or shard.samples < 4

    # determinism: a second run to another DEST gives byte-identical shards, manifest and rejects
    other = s3_url + "-again"
    run_prep(src, other, options, progress=False)
    assert output_objects(other, m) == objects

    # rerun after success: nothing to do; different options: refused, naming what changed
    again = run_prep(src, s3_url, options, progress=False)
    assert again.skipped and again.shards_built == 0
    with pytest.raises(DestConflictError, match=r"shard_size: 16 -> 8.*--overwrite"):
        run_prep(src, s3_url, options.model_copy(update={"shard_size": 8}), progress=False)
    assert result.shards_built == len(objects) - 2


@pytest.mark.faults
def test_prep_reject_threshold_fails_pointing_at_rejects_then_a_higher_one_reuses_every_shard(
        messy_imagefolder, tmp_path, ray_local):
    src, expected = messy_imagefolder
    dest = str(tmp_path / "out")
    options = PrepOptions(shard_size=32, resize=16, reject_threshold=0.05, to_rgb=True)
    with pytest.raises(TooManyRejectsError, match=r"7 of \d+ inputs .* rejected.*rejects\.jsonl"):
        run_prep(src, dest, options, progress=False)
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
    with open(os.path.join(dest, "rejects.jsonl")) as f:
        assert len(f.readlines()) == len(expected)

    result = run_prep(src, dest, options.model_copy(update={"reject_threshold": 0.5}), progress=False)
    assert result.shards_built == 0 and result.shards_reused == len(result.manifest.splits["train"].shards)
    assert result.manifest.totals["rejected"] == len(expected)


def test_prep_stage_of_a_run_writes_through_the_specs_storage_options(tmp_path, s3, s3_server, images_dir, ray_local):
    """A spec's ``storage_options`` reach prep's driver and its Ray shard tasks: the run's storage
    lives on a second server named only there (the environment points at the first)."""
    from pipeline.run import run_spec
    from pipeline.spec import parse_spec

    other = s3_server(bucket="elsewhere", admin=s3.admin)
    opts = {"client_kwargs": {"endpoint_url": other.endpoint}}
    spec = parse_spec({"name": "opts", "storage": "s3://elsewhere/runs", "storage_options": opts,
                       "stages": [{"name": "data", "kind": "prep", "source": images_dir, "format": "png",
                                   "shard_size": 16}]})
    assert run_spec(spec).states == {"data": "done"}

    manifest, _ = load_manifest(f"{spec.stage_url('data')}/shards/manifest.json", opts)
    assert manifest.totals["written"] == 60 and manifest.splits["train"].samples == 60
    assert not Store(f"s3://{s3.bucket}/").exists("runs")  # nothing went to the environment's server


def test_images_far_larger_than_any_training_size_shrink_to_max_side_with_a_warning(caplog):
    import dataprep._images as images
    from dataprep._images import MAX_SIDE_DEFAULT, ImageSpec, process
    from dataprep.prep import PrepOptions

    buf = io.BytesIO()
    Image.new("RGB", (MAX_SIDE_DEFAULT + 904, 250), (200, 30, 30)).save(buf, format="PNG")
    images._warned_max_side = False
    with caplog.at_level("WARNING", logger="dataprep._images"):
        out = Image.open(io.BytesIO(process(buf.getvalue(), ImageSpec(ext="png"))))
    assert out.size == (MAX_SIDE_DEFAULT, 205)
    assert "far larger than any training size" in caplog.text and "max_side" in caplog.text
    kept = Image.open(io.BytesIO(process(buf.getvalue(), ImageSpec(ext="png", max_side=None))))
    assert kept.size == (MAX_SIDE_DEFAULT + 904, 250)
    resized = Image.open(io.BytesIO(process(buf.getvalue(), ImageSpec(ext="png", resize=50))))
    assert resized.size == (1000, 50)  # resize decides the size; max_side only caps images it leaves alone
    # the default leaves the digest of earlier preps as it was; another max_side changes it
    assert "max_side" not in PrepOptions().output_options()
    assert PrepOptions(max_side=1024).digest() != PrepOptions().digest()

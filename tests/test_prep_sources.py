"""Every source kind prep accepts, read back with the plain webdataset library (real Ray, real S3)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from _prep_util import download, jpeg, output_objects, read_with_webdataset, sha
from cluster.storage import Store
from dataprep.manifest import load_manifest
from dataprep.prep import PrepOptions, run_prep

OPTS = PrepOptions(shard_size=4, format="keep")


def _samples(dest: str, tmp_path, name: str) -> tuple[list[dict], object]:
    """What the plain webdataset library reads from a prep output; checks the counts on the way."""
    m, _ = load_manifest(dest)
    paths = download(output_objects(dest, m), str(tmp_path / f"read-{name}"))
    samples = read_with_webdataset(sorted(paths.values()))
    assert len(samples) == m.totals["written"] == sum(split.samples for split in m.splits.values())
    assert m.totals["inputs"] == m.totals["written"] + m.totals["rejected"]
    return samples, m


def test_prep_reads_flat_csv_jsonl_parquet_and_webdataset_sources(tmp_path, s3_url, ray_local):
    images = {f"img {i:02d}.jpg": jpeg(seed=i) for i in range(10)}
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, data in images.items():
        (flat / name).write_bytes(data)
    (flat / ".DS_Store").write_bytes(b"hidden files are skipped")

    # (b) flat folder: no labels, original JPEG bytes kept (format keep, no resize)
    run_prep(str(flat), str(tmp_path / "out-flat"), OPTS, progress=False)
    samples, m = _samples(str(tmp_path / "out-flat"), tmp_path, "flat")
    assert m.classes is None and len(samples) == 10 and all("cls" not in s for s in samples)
    assert sorted(s["__key__"] for s in samples) == sorted(sha(d) for d in images.values())

    # (c) CSV with a header, relative paths, an s3:// URL and class names as labels
    store = Store(s3_url)
    store.put_bytes("remote.jpg", jpeg(seed=99))
    rows = ["path,label"] + [f"flat/{n},{'cat' if i % 2 else 'dog'}" for i, n in enumerate(sorted(images))]
    rows += [f"{store.url_of('remote.jpg')},cat", "flat/gone.jpg,dog"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    run_prep(str(tmp_path / "list.csv"), f"{s3_url}/out-csv", OPTS.model_copy(update={"reject_threshold": 0.1}),
             progress=False)
    samples, m = _samples(f"{s3_url}/out-csv", tmp_path, "csv")
    assert m.classes == ["cat", "dog"] and len(samples) == 11 and m.rejects == {"unreadable": 1}
    assert "gone.jpg" in store.get_bytes("out-csv/rejects.jsonl").decode()
    by_src = {s["json"]["src"]: s["cls"] for s in samples}
    assert by_src[store.url_of("remote.jpg")] == 0 and by_src["flat/img 00.jpg"] == 1

    # (c) JSONL with integer labels
    lines = [json.dumps({"path": f"flat/{n}", "label": i % 3}) for i, n in enumerate(sorted(images))]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    run_prep(str(tmp_path / "list.jsonl"), str(tmp_path / "out-jsonl"), OPTS, progress=False)
    samples, m = _samples(str(tmp_path / "out-jsonl"), tmp_path, "jsonl")
    assert m.classes == ["0", "1", "2"] and sorted(s["cls"] for s in samples) == sorted(i % 3 for i in range(10))

    # (d) Parquet, Hugging Face layout (image struct {bytes, path}, ClassLabel names in the schema), on S3
    data = [jpeg(seed=200 + i) for i in range(9)]
    hf = pa.table({"image": [{"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(data)],
                   "label": pa.array([i % 2 for i in range(9)], pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["ant", "bee"]}}
    hf = hf.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(hf, str(tmp_path / "hf.parquet"), row_group_size=4)
    store.put_file(str(tmp_path / "hf.parquet"), "hf/train-00000-of-00001.parquet")
    run_prep(store.url_of("hf"), f"{s3_url}/out-hf", OPTS, progress=False)
    samples, m = _samples(f"{s3_url}/out-hf", tmp_path, "hf")
    assert m.classes == ["ant", "bee"] and m.source["kind"] == "parquet"
    assert {s["__key__"]: s["cls"] for s in samples} == {sha(d): i % 2 for i, d in enumerate(data)}

    # (d) Parquet, img2dataset layout (binary `jpg` column, no labels)
    (tmp_path / "i2d").mkdir()
    pq.write_table(pa.table({"key": ["000", "001"], "jpg": data[:2], "caption": ["a", "b"]}),
                   str(tmp_path / "i2d" / "00000.parquet"))
    run_prep(str(tmp_path / "i2d"), str(tmp_path / "out-i2d"), OPTS, progress=False)
    samples, m = _samples(str(tmp_path / "out-i2d"), tmp_path, "i2d")
    assert m.classes is None and sorted(s["__key__"] for s in samples) == sorted(sha(d) for d in data[:2])

    # (e) tars written by webdataset.ShardWriter, resized on the way
    import webdataset as wds

    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%03d.tar"), maxcount=4) as sink:
        for i, d in enumerate(data):
            sink.write({"__key__": f"sample{i:03d}", "jpg": d, "cls": i % 3})
    run_prep(str(tmp_path / "wds"), str(tmp_path / "out-wds"), PrepOptions(shard_size=4, resize=16), progress=False)
    samples, m = _samples(str(tmp_path / "out-wds"), tmp_path, "wds")
    assert m.classes == ["0", "1", "2"] and m.source["kind"] == "wds"
    assert {s["__key__"]: s["cls"] for s in samples} == {sha(d): i % 3 for i, d in enumerate(data)}
    assert all(min(s["jpg"].size) == 16 for s in samples)

    # (e) our own output as a source (re-shard): class names come from its manifest
    run_prep(f"{s3_url}/out-hf", str(tmp_path / "out-reshard"), PrepOptions(shard_size=100), progress=False)
    samples, m = _samples(str(tmp_path / "out-reshard"), tmp_path, "reshard")
    assert m.classes == ["ant", "bee"] and len(samples) == 9 and len(m.splits["train"].shards) == 1
    assert not os.path.exists(str(tmp_path / "out-reshard" / "val"))


def test_imagefolder_with_a_readme_at_its_root_keeps_its_classes_and_lists_the_file_as_ignored(tmp_path, images_dir,
                                                                                              ray_local):
    from dataprep._sources import list_source
    from dataprep.prep import source_line, summary_table

    (tmp_path / "images" / "README.txt").write_text("digits, three classes\n")
    listing = list_source(images_dir)
    assert listing.kind == "imagefolder" and listing.classes == ["0", "1", "2"] and listing.ignored == ["README.txt"]
    result = run_prep(images_dir, str(tmp_path / "out"), OPTS, progress=False)
    m = result.manifest
    assert m.classes == ["0", "1", "2"] and m.totals["ignored"] == 1 and m.totals["rejected"] == 0
    rejects = [json.loads(ln) for ln in Store(str(tmp_path / "out")).get_bytes("rejects.jsonl").decode().splitlines()]
    assert [(r["input"], r["reason"]) for r in rejects] == [("README.txt", "ignored")]
    assert source_line(m).startswith("source: imagefolder (") and source_line(m).endswith("), 3 classes")
    assert summary_table(result).caption == source_line(m)


def test_flat_folder_summary_says_it_has_no_classes(tmp_path, ray_local):
    from dataprep.prep import source_line

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.jpg").write_bytes(jpeg(seed=i))
    result = run_prep(str(flat), str(tmp_path / "out"), OPTS, progress=False)
    assert source_line(result.manifest).startswith("source: flat (") and "no classes" in source_line(result.manifest)


def test_parquet_row_groups_are_read_once_per_worker_across_shard_tasks(tmp_path, monkeypatch):
    """Hash order makes every shard touch every Parquet file: a worker keeps decoded row groups across
    its shard tasks (bounded, keyed by the file's size and stamp), so each is read once, not per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep import _refs

    path = str(tmp_path / "part.parquet")

    def write(prefix: bytes) -> None:
        images = [prefix + b"%d" % i for i in range(20)]
        pq.write_table(pa.table({"image": images, "label": list(range(20))}), path, row_group_size=10)

    reads: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, rg, **kw: reads.append(rg) or real(self, rg, **kw))
    monkeypatch.setattr(_refs, "_ROW_GROUPS", _refs._RowGroupCache())
    write(b"a")
    for task in range(3):  # three shard tasks on one worker, each reading rows of both groups
        reader = _refs.RefReader()
        assert [reader.read(("p", path, rg, row)) for rg, row in ((0, 1), (0, 9), (1, 0), (1, 5))] == \
            [b"a1", b"a9", b"a10", b"a15"]
        reader.close()
    assert reads == [0, 1]

    write(b"bb")  # the file rewritten in place: its groups are read afresh
    reader = _refs.RefReader()
    assert reader.read(("p", path, 1, 2)) == b"bb12" and reads == [0, 1, 1]

    _refs.row_group_cache().scope("s3://b/another-output")  # another prep output: groups dropped
    assert _refs.row_group_cache().get((path, 1, *_refs.RefReader()._stamp(path))) is None

    monkeypatch.setattr(_refs, "_ROW_GROUPS", _refs._RowGroupCache())
    monkeypatch.setenv(_refs.ROW_GROUP_CACHE_ENV, "700")  # room for one group: the first stays, not the last
    for _ in range(2):
        reader = _refs.RefReader()
        assert [reader.read(("p", path, rg, 0)) for rg in (0, 1)] == [b"bb0", b"bb10"]
    assert reads == [0, 1, 1, 0, 1, 1]

    monkeypatch.setenv(_refs.ROW_GROUP_CACHE_ENV, "0")  # off: each task reads what it needs, once
    monkeypatch.setattr(_refs, "_ROW_GROUPS", _refs._RowGroupCache())
    for _ in range(2):
        reader = _refs.RefReader()
        assert [reader.read(("p", path, 0, row)) for row in (3, 4)] == [b"bb3", b"bb4"]
    assert reads == [0, 1, 1, 0, 1, 1, 0, 0]

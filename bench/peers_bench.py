"""Peer loaders side by side: vitforge StreamingLoader vs webdataset, MosaicML streaming, litdata, ImageFolder.

The same JPEGs (bench/loader_bench.make_jpegs: 320x256 photo crops, quality 90) go through every
loader with the same per-sample work: vitforge's decode (torchvision.io / libjpeg-turbo) +
RandomResizedCrop(224, scale (0.08, 1), bilinear) + flip + normalise, seeded per sample key, the
same batch size and DataLoader workers, shards of the same size, a shuffle over ~4 shards.

    vitforge   StreamingLoader over WebDataset tars + manifest.json (window_shards=4)
    wds        webdataset WebDataset(shardshuffle) .shuffle(4 shards) .map .batched + WebLoader;
               from S3 through presigned http URLs (webdataset opens them with curl)
    mds        MosaicML streaming: MDSWriter shards, StreamingDataset + streaming.StreamingDataLoader
    litdata    litdata.optimize chunks, litdata StreamingDataset + StreamingDataLoader
    per_file   torch DataLoader over one file (local) or one S3 object (GET per sample) per image
    bare       (local only) one process, a plain loop over the bytes in memory: the ceiling

Each storage ("local" disk, "s3" = a SeaweedFS server the bench starts on loopback): every path
runs one full epoch per round with a freshly built loader, rounds interleave the paths, the best
round is kept. Reported: images/s after the first batch, per core (/ workers) and per CPU-second
(this process + reaped children: the workers), time to first batch (construct + first batch), and
resume at 50 % of the epoch: a loader is run to half the epoch, its state_dict() is taken, a new
loader loads it, and we time its first batch and compare its keys with the reference epoch
(a fresh loader, same seed). The last line printed is JSON.

    python bench/peers_bench.py --images 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from loader_bench import crop_flip_normalize, make_jpegs, write_datasets  # noqa: E402
from dataprep._decode import decode  # noqa: E402

warnings.filterwarnings("ignore")
WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "peers")
TRANSFORM = crop_flip_normalize()


def augment(data: bytes, key: str) -> torch.Tensor:
    """The per-sample work of every peer: decode + crop + flip + normalise, seeded by the key."""
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return TRANSFORM(decode(data, "jpg"), random.Random(seed))


def cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its live ones (persistent loader workers
    are reaped only when their loader closes), leaving out the S3 server the bench started."""
    import psutil

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() != "weed":
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # exited between the listing and the read: counted as reaped (or lost)
            pass
    return total


# ---- data in each format ------------------------------------------------------------------------
def keyed(jpegs: list[bytes]) -> list[tuple[str, bytes, int]]:
    """(key, jpeg, label) exactly as loader_bench.write_datasets names them."""
    return [(hashlib.sha256(d).hexdigest()[:24], d, i % 10) for i, d in enumerate(jpegs)]


def write_mds(samples, out: str, size_limit: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"key": "str", "jpg": "bytes", "cls": "int"}, size_limit=size_limit) as w:
        for key, data, label in samples:
            w.write({"key": key, "jpg": data, "cls": label})


def _lit_item(item):
    return {"key": item[0], "jpg": item[1], "cls": item[2]}


def write_litdata(samples, out: str, chunk_bytes: int) -> None:
    from litdata import optimize

    optimize(fn=_lit_item, inputs=samples, output_dir=out, chunk_bytes=chunk_bytes, num_workers=1,
             reorder_files=False, verbose=False, start_method="fork")


# ---- one adapter per loader: build(), keys(batch), and optional state save/load --------------------
class Path:
    name = ""
    resumable = True

    def __init__(self, args, where: dict) -> None:
        self.args, self.where = args, where

    def build(self) -> Any:
        raise NotImplementedError

    def keys(self, batch) -> list[str]:
        return list(batch["key"])

    def state(self, loader) -> Any:
        return loader.state_dict()

    def restore(self, loader, state) -> None:
        loader.load_state_dict(state)


class Vitforge(Path):
    name = "vitforge"

    def build(self):
        from dataprep.loader import StreamingLoader

        return StreamingLoader(self.where["vitforge"], batch_size=self.args.batch, seed=0, transform=TRANSFORM,
                               num_workers=self.args.workers, partial="drop", window_shards=4)


def _wds_sample(sample: dict) -> dict:
    return {"image": augment(sample["jpg"], sample["__key__"]), "label": int(sample["cls"]),
            "key": sample["__key__"]}


def _wds_collate(rows: list[dict]) -> dict:
    return {"image": torch.stack([r["image"] for r in rows]), "label": torch.tensor([r["label"] for r in rows]),
            "key": [r["key"] for r in rows]}


class Wds(Path):
    name = "wds"
    resumable = False  # WebDataset / WebLoader keep no position: resume = iterate again and skip

    def build(self):
        import webdataset as wds

        urls = self.where["wds"]
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, workersplitter=wds.split_by_worker,
                             nodesplitter=wds.single_node_only, empty_check=False)
              .shuffle(4 * self.args.shard_size).map(_wds_sample)
              .batched(self.args.batch, collation_fn=_wds_collate, partial=False))
        return wds.WebLoader(ds, batch_size=None, num_workers=self.args.workers)


def _fresh_dir(parent: str, name: str) -> str:
    """An emptied cache directory: each build starts cold, as on a restarted node (same path, since
    litdata's state_dict records its cache path and refuses another one)."""
    path = os.path.join(parent, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _mds_class():
    from streaming import StreamingDataset

    class MDSImages(StreamingDataset):
        def __getitem__(self, idx: int) -> dict:
            s = super().__getitem__(idx)
            return {"image": augment(s["jpg"], s["key"]), "label": s["cls"], "key": s["key"]}

    return MDSImages


class Mds(Path):
    name = "mds"

    def build(self):
        from streaming import StreamingDataLoader
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        remote, local = self.where["mds"]
        if remote:  # a fresh cache per loader: every build downloads what it reads, like ours without cache_dir
            local = _fresh_dir(self.where["tmp"], "mds")
        ds = _mds_class()(remote=remote, local=local, shuffle=True, shuffle_seed=0, batch_size=self.args.batch,
                          shuffle_block_size=4 * self.args.shard_size, num_canonical_nodes=1)
        return StreamingDataLoader(ds, batch_size=self.args.batch, num_workers=self.args.workers, drop_last=True)


def _lit_class():
    from litdata import StreamingDataset

    class LitImages(StreamingDataset):
        def __getitem__(self, idx):
            s = super().__getitem__(idx)
            return {"image": augment(s["jpg"], s["key"]), "label": s["cls"], "key": s["key"]}

    return LitImages


class Lit(Path):
    name = "litdata"

    def build(self):
        from litdata import StreamingDataLoader

        url = self.where["litdata"]
        if url.startswith("s3://"):  # litdata's obstore prefetch refuses http:// endpoints unless told
            from litdata.streaming import downloader

            downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
        cache = _fresh_dir(self.where["tmp"], "litdata") if url.startswith("s3://") else None
        opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if cache else None
        ds = _lit_class()(input_dir=url, cache_dir=cache, shuffle=True, seed=0, drop_last=True,
                          storage_options=opts)
        return StreamingDataLoader(ds, batch_size=self.args.batch, num_workers=self.args.workers, drop_last=True)


class _PerFile(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, str, int]], s3: bool) -> None:
        self.items, self.s3, self._fs = items, s3, None

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, where: str) -> bytes:
        if not self.s3:
            with open(where, "rb") as f:
                return f.read()
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem()
        return self._fs.cat_file(where)

    def __getitem__(self, i: int) -> dict:
        key, where, label = self.items[i]
        return {"image": augment(self._read(where), key), "label": label, "key": key}


class PerFile(Path):
    name = "per_file"
    resumable = False  # a plain DataLoader + RandomSampler keeps no position

    def build(self):
        items, s3 = self.where["per_file"]
        return torch.utils.data.DataLoader(_PerFile(items, s3), batch_size=self.args.batch, shuffle=True,
                                           num_workers=self.args.workers, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))


PATHS = [Vitforge, Wds, Mds, Lit, PerFile]


# ---- measuring ------------------------------------------------------------------------------------
def epoch(path: Path, stop_after: int | None = None, loader=None) -> dict:
    """One (part of an) epoch with a fresh loader: first-batch time, steady images/s, CPU-s, keys."""
    t0, c0 = time.perf_counter(), cpu_s()
    loader = loader if loader is not None else path.build()
    keys: list[str] = []
    t_first = c_first = None
    it = iter(loader)
    n_batches = 0
    for batch in it:
        keys += path.keys(batch)
        n_batches += 1
        if t_first is None:
            t_first, c_first = time.perf_counter(), cpu_s()
        if stop_after is not None and n_batches >= stop_after:
            break
    t1, c1 = time.perf_counter(), cpu_s()
    state = path.state(loader) if stop_after is not None and path.resumable else None
    del it
    first_n = path.args.batch
    steady = len(keys) - first_n
    return {"ttfb_s": t_first - t0, "images": len(keys), "keys": keys, "loader": loader, "state": state,
            "img_s": steady / (t1 - t_first) if steady > 0 else 0.0,
            "img_per_cpu_s": steady / max(1e-9, c1 - c_first) if steady > 0 else 0.0, "wall_s": t1 - t0}


def resume_check(path: Path, reference: list[str]) -> dict:
    """Run to 50 %, save, restore into a new loader; first-batch time and whether the stream matches."""
    if not path.resumable:
        return {"resume": "no state_dict: a restart re-reads from the epoch start"}
    half = len(reference) // path.args.batch // 2
    first = epoch(path, stop_after=half)
    state = first["state"]
    state_bytes = len(json.dumps(state, default=str).encode())
    loader = first["loader"]
    del first["loader"]
    _shutdown(loader)
    del loader
    t0 = time.perf_counter()
    fresh = path.build()
    path.restore(fresh, state)
    rest = epoch(path, loader=fresh)
    restore_s = time.perf_counter() - t0 - rest["wall_s"]  # build + load_state_dict
    resumed = first["keys"] + rest["keys"]
    return {"resume_ttfb_s": round(restore_s + rest["ttfb_s"], 3), "state_bytes": state_bytes,
            "identical_sequence": resumed == reference,
            "same_samples_once": sorted(resumed) == sorted(reference),
            "resumed_images": len(rest["keys"]), "expected_rest": len(reference) - len(first["keys"])}


def _shutdown(loader) -> None:
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def bare_rate(samples, passes: int = 1) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu_s()
    for _ in range(passes):
        for key, data, _ in samples:
            augment(data, key)
    n = passes * len(samples)
    return n / (time.perf_counter() - t0), n / (cpu_s() - c0)


# ---- storage set-up ---------------------------------------------------------------------------------
def prepare_local(samples, jpegs, args) -> dict:
    shards, folder = write_datasets(jpegs, args.shard_size)  # bench/_work/loader/{shards,folder}
    shard_bytes = sum(os.path.getsize(os.path.join(shards, "train", f)) for f in os.listdir(os.path.join(shards, "train")))
    per_shard = shard_bytes // max(1, len(os.listdir(os.path.join(shards, "train"))))
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    write_mds(samples, os.path.join(WORK, "mds"), per_shard)
    write_litdata(samples, os.path.join(WORK, "litdata"), per_shard)
    tars = sorted(os.path.join(shards, "train", f) for f in os.listdir(os.path.join(shards, "train")))
    files = [(k, os.path.join(folder, str(label), f"{k}.jpg"), label) for k, _, label in samples]
    return {"vitforge": shards, "wds": tars, "mds": (None, os.path.join(WORK, "mds")),
            "litdata": os.path.join(WORK, "litdata"), "per_file": (files, False), "tmp": WORK,
            "shard_bytes": per_shard, "_folder": folder}


def prepare_s3(local: dict, samples, server) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem()
    root = f"{server.bucket}/peers"
    fs.put(local["vitforge"] + "/", f"{root}/vitforge/", recursive=True)
    fs.put(local["mds"][1] + "/", f"{root}/mds/", recursive=True)
    fs.put(local["litdata"] + "/", f"{root}/litdata/", recursive=True)
    fs.put(local["_folder"] + "/", f"{root}/files/", recursive=True)
    client = server.client()
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": server.bucket,
                                                                "Key": f"peers/vitforge/train/{os.path.basename(t)}"},
                                          ExpiresIn=24 * 3600) for t in local["wds"]]
    files = [(k, f"{root}/files/{label}/{k}.jpg", label) for k, _, label in samples]
    tmp = os.path.join(WORK, "s3cache")
    os.makedirs(tmp, exist_ok=True)
    return {"vitforge": f"s3://{root}/vitforge", "wds": urls, "mds": (f"s3://{root}/mds", None),
            "litdata": f"s3://{root}/litdata", "per_file": (files, True), "tmp": tmp}


def run_storage(label: str, where: dict, args, paths: list[str]) -> dict:
    runners = {p.name: p(args, where) for p in PATHS if p.name in paths}
    best: dict[str, dict] = {}
    failed: dict[str, str] = {}
    loads = []
    for r in range(args.rounds):
        for name, path in list(runners.items()):
            try:
                res = epoch(path)
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                print(f"  [{label}] {name} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                del runners[name]
                best.pop(name, None)
                failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            res.pop("loader")
            loads.append(os.getloadavg()[0])
            print(f"  [{label} round {r}] {name:9s} {res['img_s']:7.1f} img/s  {res['img_per_cpu_s']:6.1f} img/CPU-s  "
                  f"ttfb {res['ttfb_s']:5.2f} s  n={res['images']}  load {loads[-1]:.1f}", flush=True)
            prev = best.get(name)
            if prev is None:
                best[name] = {**res, "ttfb_best_s": res["ttfb_s"]}
            else:
                if res["img_s"] > prev["img_s"]:
                    best[name] = {**res, "ttfb_best_s": min(prev["ttfb_best_s"], res["ttfb_s"]), "ref": prev["keys"]}
                else:
                    prev["ttfb_best_s"] = min(prev["ttfb_best_s"], res["ttfb_s"])
                    prev["ref"] = res["keys"]
    out = {}
    for name, path in runners.items():
        b = best[name]
        rerun_same = b.get("ref") == b["keys"] if "ref" in b else None
        out[name] = {"img_s": round(b["img_s"], 1), "img_s_per_core": round(b["img_s"] / max(1, args.workers), 1),
                     "img_per_cpu_s": round(b["img_per_cpu_s"], 1), "ttfb_s": round(b["ttfb_best_s"], 3),
                     "images_per_epoch": b["images"], "two_fresh_epochs_identical": rerun_same}
        try:
            out[name].update(resume_check(path, b["keys"]))
        except Exception as exc:
            out[name]["resume"] = f"failed: {type(exc).__name__}: {str(exc)[-400:]}"
        print(f"  [{label}] {name} resume: { {k: v for k, v in out[name].items() if 'resume' in k or 'ident' in k} }",
              flush=True)
    out["_load_avg_1m"] = [round(x, 1) for x in loads]
    out["_failed"] = failed
    return out


def table(results: dict, bare: tuple[float, float] | None, workers: int) -> str:
    rows = ["| storage | loader | images/s | per core | per CPU-s | first batch | resume 50%: first batch | "
            "resumed = same sequence | state bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for storage, res in results.items():
        for name, r in res.items():
            if name.startswith("_"):
                continue
            resume = f"{r['resume_ttfb_s']:.2f} s" if "resume_ttfb_s" in r else "none (no state)"
            same = ("yes" if r["identical_sequence"] else ("no (same set)" if r["same_samples_once"] else "no"))\
                if "identical_sequence" in r else "n/a"
            rows.append(f"| {storage} | {name} | {r['img_s']:.0f} | {r['img_s_per_core']:.0f} | {r['img_per_cpu_s']:.0f} "
                        f"| {r['ttfb_s']:.2f} s | {resume} | {same} | {r.get('state_bytes', '')} |")
    if bare:
        rows.append(f"| memory | bare loop (1 process) | {bare[0]:.0f} | {bare[0]:.0f} | {bare[1]:.0f} | | | | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--storage", default="local,s3")
    ap.add_argument("--paths", default=",".join(p.name for p in PATHS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = args.paths.split(",")
    jpegs = make_jpegs(args.images)
    samples = keyed(jpegs)
    local = prepare_local(samples, jpegs, args)
    results, bare = {}, None
    load_start = os.getloadavg()
    if "local" in args.storage:
        bare = bare_rate(samples)
        results["local"] = run_storage("local", local, args, paths)
        bare2 = bare_rate(samples)
        bare = (max(bare[0], bare2[0]), max(bare[1], bare2[1]))
    if "s3" in args.storage:
        from cluster.localstore import LocalS3

        server = LocalS3(tempfile.mkdtemp(prefix="peers-s3-"))
        server.start()
        os.environ.update(server.env())
        try:
            results["s3"] = run_storage("s3", prepare_s3(local, samples, server), args, paths)
        finally:
            server.stop()
    print(table(results, bare, args.workers))
    summary: dict[str, Any] = {"images": args.images, "workers": args.workers, "batch": args.batch,
                               "rounds": args.rounds, "cores": os.cpu_count(), "load_avg_start": load_start,
                               "load_avg_end": os.getloadavg(), "results": results}
    if bare:
        summary["bare_img_s"], summary["bare_img_per_cpu_s"] = round(bare[0], 1), round(bare[1], 1)
    for storage, res in results.items():
        peers = {k: v for k, v in res.items() if not k.startswith("_") and k != "vitforge"}
        if "vitforge" in res and peers:
            fastest = max(peers, key=lambda k: peers[k]["img_s_per_core"])
            summary[f"{storage}_vs_fastest_peer_per_core"] = {
                "peer": fastest, "ratio": round(res["vitforge"]["img_s_per_core"] / peers[fastest]["img_s_per_core"], 3)}
            fastest_cpu = max(peers, key=lambda k: peers[k]["img_per_cpu_s"])
            summary[f"{storage}_vs_fastest_peer_per_cpu_s"] = {
                "peer": fastest_cpu,
                "ratio": round(res["vitforge"]["img_per_cpu_s"] / peers[fastest_cpu]["img_per_cpu_s"], 3)}
        if bare and storage == "local" and "vitforge" in res:
            summary["vitforge_vs_bare_per_core"] = round(res["vitforge"]["img_s_per_core"] / bare[0], 3)
            summary["vitforge_vs_bare_per_cpu_s"] = round(res["vitforge"]["img_per_cpu_s"] / bare[1], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

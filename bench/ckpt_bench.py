"""Checkpoint stall: seconds the training loop is blocked per checkpoint, async upload vs synchronous.

One run, one SeaweedFS (``cluster.localstore.LocalS3``) started here, one model: a stack of Linear
layers trained with AdamW on CPU, whose model + optimizer state is ``--state-mb`` big. For every
upload bandwidth in ``--mbps`` (0 = unthrottled loopback; otherwise a byte-rate-limited TCP proxy
in front of the S3 port, in its own process), the same training run checkpoints every
``--every`` steps twice: with ``save(sync=True)`` (write + upload + commit in the loop) and with
``save()`` (write in the loop, upload in the background). "Blocked" is the wall time spent inside
``save()``; "step" is the mean time of a training step *without* a checkpoint in it, which shows
what the background upload costs the loop on the same cores.

    python bench/ckpt_bench.py                   # ~150 MB state, loopback and 25 MB/s
    python bench/ckpt_bench.py --mbps 0,50,10 --state-mb 200
    python bench/ckpt_bench.py --state-mb 1000 --steps 24 --every 8 --mbps 0 --no-probe     # ~1 GB
    python bench/ckpt_bench.py --state-mb 4000 --steps 30 --every 15 --mbps 0 --modes async --no-probe

    python bench/ckpt_bench.py --hash-cost --state-mb 1000     # checksum MB/s and % of a 1 GB save

Steps are split into those with no upload in flight ("idle") and those run while the background
upload shares the cores ("during upload"): their medians show what the upload costs the loop.

Prints a table per configuration and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.localstore import LocalS3, free_ports  # noqa: E402
from jobs.checkpoint import CheckpointManager, CheckpointPolicy  # noqa: E402

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work", "ckpt")


# ---- an upload-throttling TCP proxy (client -> server bytes limited; replies unthrottled) ------------


def _proxy_main(listen_port: int, upstream_port: int, bytes_per_s: float, ready) -> None:
    async def main() -> None:
        budget = {"t": time.monotonic(), "sent": 0.0}

        async def throttle(n: int) -> None:
            budget["sent"] += n
            ahead = budget["sent"] / bytes_per_s - (time.monotonic() - budget["t"])
            if ahead > 0:
                await asyncio.sleep(ahead)

        async def pump(reader, writer, limited: bool) -> None:
            try:
                while data := await reader.read(64 * 1024):
                    if limited:
                        await throttle(len(data))
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w) -> None:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
            await asyncio.gather(pump(client_r, up_w, True), pump(up_r, client_w, False))

        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_proxy(upstream_port: int, mbps: float) -> tuple[mp.Process, int]:
    port = free_ports(1)[0]
    ready = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=_proxy_main, args=(port, upstream_port, mbps * 1e6, ready),
                                          daemon=True)
    proc.start()
    if not ready.wait(10):
        raise RuntimeError("throttling proxy did not start")
    return proc, port


# ---- the training run ---------------------------------------------------------------------------


def build(state_mb: float, width: int = 1024) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers whose fp32 params + AdamW's two moments make ``state_mb`` MB."""
    per_layer = (width * width + width) * 4 * 3
    layers = max(1, round(state_mb * 1e6 / per_layer))
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                  for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(url: str, model, opt, steps: int, every: int, sync: bool, storage_options: dict, batch: int = 8) -> dict:
    ckpt = CheckpointManager(url, CheckpointPolicy(every_steps=every, keep_last=1),
                             local_dir=os.path.join(WORK, "stage"), storage_options=storage_options)
    x = torch.randn(batch, model[0][0].in_features)
    writes: list[float] = []

    def write(d: str) -> None:
        t0 = time.perf_counter()
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        torch.save(opt.state_dict(), os.path.join(d, "optim.pt"))
        writes.append(time.perf_counter() - t0)

    blocked, plain, idle, during, uploads = [], [], [], [], []
    t_run = time.perf_counter()
    upload_started = None
    for step in range(1, steps + 1):
        uploading = ckpt.upload_in_flight  # the step shares the cores with a background upload
        t0 = time.perf_counter()
        train_step(model, opt, x)
        t1 = time.perf_counter()
        if upload_started is not None and not ckpt.upload_in_flight:
            uploads.append(t1 - upload_started)  # upload + commit, to within one step
            upload_started = None
        if ckpt.due(step):
            ckpt.save(step, write, {"step": step}, sync=sync)
            blocked.append(time.perf_counter() - t1)
            if not sync:
                upload_started = time.perf_counter()
        else:
            plain.append(t1 - t0)
            (during if uploading else idle).append(t1 - t0)
    t_flush = time.perf_counter()
    ckpt.close()
    done = time.perf_counter()
    info = ckpt.latest()
    assert info is not None and info.step == steps - steps % every
    size = sum(f["size"] for f in info.files.values())
    return {"mode": "sync" if sync else "async", "checkpoints": len(blocked), "state_mb": round(size / 1e6, 1),
            "blocked_s_mean": statistics.mean(blocked), "blocked_s_max": max(blocked),
            "local_write_s_mean": statistics.mean(writes),
            "step_s_mean": statistics.mean(plain), "final_flush_s": done - t_flush, "run_s": done - t_run,
            "step_s_idle_median": _median(idle), "step_s_during_upload_median": _median(during),
            "steps_idle": len(idle), "steps_during_upload": len(during),
            "blocked_minus_write_s_max": max(b - w for b, w in zip(blocked, writes)),
            "superseded": len(ckpt.superseded),
            "bg_upload_s_observed": statistics.mean(uploads) if uploads else None}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def upload_seconds(url: str, storage_options: dict, state_mb: float) -> float:
    """Time of one plain synchronous upload of a file the size of the state (the yardstick)."""
    from cluster.storage import Store

    path = os.path.join(WORK, "probe.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(int(state_mb * 1e6)))
    store = Store(url, storage_options)
    t0 = time.perf_counter()
    store.put_file(path, "probe.bin")
    seconds = time.perf_counter() - t0
    store.delete("probe.bin")
    os.remove(path)
    return seconds


def _hashers() -> dict:
    """The per-file checksums worth considering: name -> () -> object with update()."""
    import hashlib
    import zlib

    class Crc32:
        def __init__(self) -> None:
            self.value = 0

        def update(self, data) -> None:
            self.value = zlib.crc32(data, self.value)

    out = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "md5": hashlib.md5, "crc32 (zlib)": Crc32}
    try:
        import xxhash  # optional: not a vitforge dependency
        out["xxh3_64"] = xxhash.xxh3_64
    except ImportError:
        pass
    return out


def hash_cost(state_mb: float, passes: int) -> dict:
    """MB/s of each checksum over a torch.save'd file of ``state_mb`` MB (8 MiB chunks, as the upload
    hashes), next to size-only, and each as a percent of the time torch.save takes to write that file."""
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, "hash-cost.pt")
    state = {"w": torch.randn(int(state_mb * 2**20 / 4))}
    save_s = min(_timed(lambda: torch.save(state, path)) for _ in range(passes))
    with open(path, "rb") as f:
        data = memoryview(f.read())
    chunk = 8 << 20
    res = {"state_mb": state_mb, "save_s": round(save_s, 3), "load_avg_1m": os.getloadavg()[0], "hashes": {}}
    res["hashes"]["size-only"] = {"s": round(min(_timed(lambda: os.path.getsize(path)) for _ in range(passes)), 6)}
    for name, make in _hashers().items():
        def run(make=make) -> None:
            h = make()
            for i in range(0, len(data), chunk):
                h.update(data[i:i + chunk])
        s = min(_timed(run) for _ in range(passes))
        res["hashes"][name] = {"s": round(s, 3), "mb_s": round(len(data) / 2**20 / s, 1),
                               "pct_of_save": round(100 * s / save_s, 1)}
    os.remove(path)
    return res


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-mb", type=float, default=150.0, help="model + AdamW state size (MB)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    ap.add_argument("--mbps", default="0,25", help="upload bandwidths to try, MB/s; 0 = unthrottled loopback")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--modes", default="sync,async", help="which save modes to run (sync, async)")
    ap.add_argument("--width", type=int, default=1024, help="Linear width (bigger: fewer, larger tensors)")
    ap.add_argument("--batch", type=int, default=8, help="rows per training step")
    ap.add_argument("--no-probe", action="store_true", help="skip the plain-upload yardstick (saves time at GB sizes)")
    ap.add_argument("--hash-cost", action="store_true",
                    help="only: MB/s of sha256 / blake2b / md5 / crc32 / xxhash (if installed) vs size-only, "
                         "and their cost as a percent of torch.save of --state-mb")
    ap.add_argument("--no-checksum", action="store_true",
                    help="upload without computing per-file sha256 (to measure what checksums add to a save)")
    return ap.parse_args()


def _save_rows(args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[dict]:
    """One row per (bandwidth, save mode): checkpointed training against a local S3 (throttled by a proxy)."""
    results = []
    with LocalS3(os.path.join(WORK, "s3")) as s3:
        os.environ.update(s3.env())
        for mbps in [float(v) for v in args.mbps.split(",")]:
            proxy, endpoint = None, s3.endpoint
            if mbps > 0:
                proxy, port = start_proxy(s3.ports["s3.port"], mbps)
                endpoint = f"http://127.0.0.1:{port}"
            opts = {"client_kwargs": {"endpoint_url": endpoint}}
            try:
                url = f"s3://{s3.bucket}/bench-{int(mbps)}"
                upload = None if args.no_probe else upload_seconds(url, opts, args.state_mb)
                for sync in [m == "sync" for m in args.modes.split(",")]:
                    row = run(f"{url}/{'sync' if sync else 'async'}/stages/bench", model, opt, args.steps, args.every,
                              sync, opts, args.batch)
                    row.update(upload_mbps_limit=mbps or None, plain_upload_s=upload)
                    results.append(row)
                    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
            finally:
                if proxy is not None:
                    proxy.kill()
    return results


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    if args.no_checksum:
        from cluster.storage import Store

        put_file = Store.put_file
        Store.put_file = lambda self, local, rel, checksum=False: put_file(self, local, rel)
    if args.hash_cost:
        res = hash_cost(args.state_mb, 3)
        for name, r in res["hashes"].items():
            print(f"{name:14s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
        print(json.dumps(res))
        return
    torch.manual_seed(0)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    model, opt = build(args.state_mb, args.width)
    results = _save_rows(args, model, opt)
    shutil.rmtree(WORK, ignore_errors=True)
    for r in results:
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = round(v, 4)
    print(json.dumps({"bench": "ckpt", "state_mb": args.state_mb, "steps": args.steps, "every": args.every,
                      "threads": args.threads, "load_avg": os.getloadavg(), "rows": results}))

if __name__ == "__main__":
    main()

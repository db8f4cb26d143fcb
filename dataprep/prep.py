"""``vitforge prep SRC DEST``: images -> WebDataset shards on Ray, written to any fsspec URL.

A run has four steps, each a pure function of the one before, so the same SRC and options give
byte-identical shards and manifest:

1. **list** SRC on the driver (names and sizes only) -> a source fingerprint;
2. **scan** it on Ray: the sha256 of every input's bytes is its sample key; empty and unreadable
   inputs and exact duplicates are settled here, before any shard is planned;
3. **plan** on the driver: keys ordered by ``sha256(seed, key)`` (a seeded shuffle that mixes
   classes and ignores file names), the first ``val_fraction`` to ``val``, then cut into shards;
4. **build** one Ray task per shard, a bounded number in flight: decode, convert, resize,
   encode, tar, upload, then write ``_progress/<split>-shard-XXXXXX.json``.

``rejects.jsonl`` and then ``manifest.json`` are written last; the manifest is the commit.
Rerunning finds finished shards by their progress records (same plan digest, same object
size) and builds only the rest; after a finished run it does nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.housekeeping import tolerate
from cluster.storage import CorruptRecordError, Store, StorageNotFoundError

from ._arrays import ArraySpec
from ._images import DUPLICATE, REASONS, ImageSpec
from ._stats import ChannelStats
from ._plan import Plan, PrepError, Shards, make_plan  # noqa: F401  (PrepError, make_plan re-exported)
from ._sources import Listing, SourceError, attach_masks, list_source, normalise_labels, scan_container, scan_files
from ._table import EntryTable
from ._writer import PROGRESS, build_shard, finished_records
from .options import DEFAULT_SHARD_SIZE, MAX_SIDE_DEFAULT, PrepOptions  # noqa: F401  (re-exported)
from .manifest import MANIFEST, ChannelInfo, Manifest, MaskInfo, ShardInfo, SplitInfo, save_manifest

log = logging.getLogger(__name__)

REJECTS = "rejects.jsonl"
IGNORED = "ignored"  # rejects.jsonl's reason for a file that is no input (README.txt beside class folders)
RUN_RECORD = f"{PROGRESS}/run.json"
SCAN_CHUNK = 256  # files hashed per scan task


class DestConflictError(PrepError):
    """DEST holds a prep output made with different options or from a different source."""


class TooManyRejectsError(PrepError):
    """More inputs were rejected than the threshold allows; details are in rejects.jsonl."""




@dataclass
class PrepResult:
    manifest_url: str
    manifest: Manifest
    skipped: bool = False  # True when DEST already held this exact prep
    shards_built: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    rejects_url: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step: list, ray, scan, build, finish

    @property
    def images_per_s(self) -> float:
        """Samples written per second of prep work (the embedded Ray cluster's start excluded)."""
        work = self.seconds - self.timings.get("ray", 0.0)
        return self.manifest.totals.get("written", 0) / work if work > 0 else 0.0


# ---- the entry point ------------------------------------------------------------------------------


def run_prep(src: str, dest: str, options: PrepOptions | None = None, address: str | None = None,
             progress: bool | None = None, storage_options: dict[str, Any] | None = None) -> PrepResult:
    """Turn the images at ``src`` into shards + ``manifest.json`` at ``dest``; idempotent and resumable.

    ``address`` (or ``RAY_ADDRESS``) names a Ray cluster; otherwise an embedded one starts.
    ``progress``: a progress bar on stderr (None: only when stderr is a terminal).
    ``storage_options``: extra fsspec options for DEST's filesystem (a run spec's
    ``storage_options``); ``src`` is read with the environment's settings.
    Raises :class:`SourceError`, :class:`DestConflictError`, :class:`TooManyRejectsError` or
    :class:`cluster.storage.StorageError` with a message naming what to fix.
    """
    options = options or PrepOptions()
    clock = _Clock()
    listing = list_source(src, options.source_kind, options.channels)
    if options.masks:
        attach_masks(listing, options.masks)
    store = Store(dest, storage_options)
    _check_bucket(store)
    done = _check_dest(store, options, listing)
    if done is not None:
        log.info("nothing to do: %s already holds this prep (%d samples)", store.url_of(MANIFEST),
                 done.totals.get("written", 0))
        return PrepResult(store.url_of(MANIFEST), done, skipped=True, rejects_url=store.url_of(REJECTS))
    store.put_json(RUN_RECORD, {"options": options.output_options(), "options_digest": options.digest(),
                                "source": {"url": listing.url, "kind": listing.kind, "fingerprint": listing.fingerprint}})
    clock.lap("list")
    with _Progress(progress) as bar:
        workers = _start_ray(address, options.workers)
        clock.lap("ray")
        table, classes = _scan(listing, workers, bar, options.seed)
        plan = make_plan(table, classes, options, listing.masks if options.masks else None)
        table.drop_order()  # the plan holds its rows; the sort keys are done
        clock.lap("scan")
        records, built = _build(plan.shards, store, _image_spec(options, plan), workers, bar, storage_options)
        clock.lap("build")
    manifest = _finish(store, plan, records, options, listing)
    clock.lap("finish")
    return PrepResult(store.url_of(MANIFEST), manifest, shards_built=built, shards_reused=len(records) - built,
                      seconds=clock.total(), rejects_url=store.url_of(REJECTS), timings=clock.laps)


class _Clock:
    """Seconds spent in each step of a run (list, ray, scan, build, finish)."""

    def __init__(self) -> None:
        self.start = self._last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name], self._last = round(now - self._last, 3), now

    def total(self) -> float:
        return time.monotonic() - self.start


def _image_spec(options: PrepOptions, plan: Plan) -> ImageSpec | ArraySpec:
    if plan.ext == "npy":
        channels, dtype = plan.layout or (None, None)
        return ArraySpec(channels=channels, dtype=dtype, resize=options.resize, min_side=options.min_side,
                         max_pixels=options.max_pixels)
    return ImageSpec(ext=plan.ext, resize=options.resize, quality=options.quality, min_side=options.min_side,
                     max_pixels=options.max_pixels, max_side=options.max_side)


def _start_ray(address: str | None, workers: int | None) -> int:
    from cluster.runtime import ensure_ray

    resources = ensure_ray(address, num_cpus=workers)
    return workers or max(1, int(resources.get("CPU", 1)))


# ---- DEST state ------------------------------------------------------------------------------------


def _check_bucket(store: Store) -> None:
    """Refuse a DEST bucket that does not exist (some S3 servers would silently create it on write)."""
    # the store's own classification: s3fs's exists() answers False to a connection error too
    try:
        store.check_bucket()
    except StorageNotFoundError:
        raise StorageNotFoundError(f"bucket {store.bucket!r} of DEST {store.url} does not exist; create it or fix "
                                   "the URL") from None


def _check_dest(store: Store, options: PrepOptions, listing: Listing) -> Manifest | None:
    """The finished manifest when DEST already holds this prep; raise when it holds another."""
    if options.overwrite:
        _clear(store)
        return None
    if store.exists(MANIFEST):
        try:
            manifest = Manifest.model_validate(store.get_json(MANIFEST))
        except CorruptRecordError as exc:  # not finished after all: rebuilt from the progress records
            log.warning("%s; rebuilding it (finished shards are reused)", exc)
            tolerate("corrupt manifest removal", store.delete, MANIFEST)
            return _check_dest(store, options, listing)
        if manifest.options_digest == options.digest() and manifest.source.get("fingerprint") == listing.fingerprint:
            return manifest
        raise DestConflictError(_conflict("a finished prep", store, manifest.options, manifest.source, options, listing))
    if store.exists(RUN_RECORD):
        run = store.get_json(RUN_RECORD)
        if run.get("options_digest") != options.digest():
            raise DestConflictError(_conflict("an unfinished prep", store, run["options"], run["source"], options,
                                              listing))
        return None
    if store.ls(""):
        raise DestConflictError(f"DEST {store.url} is not empty and holds no vitforge prep output; "
                                "choose an empty DEST (or pass --overwrite to write into it anyway)")
    return None


def _conflict(what: str, store: Store, old: dict[str, Any], source: dict[str, Any], options: PrepOptions,
              listing: Listing) -> str:
    new = options.output_options()
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
    if source.get("fingerprint") != listing.fingerprint and not changed:
        changed.append(f"source: {source.get('url')!r} (as it was then) -> {listing.url!r} (as it is now)")
    return (f"DEST {store.url} holds {what} made with different settings ({'; '.join(changed)}). "
            "Rerun with the same options, choose another DEST, or pass --overwrite to replace it.")


def _clear(store: Store) -> None:
    for rel in (MANIFEST, REJECTS):
        store.delete(rel)
    for rel in ("train", "val", PROGRESS):
        store.delete(rel, recursive=True)


# ---- scan and plan ---------------------------------------------------------------------------------


def _scan(listing: Listing, workers: int, bar: "_Progress", seed: int) -> tuple[EntryTable, list[str] | None]:
    """Every input's content hash, in listing order, as columns; class names when the source carries them."""
    import ray

    if listing.files:
        task = ray.remote(num_cpus=1)(_scan_files_task)
        chunks = [listing.files[i:i + SCAN_CHUNK] for i in range(0, len(listing.files), SCAN_CHUNK)]
        results = run_bounded(lambda c: task.remote(c, seed), chunks, workers, bar.scan_step(len(chunks)))
        classes = listing.classes
        table = EntryTable.concat(results)
    else:
        task = ray.remote(num_cpus=1)(_scan_container_task)
        results = run_bounded(lambda url: task.remote(url, listing.kind, listing.url, seed), listing.containers,
                              workers, bar.scan_step(len(listing.containers)))
        classes = listing.classes or next((c for _, c in results if c), None)
        table = EntryTable.concat([t for t, _ in results])
    del results
    try:  # labels are normalised once per distinct raw value, not per input
        table.label_values, classes = normalise_labels(table.label_values, classes)
    except SourceError as exc:
        raise SourceError(f"{listing.url}: {exc}") from None
    return table, classes


def _scan_files_task(files: list[tuple[str, Any, Any]], seed: int) -> EntryTable:
    return EntryTable.from_entries(scan_files(files), seed)


def _scan_container_task(url: str, kind: str, src: str, seed: int) -> tuple[EntryTable, list[str] | None]:
    entries, classes = scan_container(url, kind, src)
    return EntryTable.from_entries(entries, seed), classes


# ---- build -------------------------------------------------------------------------------------------


def _build(shards: Shards, store: Store, spec: ImageSpec, workers: int, bar: "_Progress",
           storage_options: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Progress records of every shard (finished ones reused), and how many were built now."""
    import ray

    records = finished_records(store, shards)
    todo = [i for i, r in enumerate(records) if r is None]
    if len(todo) < len(shards):
        log.info("resuming: %d of %d shards are already finished", len(shards) - len(todo), len(shards))
    on_done = bar.shard_step(len(shards), len(shards) - len(todo))
    task = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    results = run_bounded(lambda i: task.remote(shards[i], store.url, spec, storage_options), todo, workers, on_done)
    for i, record in zip(todo, results):
        records[i] = record
    return records, len(todo)  # type: ignore[return-value]


def run_bounded(submit: Callable[[Any], Any], items: list[Any], limit: int,
                on_done: Callable[[Any], None] = lambda r: None) -> list[Any]:
    """Submit a Ray task per item with at most ``limit`` in flight; results in item order."""
    import ray

    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    queue = iter(range(len(items)))
    for i in queue:
        pending[submit(items[i])] = i
        if len(pending) >= limit:
            break
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        results[i] = _get(ready[0])
        on_done(results[i])
        nxt = next(queue, None)
        if nxt is not None:
            pending[submit(items[nxt])] = nxt
    return results


def _get(ref: Any) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # re-raise the task's own error (a StorageError, …)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


# ---- finish: rejects, accounting, manifest ---------------------------------------------------------


def _finish(store: Store, plan: Plan, records: list[dict[str, Any]], options: PrepOptions,
            listing: Listing) -> Manifest:
    rejects = sorted(plan.early_rejects + [r for rec in records for r in rec["rejects"]],
                     key=lambda r: (r["input"], r["reason"]))
    splits: dict[str, SplitInfo] = {}
    for split, rec in zip(plan.shards.splits(), records):
        splits.setdefault(split, SplitInfo(shards=[])).shards.append(ShardInfo(**rec["shard"]))
    written = sum(s.samples for s in splits.values())
    if plan.inputs != written + len(rejects):  # the accounting invariant; a bug if it ever fails
        raise PrepError(f"accounting mismatch: {plan.inputs} inputs != {written} written + {len(rejects)} rejected")
    ignored = [{"input": name, "reason": IGNORED, "detail": "not an image, at the root of an ImageFolder "
                "(torchvision ignores it too); not an input"} for name in listing.ignored]
    store.put_bytes(REJECTS, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                     for r in rejects + ignored).encode())
    by_reason = {r: n for r in REASONS if (n := sum(x["reason"] == r for x in rejects))}
    _check_threshold(store, plan.inputs, len(rejects), by_reason, options.reject_threshold)
    manifest = Manifest(
        splits=splits, classes=plan.classes, image_ext=plan.ext, rejects=by_reason,
        channels=_channel_info(plan, records), masks=_mask_info(plan, records),
        totals={"inputs": plan.inputs, "written": written, "rejected": len(rejects),
                "duplicates": by_reason.get(DUPLICATE, 0), **{s: v.samples for s, v in splits.items()},
                **({"ignored": len(ignored)} if ignored else {})},
        options=options.output_options(), options_digest=options.digest(),
        source={"url": listing.url, "kind": listing.kind, "fingerprint": listing.fingerprint,
                "content_digest": plan.content_digest},
    )
    save_manifest(store, manifest)
    return manifest


def _channel_info(plan: Plan, records: list[dict[str, Any]]) -> ChannelInfo | None:
    """``format: npy``: names, dtype and the train split's per-channel statistics (merged shard records)."""
    if plan.ext != "npy":
        return None
    stats = None
    for split, rec in zip(plan.shards.splits(), records):
        if split == "train" and rec.get("stats"):
            part = ChannelStats.from_json(rec["stats"])
            stats = part if stats is None else (stats.merge(part) or stats)
    if stats is None:
        layout = plan.layout or (len(plan.channel_names or []), "uint8")
        stats = ChannelStats(*layout)
    names = plan.channel_names or [str(i) for i in range(stats.channels)]
    return ChannelInfo.build(names, stats.dtype, stats.summary())


def _mask_info(plan: Plan, records: list[dict[str, Any]]) -> MaskInfo | None:
    """With masks: the class count (largest class in any written mask, plus one)."""
    if plan.shards.masks is None or not len(plan.shards):
        return None
    return MaskInfo(classes=1 + max((rec.get("mask_max", -1) for rec in records), default=0))


def _check_threshold(store: Store, inputs: int, rejected: int, by_reason: dict[str, int], threshold: float) -> None:
    if inputs and rejected / inputs > threshold:
        reasons = ", ".join(f"{k}: {v}" for k, v in by_reason.items())
        raise TooManyRejectsError(
            f"{rejected} of {inputs} inputs ({rejected / inputs:.1%}) were rejected ({reasons}), more than the "
            f"reject threshold of {threshold:.1%}. See {store.url_of(REJECTS)} for each input and its reason; fix "
            "the inputs or raise --reject-threshold, then rerun (finished shards are kept)."
        )


# ---- progress and summary ----------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr when asked (or on a terminal); INFO log lines otherwise."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[rejects]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def scan_step(self, total: int) -> Callable[[Any], None]:
        task = self._bar.add_task("scan  ", total=total, rate="", rejects="") if self._bar else None
        return lambda _: self._bar.advance(task) if self._bar else None

    def shard_step(self, total: int, reused: int) -> Callable[[dict[str, Any]], None]:
        task = self._bar.add_task("shards", total=total, completed=reused, rate="", rejects="") if self._bar else None
        start, counts = time.monotonic(), {"built": 0, "images": 0, "rejects": 0}

        def step(record: dict[str, Any]) -> None:
            counts["built"] += 1
            counts["images"] += record["shard"]["samples"]
            counts["rejects"] += len(record["rejects"])
            rate = counts["images"] / max(time.monotonic() - start, 1e-9)
            if self._bar is not None:
                self._bar.update(task, advance=1, rate=f"{rate:,.0f} img/s", rejects=f"{counts['rejects']} rejects")
            elif counts["built"] == 1 or counts["built"] % max(1, (total - reused) // 10) == 0:
                log.info("shards: %d of %d built (%d images, %.0f img/s, %d rejects)", counts["built"],
                         total - reused, counts["images"], rate, counts["rejects"])

        return step


def summary_table(result: PrepResult) -> Any:
    """A rich Table: per split shards / samples / bytes, then rejects by reason and the totals."""
    from rich.table import Table

    m = result.manifest
    title = "prep: nothing to do (DEST already holds this prep)" if result.skipped else \
        f"prep: {result.shards_built} shards built, {result.shards_reused} reused in {result.seconds:.1f} s " \
        f"({result.images_per_s:,.0f} images/s; Ray start {result.timings.get('ray', 0):.1f} s)"
    table = Table(title=title)
    for col in ("", "shards", "samples", "bytes"):
        table.add_column(col, justify="right" if col else "left")
    for name, split in m.splits.items():
        table.add_row(name, str(len(split.shards)), f"{split.samples:,}", f"{sum(s.bytes for s in split.shards):,}")
    for reason, n in m.rejects.items():
        table.add_row(f"rejected: {reason}", "", f"{n:,}", "")
    t = m.totals
    table.add_row("inputs = written + rejected", "", f"{t['inputs']:,} = {t['written']:,} + {t['rejected']:,}", "")
    if t.get("ignored"):
        table.add_row("ignored (not images)", "", f"{t['ignored']:,}", "")
    table.caption = source_line(m)  # wraps to the table's width; the CLI prints it on one line too
    return table


def source_line(m: Manifest) -> str:
    """``source: imagefolder, 10 classes`` / ``source: flat, no classes (unlabelled)``."""
    kind = (m.source or {}).get("kind", "?")
    classes = f"{len(m.classes)} classes" if m.classes else "no classes (unlabelled: fine for mae/dino, not finetune)"
    return f"source: {kind} ({(m.source or {}).get('url', '')}), {classes}"

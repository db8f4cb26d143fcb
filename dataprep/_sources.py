"""Where prep inputs come from: listing a source on the driver, scanning it on Ray (reading a sample
back in a shard task: :mod:`dataprep._refs`).

Source kinds
------------
``imagefolder``  ``SRC/<class>/…/<file>``: class sub-folders -> integer labels (sorted names)
``flat``         every file under ``SRC`` (recursively), no labels
``csv``/``jsonl`` a list of ``path[,label]`` rows / ``{"path": …, "label": …}`` lines; paths are
                 relative to the list's folder or full fsspec URLs; labels are integers or names
``parquet``      a file or folder of Parquet files with an image column (Hugging Face datasets'
                 ``image`` struct ``{bytes, path}``, or a binary ``jpg``/``png``/``image`` column as
                 img2dataset writes) and an optional integer ``label``/``cls`` column
``wds``          a tar or a folder of WebDataset tars (``<key>.jpg|png|…`` + optional ``<key>.cls``)

With ``channels`` (e.g. ``DNA,ER,RNA,AGP,Mito``) a CSV / JSONL / Parquet list names **one file
per channel**: a header row (CSV) or keys / columns naming those channels, plus an optional label
column; the channels are read in the order given and stacked into one ``[C, H, W]`` sample.

Every sample is named by a *ref*, a small tuple a Ray task reads it back from (:mod:`dataprep._refs`):
``("f", url)``, ``("t", tar_url, data_offset, size)``, ``("p", parquet_url, row_group, row)``,
``("m", (url, …))`` (one file per channel).
Hidden files and folders (``.name``) are skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from cluster.storage import Store, StorageError, with_retries

from ._arrays import Layout, probe
from ._images import EMPTY, UNREADABLE, UNSUPPORTED, sniff_format
from ._shards import IMAGE_EXTS, unsafe_member_name

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "flat", "csv", "jsonl", "parquet", "wds")
_HEADER_WORDS = {"path", "file", "filename", "image", "url", "src"}
_LABEL_COLUMNS = ("label", "labels", "cls", "class")
_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")


class SourceError(ValueError):
    """SRC cannot be used (missing, empty, unrecognised layout). The message says what to do."""


@dataclass
class Listing:
    """What the driver learns without reading any image: the units to scan and a fingerprint."""

    kind: str
    url: str
    files: list[tuple[str, Any, Any]] = field(default_factory=list)  # (name, url or (url, …) per channel, raw label)
    containers: list[str] = field(default_factory=list)  # tar / parquet URLs
    classes: list[str] | None = None
    fingerprint: str = ""
    ignored: list[str] = field(default_factory=list)  # non-image files at an ImageFolder's root
    masks: dict[str, str] = field(default_factory=dict)  # input name -> its segmentation mask's URL (attach_masks)


@dataclass(frozen=True, slots=True)
class Entry:
    """One input after the scan: its content hash (the sample key) or why it was rejected early.
    A scan task turns its entries into columns (:class:`dataprep._table.EntryTable`) before it returns,
    so the driver holds none of these (bench/RESULTS.md "scale")."""

    name: str
    ref: tuple
    label: Any = None
    key: str | None = None
    size: int = 0
    fmt: str | None = None
    reject: str | None = None
    detail: str = ""
    layout: Layout | None = None  # from the header (None: not told cheaply; the full decode decides)


# ---- filesystem access (cached per process: Ray workers reuse one client per protocol) ----------

_STORES: dict[tuple[str, str], Store] = {}


def store_for(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Store, str]:
    """(a Store rooted at the filesystem's root, the path of ``url`` in it).

    ``storage_options``: extra fsspec options for that filesystem (one cached client per
    protocol and options).
    """
    protocol, path = (url.split("://", 1) if "://" in url else ("file", url))
    if protocol == "file":
        path = os.path.abspath(path)
    key = (protocol, json.dumps(storage_options or {}, sort_keys=True, default=str))
    if key not in _STORES:
        _STORES[key] = Store(f"{protocol}://" if protocol != "file" else "/", storage_options)
    return _STORES[key], path.lstrip("/") if protocol != "file" else path


def store_at(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """A Store rooted at ``url`` sharing this process's client for its filesystem."""
    store, path = store_for(url, storage_options)
    return store.child(path)


def read_url(url: str) -> bytes:
    store, path = store_for(url)
    return store.get_bytes(path)


def _join(base: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.normpath(posixpath.join(base, rel)) if "://" not in base else f"{base.rstrip('/')}/{rel}"


# ---- listing (driver) ----------------------------------------------------------------------------


def list_source(src: str, kind: str = "auto", channels: list[str] | None = None) -> Listing:
    """List SRC and decide its kind. Raises :class:`SourceError` with an actionable message.

    ``channels``: for a CSV / JSONL / Parquet list, the columns naming one file per channel.
    """
    store, path = store_for(src)
    try:
        found = with_retries(lambda: store.fs.find(path, detail=True, withdirs=False), what=f"list {src}",
                             policy=store.retry) if store.exists(path) else None
    except FileNotFoundError:
        found = None
    if found is None:
        raise SourceError(f"SRC {src!r} does not exist. Give a folder, a CSV/JSONL list, a Parquet file or a tar.")
    base = path.rstrip("/")
    rels = sorted(
        (rel, int(info.get("size") or 0))
        for rel, info in ((_rel(p, base), info) for p, info in found.items())
        if not any(part.startswith(".") for part in rel.split("/"))
    )
    is_file = len(found) == 1 and next(iter(found)).rstrip("/") == base
    kind = _detect_kind(src, rels, is_file) if kind == "auto" else kind
    if kind not in KINDS:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(KINDS)} or 'auto'")
    where = store.url_of(path) if "://" in src else path  # local: absolute
    if channels and kind in ("csv", "jsonl", "parquet"):
        listing = _list_channel_table(where, is_file, kind, channels)
    else:
        listing = _LISTERS[kind](where, rels, is_file)
    listing.fingerprint = _fingerprint(kind, rels, listing)
    if not listing.files and not listing.containers:
        raise SourceError(f"SRC {src!r} holds no inputs for a {kind!r} source (hidden files are skipped).")
    return listing


def attach_masks(listing: Listing, masks: str) -> None:
    """Pair every input of ``listing`` with its mask (``dataprep/_masks.py``): ``masks`` is a folder
    holding ``<input name without extension>.png``, or ``column`` for the list's own ``mask`` column.
    The masks' names (and, in a folder, sizes) join the source fingerprint."""
    from ._masks import COLUMN

    if not listing.files or any(isinstance(url, tuple) for _, url, _ in listing.files):
        raise SourceError(f"masks: need a folder or a CSV/JSONL list of images; {listing.url} is a {listing.kind} "
                          "source (containers and per-channel lists carry no masks)")
    if masks == COLUMN:
        if listing.kind not in ("csv", "jsonl") or not listing.masks:
            raise SourceError(f"masks: column needs a CSV (a header with a 'mask' column) or JSONL ('\"mask\"' "
                              f"fields) list; {listing.url} names no mask")
        sizes: list[tuple[str, int]] = []
    else:
        store, path = store_for(masks)
        if not store.exists(path):
            raise SourceError(f"masks: folder {masks!r} does not exist; give the folder of <name>.png masks, "
                              "or 'column' for a list's mask column")
        found = store.fs.find(path, detail=True, withdirs=False)
        base = path.rstrip("/")
        sizes = sorted((_rel(p, base), int(info.get("size") or 0)) for p, info in found.items())
        where = store.url_of(base) if "://" in masks else base
        present = {rel for rel, _ in sizes}
        listing.masks = {name: _join(where, stem + ".png") for name, _, _ in listing.files
                         if (stem := posixpath.splitext(name)[0]) + ".png" in present}
    h = hashlib.sha256(listing.fingerprint.encode())
    for name, url in sorted(listing.masks.items()):
        h.update(f"\0{name}\0{url}".encode())
    for rel, size in sizes:
        h.update(f"\1{rel}\0{size}".encode())
    listing.fingerprint = h.hexdigest()


def _rel(p: str, base: str) -> str:
    return posixpath.basename(p) if p.rstrip("/") == base else posixpath.relpath(p, base)


def _detect_kind(src: str, rels: list[tuple[str, int]], is_file: bool) -> str:
    if not rels:
        raise SourceError(f"SRC {src!r} is empty: no files found (hidden files are skipped).")
    exts = {posixpath.splitext(r)[1].lower().lstrip(".") for r, _ in rels}
    if is_file:
        ext = posixpath.splitext(src)[1].lower()
        return {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                ".tar": "wds"}.get(ext) or _bad_file(src)
    if exts == {"parquet"}:
        return "parquet"
    if exts == {"tar"} or (exts <= {"tar", "json", "jsonl"} and "tar" in exts):
        return "wds"
    # like torchvision's ImageFolder: class sub-folders, and at the root nothing but non-images (README.txt, ...)
    return "imagefolder" if any("/" in r for r, _ in rels) and not any(_is_image(r) for r, _ in rels
                                                                      if "/" not in r) else "flat"


def _is_image(rel: str) -> bool:
    return posixpath.splitext(rel)[1].lower().lstrip(".") in IMAGE_EXTS


def _bad_file(src: str) -> str:
    raise SourceError(f"SRC {src!r} is a single file of an unknown kind: give a folder of images, a .csv/.jsonl "
                      "list, a .parquet file or a .tar shard.")


def _list_imagefolder(src: str, rels: list[tuple[str, int]], is_file: bool) -> Listing:
    classes = sorted({r.split("/", 1)[0] for r, _ in rels if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    stray = [r for r, _ in rels if "/" not in r and _is_image(r)]
    if stray:
        raise SourceError(f"{src!r} looks like an ImageFolder but has images outside class folders (e.g. {stray[0]!r}); "
                          "move them into a class folder or use --source-kind flat.")
    ignored = [r for r, _ in rels if "/" not in r]
    if ignored:
        log.warning("%s: ignoring %d non-image file(s) at the root of the ImageFolder (e.g. %r), as torchvision does",
                    src, len(ignored), ignored[0])
    files = [(r, _join(src, r), index[r.split("/", 1)[0]]) for r, _ in rels if "/" in r]
    return Listing("imagefolder", src, files=files, classes=classes, ignored=ignored)


def _list_flat(src: str, rels: list[tuple[str, int]], is_file: bool) -> Listing:
    return Listing("flat", src, files=[(r, _join(src, r), None) for r, _ in rels])


def _list_table(src: str, rels: list[tuple[str, int]], is_file: bool, kind: str) -> Listing:
    if not is_file:
        raise SourceError(f"a {kind} source must be a single list file, got the folder {src!r}")
    base = posixpath.dirname(src.rstrip("/")) or "."
    text = read_url(src).decode("utf-8-sig")
    rows = list(_csv_rows(text, src) if kind == "csv" else _jsonl_rows(text, src))
    files = [(p, _join(base, p), label) for p, label, _ in rows]
    masks = {p: _join(base, m) for p, _, m in rows if m}
    return Listing(kind, src, files=files, masks=masks)


def _csv_rows(text: str, src: str) -> Iterator[tuple[str, Any, str | None]]:
    """(path, label, mask) per row: ``path[,label]``; a header row may name a ``mask`` column."""
    dialect = "excel-tab" if src.endswith(".tsv") else "excel"
    mask_col, label_col = None, 1
    for i, row in enumerate(csv.reader(io.StringIO(text), dialect=dialect)):
        if not row or not row[0].strip():
            continue
        if i == 0 and row[0].strip().lower() in _HEADER_WORDS:
            header = [c.strip().lower() for c in row]
            mask_col = header.index("mask") if "mask" in header else None
            label_col = next((header.index(c) for c in _LABEL_COLUMNS if c in header), 1 if mask_col != 1 else None)
            continue
        label = row[label_col].strip() if label_col is not None and len(row) > label_col else ""
        mask = row[mask_col].strip() if mask_col is not None and len(row) > mask_col else ""
        yield row[0].strip(), (label if label != "" else None), (mask or None)


def _jsonl_rows(text: str, src: str) -> Iterator[tuple[str, Any, str | None]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{src} line {n}: not JSON ({exc.msg})") from None
        path = next((obj[k] for k in ("path", "file", "image", "url", "src") if isinstance(obj.get(k), str)), None)
        if path is None:
            raise SourceError(f"{src} line {n}: no 'path' field")
        mask = obj.get("mask")
        yield path, next((obj[k] for k in _LABEL_COLUMNS if k in obj), None), mask if isinstance(mask, str) else None


def _list_containers(src: str, rels: list[tuple[str, int]], is_file: bool, kind: str) -> Listing:
    ext = "tar" if kind == "wds" else "parquet"
    if is_file:
        return Listing(kind, src, containers=[src])
    urls = [_join(src, r) for r, _ in rels if r.lower().endswith("." + ext)]
    listing = Listing(kind, src, containers=urls)
    if kind == "wds" and any(r == "manifest.json" for r, _ in rels):  # our own output: keep its class names
        listing.classes = json.loads(read_url(_join(src, "manifest.json"))).get("classes")
    return listing


def _list_channel_table(src: str, is_file: bool, kind: str, channels: list[str]) -> Listing:
    """A list whose rows name one file per channel: ``(name, (url per channel), label)`` per row."""
    if not is_file:
        raise SourceError(f"a {kind} list of per-channel files must be a single file, got the folder {src!r}")
    base = posixpath.dirname(src.rstrip("/")) or "."
    rows = _table_records(src, kind)
    if not rows:
        raise SourceError(f"{src}: the list has no rows")
    missing = [c for c in channels if c not in rows[0]]
    if missing:
        raise SourceError(f"{src}: no column(s) {missing} for the channels {channels}; its columns are "
                          f"{list(rows[0])}. Fix --channels (names are case-sensitive).")
    label_col = next((c for c in _LABEL_COLUMNS if c in rows[0]), None)
    files = []
    for n, row in enumerate(rows, 1):
        paths = [row.get(c) for c in channels]
        if any(not isinstance(p, str) or not p.strip() for p in paths):
            raise SourceError(f"{src} row {n}: an empty path for a channel of {channels}")
        label = row.get(label_col) if label_col else None
        files.append((paths[0].strip(), tuple(_join(base, p.strip()) for p in paths),
                      None if label in (None, "") else label))
    return Listing(kind, src, files=files)


def _table_records(src: str, kind: str) -> list[dict[str, Any]]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        store, path = store_for(src)
        with store.open_read(path) as f:
            return pq.read_table(f).to_pylist()
    text = read_url(src).decode("utf-8-sig")
    if kind == "csv":
        dialect = "excel-tab" if src.endswith(".tsv") else "excel"
        return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                for row in csv.DictReader(io.StringIO(text), dialect=dialect)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SourceError(f"{src} line {n}: not JSON ({exc.msg})") from None
    return out


_LISTERS = {
    "imagefolder": _list_imagefolder,
    "flat": _list_flat,
    "csv": lambda s, r, f: _list_table(s, r, f, "csv"),
    "jsonl": lambda s, r, f: _list_table(s, r, f, "jsonl"),
    "parquet": lambda s, r, f: _list_containers(s, r, f, "parquet"),
    "wds": lambda s, r, f: _list_containers(s, r, f, "wds"),
}


def _fingerprint(kind: str, rels: list[tuple[str, int]], listing: Listing) -> str:
    """Names and sizes of what SRC holds (and the list's rows): changes when the source does."""
    h = hashlib.sha256(kind.encode())
    for rel, size in rels:
        h.update(f"\0{rel}\0{size}".encode())
    for name, url, label in listing.files:
        h.update(f"\1{name}\0{label}".encode())
        if isinstance(url, tuple):  # one file per channel: which files, in which order
            h.update("\2".join(url).encode())
    return h.hexdigest()


def normalise_labels(labels: list[Any], classes: list[str] | None) -> tuple[list[int | None], list[str] | None]:
    """Raw labels (ints, digit strings or names) -> label indices and class names."""
    present = [x for x in labels if x is not None]
    if not present:
        return [None] * len(labels), classes
    if classes is not None and all(isinstance(x, int) for x in present):
        return labels, classes
    if all(isinstance(x, int) or (isinstance(x, str) and x.lstrip("-").isdigit()) for x in present):
        ints = [None if x is None else int(x) for x in labels]
        if min(i for i in ints if i is not None) < 0:
            raise SourceError("labels must be >= 0")
        return ints, classes or [str(i) for i in range(max(i for i in ints if i is not None) + 1)]
    names = sorted({str(x) for x in present})
    index = {n: i for i, n in enumerate(names)}
    return [None if x is None else index[str(x)] for x in labels], names


# ---- scan (Ray tasks): content hash of every input --------------------------------------------------


def _entry(name: str, ref: tuple, label: Any, data: bytes | None, error: str = "") -> Entry:
    if data is None:
        return Entry(name, ref, label, reject=UNREADABLE, detail=error)
    if not data:
        return Entry(name, ref, label, size=0, reject=EMPTY, detail="0 bytes")
    return Entry(name, ref, label, key=hashlib.sha256(data).hexdigest(), size=len(data), fmt=sniff_format(data),
                 layout=probe(data))


def scan_files(files: list[tuple[str, Any, Any]]) -> list[Entry]:
    out = []
    for name, url, label in files:
        if isinstance(url, tuple):
            out.append(_scan_channel_files(name, url, label))
            continue
        try:
            data, error = read_url(url), ""
        except (OSError, StorageError) as exc:
            data, error = None, f"{type(exc).__name__}: {exc}"
        out.append(_entry(name, ("f", url), label, data, error))
    return out


def _scan_channel_files(name: str, urls: tuple[str, ...], label: Any) -> Entry:
    """One sample made of one file per channel: its key hashes every part's hash, in channel order."""
    parts = []
    for url in urls:
        try:
            parts.append(read_url(url))
        except (OSError, StorageError) as exc:
            return Entry(name, ("m", urls), label, reject=UNREADABLE, detail=f"{url}: {type(exc).__name__}: {exc}")
    empty = [url for url, p in zip(urls, parts) if not p]
    if empty:
        return Entry(name, ("m", urls), label, reject=EMPTY, detail=f"{empty[0]}: 0 bytes")
    key = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()
    layouts = [probe(p) for p in parts]
    layout = None
    if all(lay is not None for lay in layouts):
        first = layouts[0]
        same = all((lay.channels, lay.dtype, lay.height, lay.width) == (1, first.dtype, first.height, first.width)
                   for lay in layouts)
        layout = Layout(len(parts) if same else -1, first.dtype, first.height, first.width, False)
    return Entry(name, ("m", urls), label, key=key, size=sum(map(len, parts)), layout=layout)


def scan_container(url: str, kind: str, src: str) -> tuple[list[Entry], list[str] | None]:
    """Entries of one tar / Parquet file, and class names when the file carries them."""
    name = url[len(src):].lstrip("/") if url.startswith(src) and url != src else posixpath.basename(url)
    return (_scan_tar(url, name), None) if kind == "wds" else _scan_parquet(url, name)


def _scan_tar(url: str, name: str) -> list[Entry]:
    store, path = store_for(url)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with store.open_read(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = posixpath.basename(m.name)
            if "." not in base or base.startswith("."):
                continue
            key = posixpath.join(posixpath.dirname(m.name), base.split(".", 1)[0])
            samples.setdefault(key, {})[base.split(".", 1)[1].lower()] = m
        out = []
        for key, members in samples.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            sample = f"{name}:{key}"
            if unsafe_member_name(key):
                out.append(Entry(sample, ("t", url, 0, 0), None, reject=UNSUPPORTED,
                                 detail="unsafe member name (absolute or containing '..'): not read"))
                continue
            label = tar.extractfile(members["cls"]).read().decode().strip() if "cls" in members else None
            if image is None:
                out.append(Entry(sample, ("t", url, 0, 0), label, reject=UNSUPPORTED,
                                 detail=f"no image member (has {', '.join(sorted(members))})"))
                continue
            data = tar.extractfile(image).read()
            out.append(_entry(sample, ("t", url, image.offset_data, image.size), label, data))
    return out


def _scan_parquet(url: str, name: str) -> tuple[list[Entry], list[str] | None]:
    import pyarrow.parquet as pq

    store, path = store_for(url)
    with store.open_read(path) as f:
        pf = pq.ParquetFile(f)
        image_col, label_col = _parquet_columns(pf.schema_arrow, url)
        out, row = [], 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=[c for c in (image_col, label_col) if c])
            images = _image_bytes(table.column(image_col).to_pylist())
            labels = table.column(label_col).to_pylist() if label_col else [None] * len(images)
            for i, (data, label) in enumerate(zip(images, labels)):
                out.append(_entry(f"{name}:{row}", ("p", url, rg, i), label, data))
                row += 1
    return out, _hf_class_names(pf.schema_arrow, label_col)


def _parquet_columns(schema, url: str) -> tuple[str, str | None]:
    import pyarrow as pa

    image_col = None
    for col in _IMAGE_COLUMNS:
        if col in schema.names:
            t = schema.field(col).type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 or pa.types.is_binary(t) \
                    or pa.types.is_large_binary(t):
                image_col = col
                break
    if image_col is None:
        raise SourceError(f"{url}: no image column; expected one of {', '.join(_IMAGE_COLUMNS)} holding bytes "
                          f"(or a struct with a 'bytes' field); columns are {schema.names}")
    label_col = next((c for c in _LABEL_COLUMNS if c in schema.names and pa.types.is_integer(schema.field(c).type)), None)
    return image_col, label_col


def _image_bytes(values: Iterable[Any]) -> list[bytes | None]:
    out = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("bytes")
        out.append(b"" if v is None else bytes(v))
    return out


def _hf_class_names(schema, label_col: str | None) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta or not label_col:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_col]
    except (KeyError, TypeError, ValueError):
        return None
    return list(feature["names"]) if isinstance(feature, dict) and feature.get("names") else None

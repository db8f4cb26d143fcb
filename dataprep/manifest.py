"""The shard manifest: the contract between the shard writer and the streaming reader.

``<dest>/manifest.json`` is written LAST by a prep run and is its commit: a directory of shards
without it is an unfinished prep. The reader trusts the manifest's per-shard sample counts,
which is what makes exact, world-size-independent resume possible.

Shard members follow WebDataset conventions: ``<key>.jpg|png|npy`` (the image; ``.npy`` is one
``[C, H, W]`` array at the source dtype, described by ``channels``), optionally
``<key>.cls`` (ASCII integer label), ``<key>.mask.png`` (a segmentation mask, when ``masks`` is
set: ``dataprep/_masks.py``) and ``<key>.json`` (per-sample metadata). Keys are content
hashes of the original image bytes.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.storage import Store

MANIFEST = "manifest.json"
FORMAT = "vitforge-shards/1"


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="path of the tar relative to the manifest's directory, e.g. 'train/shard-000000.tar'")
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[ShardInfo]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


class ChannelInfo(BaseModel):
    """``format: npy``: what each ``[C, H, W]`` sample holds, and the train split's statistics.

    ``mean`` / ``std`` (population, ddof 0) / ``p01`` / ``p99`` have one value per channel, in the
    order of ``names``; see :mod:`dataprep._stats` for how exact each is. ``digest`` is the sha256
    of the rest (names, dtype, statistics), so a change in any of them changes the digest.
    """

    model_config = ConfigDict(extra="forbid")

    names: list[str]
    dtype: str
    mean: list[float]
    std: list[float]
    p01: list[float]
    p99: list[float]
    digest: str = ""

    @classmethod
    def build(cls, names: list[str], dtype: str, stats: dict[str, list[float]]) -> "ChannelInfo":
        info = cls(names=names, dtype=dtype, **stats)
        return info.model_copy(update={"digest": info.content_digest()})

    def content_digest(self) -> str:
        body = self.model_dump(mode="json", exclude={"digest"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def count(self) -> int:
        return len(self.names)


class MaskInfo(BaseModel):
    """Every sample carries ``<key>.mask.png``: one integer class per pixel, of its image's size."""

    model_config = ConfigDict(extra="forbid")

    classes: int = Field(ge=1, description="largest class in any mask, plus one")
    member: str = Field(default="mask.png", description="the shard member's extension")


class Manifest(BaseModel):
    """What a prep run wrote. ``splits`` maps 'train' / 'val' to their shards."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["vitforge-shards/1"] = FORMAT
    splits: dict[str, SplitInfo]
    classes: list[str] | None = Field(default=None, description="label index -> class name; None when unlabeled")
    image_ext: str = Field(default="jpg", description="extension of the image member in every sample")
    totals: dict[str, int] = Field(default_factory=dict, description="inputs, written, rejected, duplicates")
    rejects: dict[str, int] = Field(default_factory=dict, description="reason -> count; details in rejects.jsonl")
    options: dict[str, Any] = Field(default_factory=dict)
    options_digest: str = ""
    source: dict[str, Any] = Field(default_factory=dict, description="source URL and fingerprint")
    channels: ChannelInfo | None = Field(default=None, description="npy shards: channel names, dtype, statistics; "
                                                                   "None: 8-bit RGB images")
    masks: MaskInfo | None = Field(default=None, description="per-sample segmentation masks; None: none")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"manifest has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def manifest_location(url: str) -> tuple[str, str]:
    """Split a manifest URL or a prep output directory into (directory URL, manifest file name)."""
    if url.rstrip("/").endswith(".json"):
        return posixpath.dirname(url.rstrip("/")), posixpath.basename(url.rstrip("/"))
    return url.rstrip("/"), MANIFEST


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Manifest, Store]:
    """Read a manifest (given its URL or its directory). Returns it with a Store rooted at its directory."""
    directory, name = manifest_location(url)
    store = Store(directory, storage_options)
    if not store.exists(name):
        raise FileNotFoundError(
            f"no {name} at {store.url_of(name)}: not a finished prep output. "
            "Run `vitforge prep SRC DEST` (or the run's prep stage) to completion first."
        )
    return Manifest.model_validate(store.get_json(name)), store


def save_manifest(store: Store, manifest: Manifest) -> None:
    """Write the manifest (call LAST: it commits the prep output)."""
    store.put_json(MANIFEST, manifest.model_dump(mode="json"))

"""The options of a prep run (:class:`PrepOptions`: the CLI flags and a run spec's ``prep`` stage); what they
do: ``dataprep/prep.py``."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# far above any training size (ViTs train at 224-518 px): a 72-megapixel photo stored whole costs
# ~30x the bytes and decode time of one at this size and gains a model nothing
MAX_SIDE_DEFAULT = 4096
DEFAULT_SHARD_SIZE = 1000


# Options that change the output bytes; the rest (workers, threshold, overwrite) do not.
_OUTPUT_OPTIONS = ("shard_size", "shard_bytes", "resize", "format", "quality", "val_fraction", "seed", "min_side",
                   "max_pixels")


class PrepOptions(BaseModel):
    """The knobs of a prep run (the CLI flags and the run spec's ``prep`` stage)."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int | None = Field(None, ge=1, description=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    shard_bytes: int | None = Field(None, ge=1, description="input bytes per shard instead of a sample count")
    resize: int | None = Field(None, ge=1, description="shrink the shorter side to this many pixels (never enlarges)")
    format: Literal["jpg", "png", "keep", "npy"] = Field(
        "jpg", description="keep: the inputs' dominant format, jpg or png; npy: [C, H, W] arrays at the source dtype")
    channels: list[str] | None = Field(
        None, min_length=1, description="channel names, in order: the columns of a one-file-per-channel list, or "
                                        "names for the channels of each input")
    to_rgb: bool = Field(False, description="under jpg/png, convert inputs that would lose channels or bit depth "
                                            "(otherwise they are refused at planning time)")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    workers: int | None = Field(None, ge=1, description="shard tasks in flight (default: the cluster's CPUs)")
    reject_threshold: float = Field(0.05, ge=0.0, le=1.0, description="fail when a larger fraction is rejected")
    min_side: int = Field(8, ge=1, description="reject images with a side shorter than this")
    max_pixels: int = Field(89_478_485, ge=1, description="reject larger images as decompression bombs (PIL's limit)")
    max_side: int | None = Field(MAX_SIDE_DEFAULT, ge=1, description="jpg/png without resize: shrink an image whose "
                                 "longer side is above this to it (a warning says so); null keeps every size")
    source_kind: Literal["auto", "imagefolder", "flat", "csv", "jsonl", "parquet", "wds"] = "auto"
    masks: str | None = Field(None, min_length=1, description="per-sample segmentation masks (<key>.mask.png): a "
                                                              "folder of <input name>.png, or 'column' for a list's "
                                                              "mask column (dataprep/_masks.py)")
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_shard_rule(self) -> "PrepOptions":
        if self.shard_size is not None and self.shard_bytes is not None:
            raise ValueError("give shard_size or shard_bytes, not both")
        if self.masks and self.format == "npy" and self.resize:
            raise ValueError("masks with format npy need resize unset (the mask must match the array as written)")
        return self

    def output_options(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _OUTPUT_OPTIONS}
        out.update({k: v for k in ("channels", "to_rgb", "masks") if (v := getattr(self, k))})  # only when set: old digests hold
        if self.max_side != MAX_SIDE_DEFAULT:
            out["max_side"] = self.max_side
        if out["shard_size"] is None and out["shard_bytes"] is None:
            out["shard_size"] = DEFAULT_SHARD_SIZE
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.output_options(), sort_keys=True).encode()).hexdigest()


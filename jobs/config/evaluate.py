"""Stage config of ``kind: eval`` (what it does: ``jobs/evaluate.py``, ``jobs/_eval_dense.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.config.digest import json_digest


class DenseConfig(BaseModel):
    """``dense:`` of a ``kind: eval`` stage (any field may be left out)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=30, ge=1, description="of the linear patch classifier (AdamW, cosine)")
    batch_size: int = Field(default=1024, ge=1, description="tokens per probe step")
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    high_norm_factor: float = Field(default=4.0, gt=1, description="a token is high-norm above this x the median")
    max_train_images: int | None = Field(default=None, ge=1, description="train images for the probe; None: all")



class ProbeConfig(BaseModel):
    """The linear probe: AdamW on standardised frozen features, cosine schedule, fixed seed."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=100, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)


class EvalConfig(BaseModel):
    """A ``kind: eval`` stage."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["eval"] = "eval"
    data: str = Field(description="a prep stage's name, or a manifest URL / prep output directory (labelled)")
    models: list[str] = Field(min_length=1, description="earlier training stages (their export) or export URLs")
    train_split: str = "train"
    val_split: str = "val"
    pool: Literal["token", "avg", "channels"] | None = Field(
        default=None, description="ViTs: the CLS token, or the mean patch token; ChannelViTs also channels (each "
        "channel's mean patch token, concatenated); default: what each export's method trained (its config.json "
        "vitforge.pool: token for DINO, avg for MAE, channels for a ChannelViT under MAE), else token")
    img_size: int | None = Field(default=None, ge=8, description="default: each export's own input size")
    channels: list[str] | None = Field(default=None, min_length=1, description="the data's channels each model "
                                       "reads, by name and in order (default: all): a ChannelViT takes any subset "
                                       "of its trained channels, a plain model exactly its in_chans")
    withhold: list[str] | None = Field(default=None, min_length=1, description="of the channels each model reads, "
                                       "those it goes without (a robustness measurement): a ChannelViT reads the "
                                       "others, a plain model gets each as zeros after normalisation (its train "
                                       "mean); eval.json records which and how")
    knn_k: int = Field(default=20, ge=1)
    knn_temperature: float = Field(default=0.07, gt=0)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    label_fraction: float = Field(default=1.0, gt=0, le=1, description="stratified share of train labels used")
    reconstruction: bool = Field(default=True, description="MAE stages: val reconstruction loss vs trivial baselines")
    dense: DenseConfig | None = Field(default=None, description="patch-token probe (mIoU on the prep's masks) and "
                                                                "high-norm token count per model (jobs/_eval_dense.py)")
    batch_size: int = Field(default=256, ge=1, description="images per forward pass when extracting features")
    loader_workers: int = Field(default=2, ge=0)
    seed: int = 0

    def digest(self) -> str:
        skip = {"loader_workers", "batch_size"} | {k for k in ("channels", "withhold")  # old digests hold
                                                     if getattr(self, k) is None}
        return json_digest(self.model_dump(mode="json", exclude=skip))




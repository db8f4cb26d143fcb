"""Stage config of ``kind: eval`` (what it does: ``jobs/evaluate.py``, ``jobs/_eval_dense.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.config.digest import json_digest


class DenseConfig(BaseModel):
    """``dense:`` of a ``kind: eval`` stage (any field may be left out)."""

    model_config = ConfigDict(extra="forbid")

    solver: Literal["lbfgs", "adamw"] = Field(
        default="lbfgs", description="lbfgs: full-batch multinomial logistic regression to convergence (scikit-learn's "
                                     "LogisticRegression objective, C below); adamw: minibatch AdamW, cosine (epochs, "
                                     "batch_size, lr, weight_decay), for more tokens than fit in memory at once")
    C: float | None = Field(default=None, gt=0, description="lbfgs: inverse L2 strength, as scikit-learn's "
                                                          "(default 1.0)")
    max_iter: int | None = Field(default=None, ge=1, description="lbfgs: iterations at most (default 300)")
    crop_pct: float = Field(default=1.0, gt=0, le=1, description="the probe's view: shorter side resized to "
                            "img_size / crop_pct, center crop; 1.0: the whole image, as segmentation probes read it "
                            "(not the export's 0.875)")
    epochs: int | None = Field(default=None, ge=1, description="adamw: of the linear patch classifier (default 30)")
    batch_size: int | None = Field(default=None, ge=1, description="adamw: tokens per probe step (default 1024)")
    lr: float | None = Field(default=None, gt=0, description="adamw (default 1e-3)")
    weight_decay: float | None = Field(default=None, ge=0, description="adamw (default 1e-4)")
    ignore_index: int | None = Field(default=None, ge=0, description="a mask value that is no class (void, "
                                     "unlabelled: 255 in VOC or Cityscapes masks, 0 in ADE20K's): its pixels do not "
                                     "vote, a patch with no other pixel is left out of the probe and of the mIoU")
    high_norm_factor: float = Field(default=4.0, gt=1, description="a token is high-norm above this x the median")
    max_train_images: int | None = Field(default=None, ge=1, description="train images for the probe; None: all")

    @model_validator(mode="after")
    def _solver_fields(self) -> "DenseConfig":
        own = {"lbfgs": ("C", "max_iter"), "adamw": ("epochs", "batch_size", "lr", "weight_decay")}
        other = "adamw" if self.solver == "lbfgs" else "lbfgs"
        stray = [k for k in own[other] if getattr(self, k) is not None]
        if stray:
            many = len(stray) > 1
            have, belong, them = ("they have", "they belong", "them") if many else ("it has", "it belongs", "it")
            raise ValueError(f"dense: {', '.join(stray)} set with solver: {self.solver}, where {have} no effect: "
                             f"{belong} to solver: {other}; set solver: {other} or remove {them}")
        return self

    def lbfgs(self) -> tuple[float, int]:
        """(C, max_iter) with their defaults."""
        return (1.0 if self.C is None else self.C), (300 if self.max_iter is None else self.max_iter)

    def adamw(self) -> "ProbeConfig":
        """The AdamW probe's settings with their defaults."""
        names = ("epochs", "batch_size", "lr", "weight_decay")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return ProbeConfig(**{"epochs": 30, "batch_size": 1024, "lr": 1e-3, "weight_decay": 1e-4, **given})


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
        skip: dict[str, Any] = {k: True for k in ("loader_workers", "batch_size")}
        skip |= {k: True for k in ("channels", "withhold") if getattr(self, k) is None}  # old digests hold
        if self.dense is not None and self.dense.ignore_index is None:
            skip["dense"] = {"ignore_index": True}
        return json_digest(self.model_dump(mode="json", exclude=skip))




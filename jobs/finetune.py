"""Fine-tuning (``kind: finetune``) of an earlier stage's export, or of a randomly initialised
timm model (the from-scratch baseline), on labeled shards.

    - {name: ft, kind: finetune, data: data, init: pretrain}                     # an export
    - {name: scratch, kind: finetune, data: data, model: {arch: vit_tiny_patch16_224, img_size: 32}}
    - {name: ft-10pct, kind: finetune, data: data, init: pretrain, label_fraction: 0.1}

Modes (as in MAE's fine-tuning and linear-probing recipes):

* ``full``   every weight trains: layer-wise lr decay (a block ``i`` of ``L`` gets
             ``lr * layer_decay ** (L + 1 - (i + 1))``), drop path, label smoothing, mixup/cutmix.
* ``linear`` the encoder is frozen (eval mode, no grad); ``BatchNorm1d(affine=False)`` + a linear
             head train on its pooled features. The export folds the BatchNorm into the head.
* ``lora``   ``peft`` LoRA adapters on the attention ``qkv`` and ``proj`` of every block, plus the
             head; the export merges the adapters (``W + B A * alpha / r``) into plain timm weights.

Without ``init``, ``model`` names the timm architecture (any timm model, as a distillation
student) and its weights are timm's own random initialisation under the stage's ``seed`` (the
engine seeds torch before building), identical on every rank and attempt.

``label_fraction`` < 1 trains on a stratified, seeded subset of the train split's labels
(:func:`dataprep.labels.label_subset`: per class ``max(1, round(n_c * f))``, the subset a
``kind: eval`` stage with the same fraction and seed uses). The loader serves only those samples
(``StreamingLoader(subset=)``), so the order, the epochs and exact resume are as without it.
``label_fraction`` and ``labeled_samples`` are in every step record of ``metrics.jsonl`` and in
the export's ``config.json``.

Every export is a plain timm classifier (backbone + head, ``num_classes`` from the manifest),
loadable with ``timm.create_model("local-dir:<export>", pretrained=True)``. Top-1/top-5 on the
manifest's val split are logged at every epoch end (``val_top1``, ``val_top5``, ``val_loss``).

Mixup/cutmix (``mode: full``) is the loader's batch transform (:mod:`dataprep.mixing`): partner and
lambda are functions of (seed, epoch, sample id), so a resumed run, on any number of workers, mixes
exactly as an uninterrupted one; the step mixes the smoothed one-hot targets with the same lambdas.

Library entry (e.g. a low-label fine-tune inside an evaluation): :func:`run_finetune`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.storage import Store
from dataprep.labels import label_subset, split_labels
from dataprep.manifest import load_manifest
from dataprep.mixing import Mix, MixFields, mix_targets
from dataprep.transforms import eval_transform, mae_transform
from jobs.engine import OptimConfig, StageContext, TrainConfig, TrainResult, train
from jobs.export import export_timm_model, timm_export_config
from jobs.init import InitFields, WeightsFile, init_arch, load_init, read_init, weights_file_config
from jobs.layout import METRICS_NAME
from jobs.method import Method
from jobs.models import TimmModelConfig, forward_flops
from jobs.peft import LORA_TARGETS, LoraConfig, PeftConfig, apply_peft, merge_lora_state  # noqa: F401

log = logging.getLogger(__name__)

class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str = Field(default=LORA_TARGETS, description="regex over module names (peft)")


class FinetuneConfig(TrainConfig, InitFields, MixFields):
    """A ``kind: finetune`` stage: ``init`` (an export, or timm weights) or ``model`` (random init),
    exactly one. ``None`` recipe fields take the mode's defaults (see :data:`RECIPES`). ``peft``
    (``jobs/peft.py``) trains only some backbone tensors plus the head; ``mode: lora`` is
    ``peft: {lora: …}`` from the ``lora`` settings when ``peft`` is not given."""

    kind: Literal["finetune"] = "finetune"
    model: TimmModelConfig | None = Field(default=None, description="without init: the timm model to train from "
                                          "random initialisation (seeded by seed)")
    mode: Literal["full", "linear", "lora"] = "full"
    label_fraction: float = Field(default=1.0, gt=0, le=1, description="stratified share of the train labels used")
    num_classes: int | None = Field(default=None, ge=1, description="default: the manifest's class count")
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1)
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    mixup: float | None = Field(default=None, ge=0, description="mixup alpha; 0 disables (default: the mode's)")
    cutmix: float | None = Field(default=None, ge=0, description="cutmix alpha; 0 disables (default: the mode's)")
    crop_scale: tuple[float, float] = (0.08, 1.0)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(base_lr=1e-3, betas=(0.9, 0.999)))

    @model_validator(mode="after")
    def _init_or_model(self) -> "FinetuneConfig":
        if self.init is None and self.model is None:
            raise ValueError("give init (an earlier training stage or an export URL/path) to fine-tune pretrained "
                             "weights, or model (a timm model, e.g. {arch: vit_tiny_patch16_224, img_size: 32}) to "
                             "train from random initialisation")
        if self.init is not None and self.model is not None:
            raise ValueError(f"init ({self.init!r}) and model are both given: the architecture comes from init's "
                             "export; drop model, or drop init to train model from random initialisation")
        if self.peft is not None and self.mode == "linear":
            raise ValueError("peft with mode linear: a linear probe trains no encoder tensor; use mode full "
                             "(or lora) with peft, or drop peft")
        if self.model is not None and self.model.drop_path_rate:
            raise ValueError("model > drop_path_rate: set the stage's drop_path_rate instead (the fine-tune recipe "
                             "owns it)")
        return self

    @model_validator(mode="after")
    def _mode_defaults(self) -> "FinetuneConfig":
        for name, value in RECIPES[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self


# MAE's recipes: full fine-tuning (ViT-B: layer decay 0.65-0.75, drop path 0.1, mixup 0.8, cutmix 1.0,
# smoothing 0.1) and linear probing (no augmentation beyond crops, no regularisation).
RECIPES: dict[str, dict[str, float]] = {
    "full": {"layer_decay": 0.75, "drop_path_rate": 0.1, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0},
    "linear": {"layer_decay": 1.0, "drop_path_rate": 0.0, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0},
    "lora": {"layer_decay": 1.0, "drop_path_rate": 0.0, "label_smoothing": 0.1, "mixup": 0.0, "cutmix": 0.0},
}


# ---- models per mode -------------------------------------------------------------------------------


class LinearProbe(nn.Module):
    """A frozen encoder, then ``BatchNorm1d(affine=False)`` and a linear head on its pooled features."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = int(encoder.num_features)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, no drop path, BatchNorm statistics untouched
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True)  # [N, D]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.features(imgs)))  # [N, C]


def fold_batchnorm_into_head(state: dict[str, torch.Tensor], classifier: str,
                             eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """A :class:`LinearProbe` state -> a plain timm classifier state: ``head(bn(x)) = W' x + b'``."""
    mean, var = state["bn.running_mean"].double(), state["bn.running_var"].double()
    scale = 1.0 / torch.sqrt(var + eps)  # [D]
    w, b = state["head.weight"].double(), state["head.bias"].double()  # [C, D], [C]
    out = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out[f"{classifier}.weight"] = (w * scale).float()
    out[f"{classifier}.bias"] = (b - (w * scale) @ mean).float()
    return out


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       no_decay_names: set[str]) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (L + 1 - layer)``: embeddings are layer 0,
    block ``i`` is layer ``i + 1``, everything after the blocks (norm, head) layer ``L + 1``."""
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decay = not (p.ndim <= 1 or name in no_decay_names or name.split(".")[-1] in no_decay_names)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _layer_id(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token", "dist_token")):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


# ---- targets ---------------------------------------------------------------------------------------


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """[N] -> [N, C] one-hot with label smoothing (``smoothing / C`` off, ``1 - smoothing + smoothing / C`` on)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


# ---- the method ------------------------------------------------------------------------------------


class FinetuneMethod(Method):
    """Fine-tuning for :func:`jobs.engine.train` (``setup`` reads the manifest and, for a label
    fraction, the train labels; ``build_model`` the init export or timm's random init)."""

    Config = FinetuneConfig
    cfg: FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, rank: int = 0) -> None:
        super().__init__(cfg, rank)
        self.init_url: str | None = None
        self.export_cfg: dict[str, Any] = {}
        self.num_classes = cfg.num_classes or 0
        self.train_ids: np.ndarray | None = None  # None: every train sample
        self.labeled_samples = 0
        self.label_names: list[str] | None = None  # the manifest's classes, for the export's label_names

    def setup(self, ctx: StageContext) -> None:
        self.storage_options = ctx.storage_options
        self.init_url = ctx.refs.get("init") or (self.cfg.init if isinstance(self.cfg.init, str) else None)
        manifest = load_manifest(ctx.data_url, ctx.storage_options)[0]
        if not self.cfg.num_classes:
            if not manifest.classes:
                raise ValueError(f"stage {self.cfg.name!r}: the manifest at {ctx.data_url} has no classes; "
                                 "fine-tuning needs labeled shards (or give num_classes)")
            self.num_classes = len(manifest.classes)
        self.label_names = manifest.classes if manifest.classes and len(manifest.classes) == self.num_classes else None
        self._choose_labels(ctx, manifest.split("train").samples)

    def _choose_labels(self, ctx: StageContext, train_samples: int) -> None:
        """Every train sample, or (``label_fraction`` < 1) a stratified seeded subset: the same on every rank."""
        cfg = self.cfg
        if cfg.label_fraction >= 1.0:
            self.train_ids, self.labeled_samples = None, train_samples
            return
        labels = split_labels(ctx.data_url, "train", ctx.storage_options)
        unlabeled = int((labels < 0).sum())
        if unlabeled:
            raise ValueError(f"stage {cfg.name!r}: {unlabeled} of {len(labels)} train samples at {ctx.data_url} have "
                             "no (readable) label; label_fraction draws from a fully labeled train split")
        self.train_ids = label_subset(labels, cfg.label_fraction, cfg.seed).numpy()
        self.labeled_samples = len(self.train_ids)
        log.info("stage %s: training on %d of %d train labels (label_fraction %g, stratified, seed %d)", cfg.name,
                 self.labeled_samples, len(labels), cfg.label_fraction, cfg.seed)

    def train_sample_ids(self) -> np.ndarray | None:
        """The train sample ids the engine's loader serves (None: all of them)."""
        return self.train_ids

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        if cfg.mode == "linear":
            return LinearProbe(self._backbone(num_classes=0), self.num_classes)
        model = self._backbone(num_classes=self.num_classes, drop_path_rate=cfg.drop_path_rate)
        if self.peft is not None:
            model = apply_peft(model, self.peft, trainable=(f"{self.classifier}.*",))
        return model

    @property
    def peft(self) -> PeftConfig | None:
        """``peft``, or for ``mode: lora`` without it, LoRA from the ``lora`` settings."""
        if self.cfg.peft is not None or self.cfg.mode != "lora":
            return self.cfg.peft
        lora = self.cfg.lora
        return PeftConfig(lora=LoraConfig(rank=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                          targets=lora.target_modules))

    def _backbone(self, **overrides: Any) -> nn.Module:
        """The init's model (its architecture, its weights: ``jobs/init.py``), or (no init) timm's random
        init of ``model`` (torch is seeded by the engine)."""
        import timm

        init = self.cfg.init if self.cfg.init is not None else self.init_url
        if init is not None:
            self.init_source = read_init(init, self.init_url, self.storage_options)
        if isinstance(init, WeightsFile):
            self.export_cfg = weights_file_config(init)
        elif init is not None:
            self.export_cfg = self.init_source.config
        else:
            m = self.cfg.model
            self.export_cfg = timm_export_config(m.arch, m.timm_kwargs(num_classes=0), m.img_size)
        model = timm.create_model(self.export_cfg["architecture"], pretrained=False,
                                  **{**self.export_cfg["model_args"], **overrides})
        if self.init_source is not None:
            load_init(model, self.init_source)
        return model

    @property
    def classifier(self) -> str:
        return self.export_cfg.get("pretrained_cfg", {}).get("classifier") or "head"

    @property
    def img_size(self) -> int:
        return int(self.export_cfg["pretrained_cfg"]["input_size"][-1])

    def train_transform(self) -> Callable:
        return mae_transform(self.img_size, scale=self.cfg.crop_scale)  # RandomResizedCrop + flip

    def eval_transform(self) -> Callable:
        return eval_transform(self.img_size)

    def train_mix(self) -> Mix | None:
        """Mixup / cutmix in ``mode: full`` (the loader mixes the images; :meth:`step` the targets)."""
        return self.cfg.mix(self.cfg.seed) if self.cfg.mode == "full" else None

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, labels = batch["image"], batch["label"]  # on the model's device (and dtype); already mixed
        targets = soft_targets(labels, self.num_classes, self.cfg.label_smoothing)  # [N, C]
        if "mix_lam" in batch:
            lams = torch.tensor(batch["mix_lam"], dtype=torch.float32, device=labels.device)  # [N]
            partner = soft_targets(batch["partner_label"], self.num_classes, self.cfg.label_smoothing)
            targets = mix_targets(targets, partner, lams)
        logits = model(imgs).float()  # [N, C]
        loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return loss, {"label_fraction": self.cfg.label_fraction, "labeled_samples": float(self.labeled_samples)}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Sums over this rank's real (non-padded) val samples."""
        imgs, labels = batch["image"], batch["label"]
        keep = ~batch["pad"].to(labels.device)
        logits = model(imgs).float()[keep]  # [n, C]
        labels = labels[keep]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [n, k]
        hits = top == labels.unsqueeze(1)
        return {"top1": float(hits[:, 0].sum()), "top5": float(hits.any(dim=1).sum()),
                "loss": float(F.cross_entropy(logits, labels, reduction="sum")), "count": float(keep.sum())}

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
        return layer_decay_groups(model, optim.weight_decay, self.cfg.layer_decay, self.no_weight_decay(model))

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def arch(self) -> dict[str, Any]:
        out = {"init": init_arch(self.cfg.init), "mode": self.cfg.mode, "num_classes": self.cfg.num_classes,
               "lora": self.cfg.lora.model_dump() if self.cfg.mode == "lora" else None}
        if self.cfg.peft is not None:
            out["peft"] = self.cfg.peft.model_dump()
        return out if self.cfg.model is None else {**out, "model": self.cfg.model.model_dump()}

    def export(self, model: nn.Module, dest_url: str, *, rank: int, storage_options: dict[str, Any],
               extra: dict[str, Any]) -> None:
        """The fine-tuned classifier as a plain timm model (every rank calls: ZeRO gathers)."""
        args = {**self.export_cfg["model_args"], "num_classes": self.num_classes}
        args.pop("drop_path_rate", None)
        convert = None
        if self.cfg.mode == "linear":
            convert = lambda state: fold_batchnorm_into_head(state, self.classifier, model.bn.eps)  # noqa: E731
        export_timm_model(model, self.export_cfg["architecture"], args, dest_url, img_size=self.img_size, rank=rank,
                          storage_options=storage_options, convert=convert, label_names=self.label_names,
                          extra={**extra, "mode": self.cfg.mode, "init": init_arch(self.cfg.init) or "random",
                                 "label_fraction": self.cfg.label_fraction, "labeled_samples": self.labeled_samples})

    def flops_per_sample(self) -> float:
        if not hasattr(self, "_flops"):
            import timm

            args = {**self.export_cfg["model_args"], "num_classes": self.num_classes}
            fwd = forward_flops(lambda: timm.create_model(self.export_cfg["architecture"], **args), self.img_size)
            self._flops = fwd * (1.0 if self.cfg.mode == "linear" else 3.0)  # linear: no encoder backward
        return self._flops


# ---- library entry -----------------------------------------------------------------------------------


def run_finetune(cfg: FinetuneConfig | dict[str, Any], *, data_url: str, stage_url: str, init_url: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``init_url``'s export (else ``cfg.init``, else ``cfg.model`` from random init) on
    ``data_url`` in this process (one rank, no gang), e.g. the low-label fine-tune of an evaluation.
    Writes checkpoints, ``metrics.jsonl`` and ``export/`` under ``stage_url`` (resuming from its
    checkpoints if any) and returns the last epoch's val metrics (``val_top1``, ``val_top5``,
    ``val_loss``, ``val_count``), ``step`` and ``labeled_samples``.

    Inside an existing process group every rank must call it; otherwise it makes a 1-process gloo group.
    """
    cfg = cfg if isinstance(cfg, FinetuneConfig) else FinetuneConfig.model_validate(cfg)
    import torch.distributed as dist

    if not dist.is_initialized():
        _single_process_env()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    ctx = StageContext(stage_url=stage_url, data_url=data_url, rank=rank, world_size=world,
                       storage_options=storage_options or {}, launcher="local",
                       refs={"init": init_url} if init_url else {})
    result: TrainResult = train(FinetuneMethod(cfg, rank=rank), cfg, ctx)
    records = [json.loads(line) for line in Store(stage_url, storage_options).get_bytes(METRICS_NAME).decode().splitlines()]
    evaluated = [r for r in records if "val_top1" in r]
    last = evaluated[-1] if evaluated else {}
    labeled = records[-1].get("labeled_samples") if records else None
    return {"state": result.state, "step": result.step, "labeled_samples": labeled,
            **{k: v for k, v in last.items() if k.startswith("val_")}}


def _single_process_env() -> None:
    """The environment a 1-process torch.distributed group needs (what torchrun would set)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
* ``prompt`` shallow visual prompt tuning (VPT): ``prompt.tokens`` learnable tokens after the class
             token (timm's registers, no position embedding), plus the head, on a frozen backbone;
             the export is a plain timm ViT with ``reg_tokens`` (``jobs/peft.py``).
* ``adapter`` AdaptFormer: a parallel bottleneck MLP (``adapter.bottleneck``, ``scale``, ``dropout``)
             on every block, plus the head, on a frozen backbone; the up-projection starts at zero,
             so step 0 computes the backbone. The export is the ``adaptformer_vit`` architecture
             (``jobs/adaptformer.py``, registered with timm by ``import jobs.models``).

In every mode the classifier reads the model's own pooling (timm's ``global_pool``: an export of any
method here is ``token``, the CLS token), or ``global_pool: avg`` the mean patch token after the final
norm (MAE's fine-tuning, whose loss trains the patch tokens and hardly the CLS token; ``kind: eval``'s
``pool: avg``); the export records it in ``model_args`` (``global_pool``, ``fc_norm``).

``prompt`` and ``adapter`` freeze through ``peft`` (``jobs/peft.py``): a ``peft`` given with them adds its
tensors (e.g. ``unfreeze: [norm.*]``) to the prompts or adapters. Frozen tensors get no gradient and
no optimizer state; the first metrics record and the export's ``config.json`` carry
``trainable_params`` / ``total_params``.

Without ``init``, ``model`` names the timm architecture (any timm model, as a distillation
student) and its weights are timm's own random initialisation under the stage's ``seed`` (the
engine seeds torch before building), identical on every rank and attempt.

``label_fraction`` < 1 trains on a stratified, seeded subset of the train split's labels
(:func:`dataprep.labels.label_subset`: per class ``max(1, round(n_c * f))``, the subset a
``kind: eval`` stage with the same fraction and seed uses). The loader serves only those samples
(``StreamingLoader(subset=)``), so the order, the epochs and exact resume are as without it.
``label_fraction`` and ``labeled_samples`` are in every step record of the stage's metrics and in
the export's ``config.json``.

Every export is a timm classifier (backbone + head, ``num_classes`` from the manifest), loadable
with ``timm.create_model("local-dir:<export>", pretrained=True)`` (an ``adapter`` export after
``import jobs.models``). Top-1/top-5 on the
manifest's val split are logged at every epoch end (``val_top1``, ``val_top5``, ``val_loss``).

Mixup/cutmix (``mode: full``) is the loader's batch transform (:mod:`dataprep.mixing`): partner and
lambda are functions of (seed, epoch, sample id), so a resumed run, on any number of workers, mixes
exactly as an uninterrupted one; the step mixes the smoothed one-hot targets with the same lambdas.

Library entry (e.g. a low-label fine-tune inside an evaluation): :func:`run_finetune`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.storage import Store
from dataprep.labels import label_subset, split_labels
from dataprep.manifest import load_manifest
from dataprep.mixing import Mix, MixFields, mix_targets
from dataprep.transforms import eval_transform, mae_transform
from jobs._channels import ChannelPlan, export_channels, is_channelvit, model_channel_plan
from jobs.config.finetune import RECIPES, FinetuneConfig, LoraSettings  # noqa: F401  (re-exported)
from jobs.engine import OptimConfig, StageContext, TrainResult, train
from jobs.export import export_timm_model, read_export_config, timm_export_config
from jobs.init import WeightsFile, init_arch, load_init, read_init, weights_file_config
from jobs.metrics import read_metrics
from jobs.method import Method
from jobs.adaptformer import ARCH as ADAPTER_ARCH
from jobs.adaptformer import adapter_model_args
from jobs.models import fit_data_channels, forward_flops, pool_features, takes_kwarg, timm_model_kwargs
from jobs.peft import (ADAPTER_TENSORS, LORA_TARGETS, PROMPT_TENSORS, AdapterConfig, LoraConfig,  # noqa: F401
                       PeftConfig, PromptConfig, add_prompt_rows, apply_peft, init_prompts, merge_lora_state,
                       with_trainable)

log = logging.getLogger(__name__)

# the tensors a mode adds to a frozen backbone, and trains (with the head)
MODE_TENSORS: dict[str, tuple[str, ...]] = {"prompt": PROMPT_TENSORS, "adapter": ADAPTER_TENSORS}


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
        with torch.no_grad():  # the encoder's own pre-logits pooling, what its timm classifier head sees
            return pool_features(self.encoder, self.encoder.forward_features(imgs), None)  # [N, D]

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
        self.data_channels = manifest.channels
        self.export_cfg = self._source_config(ctx.data_url)
        self.plan = self._channel_plan()

    def _source_config(self, data_url: str) -> dict[str, Any]:
        """The export-style config of the model to fine-tune: the init's, or (no init) ``model``'s with
        ``in_chans`` from the data (or from ``channels``)."""
        init = self.cfg.init if self.cfg.init is not None else self.init_url
        if isinstance(init, WeightsFile):
            return weights_file_config(init)
        if init is not None:
            return read_export_config(self.init_url or init, self.storage_options)
        m = self.cfg.model
        selected = self.cfg.channels if not is_channelvit(m.arch) else None
        m = fit_data_channels(m, self.data_channels, f"stage {self.cfg.name!r}", f"the data at {data_url}", selected)
        return timm_export_config(m.arch, timm_model_kwargs(m, num_classes=0), m.img_size)

    def _channel_plan(self) -> ChannelPlan:
        """Which data channels the model reads (``channels``), checked against what the model takes."""
        return model_channel_plan(f"stage {self.cfg.name!r}", self.cfg.channels, self.export_cfg, self.data_channels)

    @property
    def in_chans(self) -> int:
        return int(self.export_cfg["pretrained_cfg"]["input_size"][0])

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
            model = LinearProbe(self._backbone(num_classes=0), self.num_classes)
        else:
            model = self._backbone(num_classes=self.num_classes, drop_path_rate=cfg.drop_path_rate)
        self.plan.bind(model)  # a ChannelViT on a subset: which of its channels the input holds
        if self.peft is not None and cfg.mode != "linear":
            model = apply_peft(model, self.peft, trainable=(f"{self.classifier}.*",))
        return model

    @property
    def peft(self) -> PeftConfig | None:
        """``peft``, or for ``mode: lora`` without it, LoRA from the ``lora`` settings; ``prompt`` and
        ``adapter`` add their tensors (:data:`MODE_TENSORS`) to it."""
        if self.cfg.mode in MODE_TENSORS:
            return with_trainable(self.cfg.peft, MODE_TENSORS[self.cfg.mode])
        if self.cfg.peft is not None or self.cfg.mode != "lora":
            return self.cfg.peft
        lora = self.cfg.lora
        return PeftConfig(lora=LoraConfig(rank=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                          targets=lora.target_modules))

    def _backbone(self, **overrides: Any) -> nn.Module:
        """The init's model (its architecture, its weights: ``jobs/init.py``), or (no init) timm's random
        init of ``model`` (torch is seeded by the engine); with the prompts or adapters of the mode."""
        import timm

        self._read_source()
        arch, args = self.model_arch()
        model = timm.create_model(arch, pretrained=False, **{**args, **overrides})
        if self.cfg.mode == "prompt":
            init_prompts(model)
        if self.init_source is not None:
            source = self.init_source
            if self.cfg.mode == "prompt":
                source = replace(source, state=add_prompt_rows(source.state, model))
            load_init(model, source, fresh=MODE_TENSORS.get(self.cfg.mode, ()))
        return model

    def _read_source(self) -> None:
        """``init_source``: the init's weights, if any (``export_cfg``, the config of the model it holds, is
        :meth:`_source_config`'s)."""
        init = self.cfg.init if self.cfg.init is not None else self.init_url
        if init is not None:
            self.init_source = read_init(init, self.init_url, self.storage_options, sha256=self.cfg.init_sha256)

    def model_arch(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture and constructor arguments the stage trains and exports: the source's,
        with ``reg_tokens`` prompts (``prompt``) or as ``adaptformer_vit`` (``adapter``)."""
        arch, args = self.export_cfg["architecture"], dict(self.export_cfg["model_args"])
        args = self._with_global_pool(arch, args)
        if self.cfg.mode == "prompt":
            if args.get("reg_tokens"):
                raise ValueError(f"stage {self.cfg.name!r}: mode prompt on a backbone that already has "
                                 f"{args['reg_tokens']} register tokens; the prompts are the model's registers: "
                                 "start from a backbone without registers, or use mode lora / adapter")
            return arch, {**args, "reg_tokens": self.cfg.prompt.tokens}
        if self.cfg.mode == "adapter":
            a = self.cfg.adapter
            return ADAPTER_ARCH, adapter_model_args(arch, args, a.bottleneck, a.scale, a.dropout)
        return arch, args

    def _with_global_pool(self, arch: str, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` with the stage's ``global_pool`` (unset: the source's own). The final norm stays where the
        source has it (timm's ``fc_norm``: after pooling, else on every token before it), so every trained
        tensor loads: ``avg`` on a CLS-token encoder is the mean of its normed patch tokens."""
        pool = self.cfg.global_pool
        if pool is None:
            return args
        if not takes_kwarg(arch, "fc_norm"):
            raise ValueError(f"stage {self.cfg.name!r}: global_pool {pool!r} applies to ViTs (timm's token / avg "
                             f"pooling); {arch} has none: drop global_pool")
        source_pool = args.get("global_pool", "token")
        fc_norm = args.get("fc_norm")
        fc_norm = source_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        return {**args, "global_pool": pool, "fc_norm": bool(fc_norm)}

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
        imgs, labels = self.plan.select(batch["image"]), batch["label"]  # on the model's device (and dtype); already mixed
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
        imgs, labels = self.plan.select(batch["image"]), batch["label"]
        keep = ~batch["pad"].to(labels.device)
        logits = model(imgs).float()[keep]  # [n, C]
        labels = labels[keep]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [n, k]
        hits = top == labels.unsqueeze(1)
        return {"top1": float(hits[:, 0].sum()), "top5": float(hits.any(dim=1).sum()),
                "loss": float(F.cross_entropy(logits, labels, reduction="sum")), "count": float(keep.sum())}

    def layer_decay(self) -> float:
        """The engine's layer-decay groups in every mode (the recipe's ``layer_decay``; 1.0: all scales 1)."""
        return self.cfg.layer_decay

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def arch(self) -> dict[str, Any]:
        out = {"init": init_arch(self.cfg.init), "mode": self.cfg.mode, "num_classes": self.cfg.num_classes,
               "lora": self.cfg.lora.model_dump() if self.cfg.mode == "lora" else None}
        if self.cfg.mode in MODE_TENSORS:
            out[self.cfg.mode] = getattr(self.cfg, self.cfg.mode).model_dump()
        if self.cfg.peft is not None:
            out["peft"] = self.cfg.peft.model_dump()
        if self.cfg.global_pool is not None:
            out["global_pool"] = self.cfg.global_pool
        return out if self.cfg.model is None else {**out, "model": self.cfg.model.model_dump()}

    def export(self, model: nn.Module, dest_url: str, *, rank: int, storage_options: dict[str, Any],
               extra: dict[str, Any]) -> None:
        """The fine-tuned classifier as a timm model (every rank calls: ZeRO gathers)."""
        arch, args = self.model_arch()
        args = {**args, "num_classes": self.num_classes}
        args.pop("drop_path_rate", None)
        convert = None
        if self.cfg.mode == "linear":
            convert = lambda state: fold_batchnorm_into_head(state, self.classifier, model.bn.eps)  # noqa: E731
        export_timm_model(model, arch, args, dest_url, img_size=self.img_size, rank=rank,
                          storage_options=storage_options, convert=convert, label_names=self.label_names,
                          channels=export_channels(self.data_channels, self.in_chans, self.plan),
                          extra={**extra, "mode": self.cfg.mode, "init": init_arch(self.cfg.init) or "random",
                                 "label_fraction": self.cfg.label_fraction, "labeled_samples": self.labeled_samples})

    def flops_per_sample(self) -> float:
        if not hasattr(self, "_flops"):
            import timm

            arch, args = self.model_arch()
            args = {**args, "num_classes": self.num_classes}
            fwd = forward_flops(lambda: timm.create_model(arch, **args), self.img_size)
            self._flops = fwd * (1.0 if self.cfg.mode == "linear" else 3.0)  # linear: no encoder backward
        return self._flops


# ---- library entry -----------------------------------------------------------------------------------


def run_finetune(cfg: FinetuneConfig | dict[str, Any], *, data_url: str, stage_url: str, init_url: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune ``init_url``'s export (else ``cfg.init``, else ``cfg.model`` from random init) on
    ``data_url`` in this process (one rank, no gang), e.g. the low-label fine-tune of an evaluation.
    Writes checkpoints, metrics chunks and ``export/`` under ``stage_url`` (resuming from its
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
    records = read_metrics(Store(stage_url, storage_options))
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

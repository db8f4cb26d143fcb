"""``distill`` with ``targets: cached``: setup, loss weights and the step, reading a teacher_outputs cache."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from jobs._cache_reader import CacheReader, kl_soft, soft_targets
from jobs._distill_parts import feature_distance
from jobs.engine import StageContext
from jobs.config.teacher_outputs import cache_expectations  # noqa: F401  (re-exported)
from jobs.teacher_cache import data_digest


def setup_cached(method: Any, ctx: StageContext) -> None:
    """Open the cache (``ctx.refs["cache"]``) and refuse it when it does not fit this stage."""
    cfg = method.cfg
    url = ctx.refs.get("cache") or cfg.cache
    method.cache = CacheReader(url, ctx.storage_options)
    method.cache.check(cache_expectations(cfg, data_digest(ctx.data_url, ctx.storage_options)),
                       where=f"stage {cfg.name!r} > cache")
    method.teacher, method.teacher_classes = None, method.cache.num_classes
    method.weights = method._loss_weights()


def cached_loss_weights(method: Any) -> dict[str, float]:
    """Logits KL by default (weight 1); the CLS feature loss needs a cache with features."""
    loss, manifest = method.cfg.loss, method.cache.manifest
    weights = {"logits": 1.0 if loss.logits_weight is None else loss.logits_weight,
               "cls": loss.cls_weight or 0.0, "patch": 0.0}
    if weights["cls"] and not manifest.get("features"):
        raise ValueError(f"stage {method.cfg.name!r}: loss.cls_weight needs a cache with features: true")
    if not any(weights.values()):
        raise ValueError(f"stage {method.cfg.name!r}: every distillation loss weight is 0")
    return weights


def cached_targets(method: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The cache's entries of this batch's (epoch, sample ids): soft targets [N, C], feature [N, D]."""
    if "epoch" not in batch:
        raise RuntimeError("targets: cached needs the loader's batch['epoch'] (dataprep.loader.StreamingLoader)")
    got = method.cache.lookup(int(batch["epoch"]), batch["index"])
    device = batch["index"].device
    out = {"probs": soft_targets(got["logprobs"], got.get("indices"), method.cache.num_classes).to(device)}
    if "feature" in got:
        out["cls"] = got["feature"].to(device)
    return out


def cached_step(method: Any, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's loss against cached targets (no teacher forward)."""
    target = cached_targets(method, batch)
    w, parts = method.weights, {}
    out = model(batch["image"], (1, 1) if w["cls"] else None)
    if w["logits"]:
        parts["logits"] = kl_soft(out["logits"].float(), target["probs"], method.cfg.loss.temperature)
    if w["cls"]:
        parts["cls"] = feature_distance(out["cls"].float(), target["cls"], method.cfg.loss.feature_loss)
    loss = sum(w[k] * v for k, v in parts.items())
    return loss, {f"loss_{k}": float(v.detach()) for k, v in parts.items()}

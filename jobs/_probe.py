"""The frozen-feature probes' shared pieces: :class:`Features` of a split and :func:`fit_linear`, the
linear classifier on standardised features that ``eval``'s linear probe and its dense (patch-token)
probe both train."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jobs.config.evaluate import ProbeConfig


@dataclass
class Features:
    """Pooled features ``[N, D]`` (not normalised) and labels ``[N]`` of one split."""

    x: torch.Tensor
    y: torch.Tensor



def fit_logistic_lbfgs(train: Features, num_classes: int, C: float = 1.0, max_iter: int = 300,
                       device: torch.device | None = None) -> "LogisticProbe":
    """Multinomial logistic regression on standardised ``train`` features, full batch, by L-BFGS: scikit-learn's
    ``LogisticRegression(C=C)`` objective (``C * sum(cross-entropy) + ||W||^2 / 2``, the bias unpenalised),
    here divided by the sample count. Deterministic (zero start, no sampling)."""
    device = device or torch.device("cpu")
    mean, std = train.x.mean(dim=0), train.x.std(dim=0, unbiased=False) + 1e-6
    x = ((train.x - mean) / std).to(device)
    y = train.y.to(device)
    head = torch.nn.Linear(x.shape[1], num_classes).to(device=device, dtype=x.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    l2 = 1.0 / (2.0 * C * len(x))
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticProbe(head, mean, std, device)


@dataclass
class LogisticProbe:
    """A fitted linear classifier on standardised features: ``probe(q)``: classes ``[Q]``; ``probe.proba(q)``:
    ``[Q, K]``."""

    head: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device

    @torch.no_grad()
    def proba(self, q: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.head(((q - self.mean) / self.std).to(self.device)), dim=1).cpu()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.proba(q).argmax(dim=1)


def fit_linear(train: Features, num_classes: int, cfg: ProbeConfig, seed: int,
               device: torch.device | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer trained on standardised ``train`` features; returns ``[Q, D] -> [Q]`` class predictions."""
    device = device or torch.device("cpu")
    mean, std = train.x.mean(dim=0), train.x.std(dim=0, unbiased=False) + 1e-6  # BatchNorm without affine
    x = ((train.x - mean) / std).to(device)
    y = train.y.to(device)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=gen).to(device)
        idx = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(q: torch.Tensor) -> torch.Tensor:
        return head(((q - mean) / std).to(device)).argmax(dim=1).cpu()

    return predict

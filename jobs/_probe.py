"""The frozen-feature probes' shared pieces: :class:`Features` of a split and the :class:`LinearProbe` on
standardised features that ``eval``'s linear probe (:func:`fit_linear`, AdamW) and its dense (patch-token)
probe (:func:`fit_logistic_lbfgs` by default, or :func:`fit_linear`) train."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jobs.config.evaluate import ProbeConfig


@dataclass
class Features:
    """Pooled features ``[N, D]`` (not normalised) and labels ``[N]`` of one split."""

    x: torch.Tensor
    y: torch.Tensor



@dataclass
class LinearProbe:
    """A linear classifier on standardised features (``(x - mean) / std``, BatchNorm without affine):
    ``probe(q)``: classes ``[Q]``; ``probe.proba(q)``: ``[Q, K]``."""

    head: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device

    @classmethod
    def untrained(cls, train: Features, num_classes: int,
                  device: torch.device | None) -> tuple["LinearProbe", torch.Tensor]:
        """A probe whose standardisation is ``train``'s, and ``train.x`` standardised on ``device``."""
        device = device or torch.device("cpu")
        mean, std = train.x.mean(dim=0), train.x.std(dim=0, unbiased=False) + 1e-6
        x = ((train.x - mean) / std).to(device)
        head = torch.nn.Linear(x.shape[1], num_classes).to(device=device, dtype=x.dtype)
        return cls(head, mean, std, device), x

    @torch.no_grad()
    def logits(self, q: torch.Tensor) -> torch.Tensor:
        return self.head(((q - self.mean) / self.std).to(self.device)).cpu()

    def proba(self, q: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(q), dim=1)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.logits(q).argmax(dim=1)


def fit_logistic_lbfgs(train: Features, num_classes: int, C: float = 1.0, max_iter: int = 300,
                       device: torch.device | None = None) -> LinearProbe:
    """Multinomial logistic regression on standardised ``train`` features, full batch, by L-BFGS: scikit-learn's
    ``LogisticRegression(C=C)`` objective (``C * sum(cross-entropy) + ||W||^2 / 2``, the bias unpenalised),
    here divided by the sample count. Deterministic (zero start, no sampling)."""
    probe, x = LinearProbe.untrained(train, num_classes, device)
    head, y = probe.head, train.y.to(probe.device)
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
    return probe


def fit_linear(train: Features, num_classes: int, cfg: ProbeConfig, seed: int,
               device: torch.device | None = None) -> LinearProbe:
    """A linear layer trained on standardised ``train`` features by minibatch AdamW (cosine, seeded)."""
    probe, x = LinearProbe.untrained(train, num_classes, device)
    head, y = probe.head, train.y.to(probe.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=gen).to(probe.device)
        idx = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe

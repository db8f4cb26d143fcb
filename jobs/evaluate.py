"""``kind: eval``: weighted kNN and linear-probe accuracy of frozen encoders, for any list of exports.

    - {name: report, kind: eval, data: data, models: [pretrain, student, s3://bucket/other/export]}

For every model (an earlier stage's ``export/`` or any export URL, loaded with timm), in named steps:

1. ``extract_features``: the train and val splits read through :class:`~dataprep.loader.StreamingLoader`
   with the eval transform (resize, center crop, the export's mean/std), no shuffling, padding
   dropped; pooled (``pool``: the CLS token, or the mean of the patch tokens; CNNs: global average).
2. ``knn_accuracy``: DINO's weighted kNN on L2-normalised features: the ``k`` (20) most similar
   train features vote for their class with weight ``exp(cos / T)`` (T = 0.07); top-1 on val.
3. ``linear_probe``: a linear layer on frozen features, standardised with the train statistics
   (MAE's BatchNorm without affine), AdamW with a cosine schedule, seeded; top-1 on val.

``label_fraction`` < 1 keeps a stratified, seeded subset of the train labels for both (a
low-label evaluation; ``dataprep/labels.py``, the same subset a ``kind: finetune`` stage with the
same ``label_fraction`` and ``seed`` trains on). For a model that is an MAE stage of the run,
``reconstruction`` adds its val reconstruction loss next to trivial baselines
(the method's ``reconstruction_report`` hook: ``jobs/_eval_recon.py``). ``dense:`` adds, per model, a
linear probe of the frozen patch tokens on the prep's segmentation masks (patch mIoU) and the count
of high-norm patch tokens (``jobs/_eval_dense.py``). Results go to
``<run>/stages/<name>/eval.json`` and a table in the log.

Where it runs: one process, one Ray task (:func:`run_eval`), not a gang. Evaluation needs no
gradients through the encoder and the kNN needs every train feature in one place, so a gang
would only add an all-gather; a single task with a gang worker's resources lands on a GPU
node when the cluster has one (the driver of ``ray job submit`` often has none) and keeps
model weights and features out of the driver.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cluster.storage import Store
from dataprep.labels import label_subset
from dataprep.loader import StreamingLoader
from dataprep.transforms import eval_transform
from jobs._channels import ChannelPlan, data_channels, model_channel_plan
from jobs._eval_dense import dense_report
from jobs._probe import Features, fit_linear  # noqa: F401  (re-exported)
from jobs.config.evaluate import DenseConfig, EvalConfig, ProbeConfig  # noqa: F401  (re-exported)
from jobs.checkpoint import code_version
from jobs.layout import EVAL_JSON_NAME, StageStatus
from jobs.methods import import_methods, method_class
from jobs.models import pool_features

log = logging.getLogger(__name__)

EVAL_JSON = EVAL_JSON_NAME


# ---- 1. features ------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: StreamingLoader, pool: str, device: torch.device,
                     plan: ChannelPlan | None = None) -> Features:
    """Every (unpadded) sample of ``loader``'s split, once, in stream order (``plan``: the channels read)."""
    model.eval()
    xs, ys = [], []
    for batch in loader:
        keep = ~batch["pad"]
        images = batch["image"][keep] if plan is None else plan.select(batch["image"][keep])
        images = images.to(device, non_blocking=True)
        xs.append(pool_features(model, model.forward_features(images), pool).float().cpu())
        ys.append(batch["label"][keep])
    return Features(torch.cat(xs), torch.cat(ys))


# ---- 2. weighted kNN ----------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted kNN: class scores ``[Q, C]`` for ``query`` ([Q, D]) against ``train_x`` ([N, D]).

    Features must be L2-normalised; each of the ``k`` most similar train samples adds
    ``exp(similarity / temperature)`` to its class.
    """
    k = min(k, train_x.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start:start + chunk] @ train_x.T  # [q, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [q, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, train_y[top_idx], weights))  # [q, C]
    return torch.cat(scores)


def knn_accuracy(train: Features, val: Features, num_classes: int, k: int, temperature: float) -> float:
    """Top-1 of the weighted kNN on L2-normalised features."""
    scores = knn_predict(F.normalize(train.x, dim=1), train.y, F.normalize(val.x, dim=1), num_classes, k, temperature)
    return float((scores.argmax(dim=1) == val.y).float().mean())


# ---- 3. linear probe ------------------------------------------------------------------------------------


def linear_probe(train: Features, val: Features, num_classes: int, cfg: ProbeConfig, seed: int,
                 device: torch.device | None = None) -> float:
    """Top-1 on val of a linear layer trained on standardised frozen train features."""
    predict = fit_linear(train, num_classes, cfg, seed, device)
    return float((predict(val.x) == val.y).float().mean())


# ---- one model, then the stage ----------------------------------------------------------------------------


@dataclass
class ModelResult:
    model: str
    url: str
    architecture: str
    feature_dim: int
    train_samples: int
    val_samples: int
    knn_top1: float
    linear_top1: float
    seconds: float
    pool: str = "token"
    dense: dict[str, Any] | None = None  # with ``dense:``: patch-probe mIoU and high-norm tokens
    withheld: list[str] | None = None  # with ``withhold:``: the channels it went without
    withheld_as: str | None = None  # ``absent`` (a ChannelViT reads the others) or ``zero`` (a plain model)
    # with ``withhold:``: kNN and probe built on train features of every channel, tested on val without the
    # withheld ones (a channel missing at test time); knn_top1 / linear_top1 above are fit without them too
    withheld_at_test: dict[str, float] | None = None


def evaluate_features(name: str, url: str, architecture: str, train: Features, val: Features, num_classes: int,
                      cfg: EvalConfig, seconds: float = 0.0, pool: str = "token") -> ModelResult:
    """kNN and linear probe of one model's features (``train`` cut to ``label_fraction`` here)."""
    start = time.perf_counter()
    scores, labelled = _scores(train, val, num_classes, cfg)
    return ModelResult(name, url, architecture, int(train.x.shape[1]), labelled, int(len(val.y)), scores["knn_top1"],
                       scores["linear_top1"], seconds + time.perf_counter() - start, pool)


def _scores(train: Features, val: Features, num_classes: int, cfg: EvalConfig) -> tuple[dict[str, float], int]:
    """kNN and linear-probe top-1 on ``val`` from ``train`` cut to ``label_fraction``; and how many labels that kept."""
    keep = label_subset(train.y, cfg.label_fraction, cfg.seed)
    train = Features(train.x[keep], train.y[keep])
    return ({"knn_top1": knn_accuracy(train, val, num_classes, cfg.knn_k, cfg.knn_temperature),
             "linear_top1": linear_probe(train, val, num_classes, cfg.probe, cfg.seed)}, int(len(train.y)))


def withheld_at_test(full_train: Features, held_val: Features, num_classes: int, cfg: EvalConfig) -> dict[str, float]:
    """kNN bank and linear probe from every channel's train features, scored on val features without the
    withheld channels: what a model trained with all channels keeps when some are missing at test time."""
    return _scores(full_train, held_val, num_classes, cfg)[0]


def _loader(cfg: EvalConfig, data_url: str, split: str, img_size: int, pretrained_cfg: dict[str, Any],
            storage_options: dict[str, Any] | None, masks: bool = False,
            crop_pct: float | None = None) -> StreamingLoader:
    crop = crop_pct if crop_pct is not None else float(pretrained_cfg.get("crop_pct", 0.875))
    transform = eval_transform(img_size, crop_fraction=crop,
                               mean=pretrained_cfg.get("mean", (0.485, 0.456, 0.406)),
                               std=pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    return StreamingLoader(data_url, split=split, batch_size=cfg.batch_size, seed=cfg.seed, transform=transform,
                           num_workers=cfg.loader_workers, partial="pad", shuffle=False,
                           storage_options=storage_options, masks=masks, persistent_workers=False)  # one pass


def evaluate_model(name: str, url: str, cfg: EvalConfig, data_url: str, num_classes: int,
                   storage_options: dict[str, Any] | None = None, device: torch.device | None = None) -> ModelResult:
    """Load the export at ``url`` and evaluate it on ``data_url``'s train/val splits."""
    from jobs.export import load_export, read_export_config

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    config = read_export_config(url, storage_options)
    model = load_export(url, storage_options, **({"img_size": cfg.img_size} if cfg.img_size else {})).to(device)
    pretrained = config.get("pretrained_cfg", {})
    size = cfg.img_size or int(pretrained.get("input_size", [3, 224, 224])[-1])
    pool = cfg.pool or (config.get("vitforge") or {}).get("pool") or "token"  # the stage's, else the method's
    where, info = f"eval {cfg.name!r}, model {name!r}", data_channels(data_url, storage_options)
    plan = model_channel_plan(where, cfg.channels, config, info, cfg.withhold)
    plan.bind(model)
    loaders = {split: _loader(cfg, data_url, split, size, pretrained, storage_options)
               for split in (cfg.train_split, cfg.val_split)}
    feats = {split: extract_features(model, loader, pool, device, plan) for split, loader in loaders.items()}
    for split, f in feats.items():
        if len(f.y) == 0 or int(f.y.min()) < 0:
            raise ValueError(f"eval {cfg.name!r}: the {split} split of {data_url} has unlabelled samples; "
                             "eval needs a labelled prep (an ImageFolder or a list with labels)")
    result = evaluate_features(name, url, config.get("architecture", "?"), feats[cfg.train_split],
                               feats[cfg.val_split], num_classes, cfg, time.perf_counter() - start, pool)
    if plan.withheld:
        every = model_channel_plan(where, cfg.channels, config, info)  # the same channels, none withheld
        every.bind(model)
        full_train = extract_features(model, loaders[cfg.train_split], pool, device, every)
        plan.bind(model)
        result.withheld, result.withheld_as = list(plan.withheld), plan.withheld_as
        result.withheld_at_test = withheld_at_test(full_train, feats[cfg.val_split], num_classes, cfg)
    if cfg.dense is not None:
        result.dense = _dense(model, cfg, data_url, size, pretrained, storage_options, device, plan)
    return result


def _dense(model: torch.nn.Module, cfg: EvalConfig, data_url: str, size: int, pretrained: dict[str, Any],
           storage_options: dict[str, Any] | None, device: torch.device, plan: ChannelPlan) -> dict[str, Any]:
    from dataprep.manifest import load_manifest

    masks = load_manifest(data_url, storage_options)[0].masks
    if masks is None:
        raise ValueError(f"eval {cfg.name!r}: dense: needs segmentation masks, and {data_url} has none; prep the "
                         "data with masks: (a folder of <name>.png, or a list's mask column), or remove dense:")
    loaders = {role: _loader(cfg, data_url, split, size, pretrained, storage_options, masks=True,
                             crop_pct=cfg.dense.crop_pct)
               for role, split in (("train", cfg.train_split), ("val", cfg.val_split))}
    return dense_report(model, cfg.dense, loaders, masks.classes, cfg.seed, device, plan)


def run_eval(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every model of an eval stage job; write ``eval.json`` and ``STATUS.json``.

    ``job``: ``{"stage": {...}, "stage_url", "data_url", "storage_options", "models": [{"name", "url"}]}``
    (built by ``pipeline.spec.RunSpec.eval_job``). Returns the ``eval.json`` contents.
    """
    from dataprep.manifest import load_manifest

    import_methods(job.get("methods") or ())
    cfg = EvalConfig.model_validate(job["stage"])
    opts = job.get("storage_options") or {}
    stage_url, data_url = job["stage_url"], job["data_url"]
    status = StageStatus(stage_url, opts)
    status.start(kind="eval", name=cfg.name, config_digest=cfg.digest(), code_version=code_version())
    manifest, _ = load_manifest(data_url, opts)
    if not manifest.classes:
        raise ValueError(f"eval {cfg.name!r}: {data_url} has no class labels; eval needs a labelled prep")
    results = [evaluate_model(m["name"], m["url"], cfg, data_url, len(manifest.classes), opts) for m in job["models"]]
    report = eval_report(cfg, data_url, manifest.classes, results)
    for m in job["models"]:
        recon = _reconstruction(cfg, m, data_url, opts)
        if recon is not None:
            report["models"][m["name"]]["reconstruction"] = recon
    Store(stage_url, opts).put_json(EVAL_JSON, report)
    log.info("eval %s on %s:\n%s", cfg.name, data_url, format_table(report))
    status.finish("done")
    return report


def _reconstruction(cfg: EvalConfig, model: dict[str, Any], data_url: str,
                    opts: dict[str, Any]) -> dict[str, Any] | None:
    """The reconstruction report of a model that is a stage of the run whose method measures one (MAE)."""
    if not cfg.reconstruction or not model.get("kind"):
        return None
    return method_class(model["kind"]).reconstruction_report(model["stage_url"], data_url, cfg.val_split, cfg.seed,
                                                             opts)


def eval_report(cfg: EvalConfig, data_url: str, classes: list[str], results: list[ModelResult]) -> dict[str, Any]:
    """The ``eval.json`` document: the settings, then one entry per model (in the spec's order)."""
    return {
        "stage": cfg.name, "data": data_url, "classes": len(classes), "pool": cfg.pool,
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature}, "probe": cfg.probe.model_dump(),
        "label_fraction": cfg.label_fraction, "seed": cfg.seed, "config_digest": cfg.digest(),
        **({"withhold": cfg.withhold} if cfg.withhold else {}),
        "models": {r.model: {k: v for k, v in asdict(r).items()
                             if k != "model" and not (k in ("dense", "withheld", "withheld_as", "withheld_at_test")
                                                               and v is None)}
                   for r in results},
    }


def format_table(report: dict[str, Any]) -> str:
    """``eval.json`` as a plain-text table (rich), one row per model."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval {report['stage']}: kNN (k={report['knn']['k']}, T={report['knn']['temperature']}) "
                        f"and linear probe, {report['label_fraction']:.0%} of train labels")
    dense = any(r.get("dense") for r in report["models"].values())  # ``dense:``: two patch-token columns
    withheld = bool(report.get("withhold"))  # ``withhold:``: how each model went without those channels
    for col in ("model", "architecture", "dim", "train", "val", "kNN top-1", "linear top-1", "MAE val loss (mean-patch)",
                *(("patch mIoU", "high-norm tokens") if dense else ()),
                *(("withheld", "missing at test: kNN / linear") if withheld else ())):
        table.add_column(col, justify="left" if col in ("model", "architecture") else "right", no_wrap=True)
    for name, r in report["models"].items():
        rec, d = r.get("reconstruction"), r.get("dense")
        extra = ((f"{100 * d['miou']:.1f}%", f"{d['high_norm']['count']} / {d['high_norm']['tokens']}") if d
                 else ("-", "-")) if dense else ()
        if withheld:
            at = r.get("withheld_at_test") or {}
            extra = (*extra, f"{', '.join(r.get('withheld') or ())} ({r.get('withheld_as') or '-'})",
                     f"{100 * at.get('knn_top1', 0):.1f}% / {100 * at.get('linear_top1', 0):.1f}%" if at else "-")
        table.add_row(name, r["architecture"], str(r["feature_dim"]), str(r["train_samples"]), str(r["val_samples"]),
                      f"{100 * r['knn_top1']:.1f}%", f"{100 * r['linear_top1']:.1f}%",
                      f"{rec['loss']:.4f} ({rec['baseline_mean_patch']:.4f})" if rec else "-", *extra)
    console = Console(width=400, record=True, file=_Discard())
    console.print(table)
    return console.export_text()


class _Discard:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass

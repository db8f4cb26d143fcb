"""``vitforge report RUN_ROOT [--out DIR]``: PNG plots and a small HTML page for a run.

Writes, from what the stages left in the store (``pipeline/runstore.py``)::

    loss.png          training loss per stage (raw, and an exponential moving average), val loss if any
    throughput.png    images/s per stage (all workers together), with its median
    eval.png          kNN and linear-probe top-1 per model, one panel per eval stage (when any ran)
    index.html        the status table, the plots and the eval tables; no external resources

The default destination is ``<run_root>/report/`` (uploaded through the Store, so ``s3://`` works);
``--out`` names any other folder or URL. Plots are drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import datetime
import html
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from cluster.storage import Store
from jobs.layout import REPORT_NAME
from pipeline.runstore import RunView, StageView
from pipeline.status import duration, key_metrics, progress

REPORT_DIR = REPORT_NAME


@dataclass
class Report:
    url: str                      # where index.html is
    files: list[str] = field(default_factory=list)


def write_report(run_root: str, out: str | None = None, storage_options: dict[str, Any] | None = None) -> Report:
    """Render the report of the run at ``run_root`` into ``out`` (default ``<run_root>/report``)."""
    view = RunView(run_root, storage_options)
    dest = Store(out, storage_options) if out else view.store.child(REPORT_DIR)
    with tempfile.TemporaryDirectory(prefix="vitforge-report-") as tmp:
        files = render(view, tmp)
        dest.put_dir(tmp, "")
    return Report(url=dest.url_of("index.html"), files=files)


def render(view: RunView, out_dir: str) -> list[str]:
    """Write the PNGs and ``index.html`` of ``view`` into the local ``out_dir``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    stages = view.stages()
    curves = {s.name: view.metrics(s.name) for s in stages if s.kind not in ("prep", "eval")}
    curves = {k: v for k, v in curves.items() if v}
    evals = view.eval_reports()
    files = []
    if curves:
        files.append(_plot_loss(curves, {s.name: s.kind for s in stages}, out_dir))
        files.append(_plot_throughput(curves, out_dir))
        files.append(_plot_optim(curves, out_dir))
    if evals:
        files.append(_plot_eval(evals, out_dir))
    page = _html(view, stages, evals, files)
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(page)
    return [*files, "index.html"]


# ---- plots ------------------------------------------------------------------------------------


def _grid(n: int, width: float = 5.0, height: float = 3.4):
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _ema(values: list[float], alpha: float) -> list[float]:
    """Bias-corrected EMA (as Adam's moments, TensorBoard's smoothing): from a zero start, divided by
    ``1 - alpha**t``, so early points are a mean of what came so far, not dragged toward the first one."""
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha ** t) if alpha > 0 else v)
    return out


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _plot_loss(curves: dict[str, list[dict[str, Any]]], kinds: dict[str, str | None], out_dir: str) -> str:
    fig, axes = _grid(len(curves))
    for ax, (name, records) in zip(axes, curves.items()):
        pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
        steps, loss = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        smooth = 0.0 if len(loss) < 10 else min(0.98, 1 - 5 / len(loss))
        ax.plot(steps, _ema(loss, smooth), color="tab:blue", linewidth=2, label="train loss (EMA)")
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:orange", label="val loss")
        ax.set_title(f"{name} ({kinds.get(name) or '?'})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir, "loss.png")


def _plot_optim(curves: dict[str, list[dict[str, Any]]], out_dir: str) -> str:
    """Learning rate (left axis) and global grad norm (right axis, log scale) per stage."""
    fig, axes = _grid(len(curves))
    for ax, (name, records) in zip(axes, curves.items()):
        lr = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
        ax.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:purple", linewidth=1.5, label="lr")
        ax.set_xlabel("step")
        ax.set_ylabel("lr")
        ax.grid(alpha=0.3)
        norms = [(r["step"], r["grad_norm"]) for r in records if r.get("grad_norm")]
        if norms:
            right = ax.twinx()
            right.plot([p[0] for p in norms], [p[1] for p in norms], color="tab:red", alpha=0.6, linewidth=1,
                       label="grad norm")
            right.set_yscale("log")
            right.set_ylabel("grad norm")
            right.legend(fontsize=8, loc="upper right")
        ax.set_title(f"{name}: lr and grad norm")
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, out_dir, "optim.png")


def _plot_throughput(curves: dict[str, list[dict[str, Any]]], out_dir: str) -> str:
    import statistics

    fig, axes = _grid(len(curves))
    for ax, (name, records) in zip(axes, curves.items()):
        pts = [(r["step"], r["images_per_s"]) for r in records if r.get("images_per_s")]
        if not pts:
            ax.set_title(f"{name}: no throughput recorded")
            continue
        rates = [p[1] for p in pts]
        median = statistics.median(rates)
        ax.plot([p[0] for p in pts], rates, color="tab:green", linewidth=1)
        ax.axhline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:,.1f} img/s")
        top = sorted(rates)[int(0.95 * (len(rates) - 1))] if len(rates) >= 20 else max(rates)
        ax.set_ylim(0, max(top, median) * 1.3)  # on long runs, rare outliers would flatten the rest
        ax.set_title(f"{name}: images/s (all workers)")
        ax.set_xlabel("step")
        ax.set_ylabel("images/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir, "throughput.png")


def _plot_eval(evals: dict[str, dict[str, Any]], out_dir: str) -> str:
    fig, axes = _grid(len(evals), width=6.5, height=1.8 + 0.6 * max(len(e.get("models", {})) for e in evals.values()))
    for ax, (stage, report) in zip(axes, evals.items()):
        models = list(report.get("models", {}).items())
        ys = range(len(models))
        for offset, key, label, color in ((-0.2, "knn_top1", "kNN", "tab:purple"), (0.2, "linear_top1", "linear", "tab:olive")):
            vals = [100 * (m.get(key) or 0.0) for _, m in models]
            bars = ax.barh([y + offset for y in ys], vals, height=0.38, color=color, label=f"{label} top-1")
            ax.bar_label(bars, fmt="%.1f%%", fontsize=8, padding=2)
        ax.set_yticks(list(ys), [name for name, _ in models])
        ax.invert_yaxis()
        ax.set_xlim(0, 112)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.set_title(f"eval stage {stage!r}: top-1 on the val split")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    return _save(fig, out_dir, "eval.png")


# ---- the page ---------------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.done{color:#185}.failed{color:#b00}"
        ".running{color:#06c}.preempted{color:#a60}.pending{color:#888}code{background:#f5f5f5}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _status_rows(stages: list[StageView]) -> list[list[str]]:
    e = html.escape
    return [[e(s.name), e(s.kind or "?"), f'<span class="{e(s.state)}">{e(s.state)}</span>', e(progress(s)),
             e(s.checkpoint or "-"), str(s.attempts or "-"), e(duration(s.duration_s)), e(key_metrics(s))]
            for s in stages]


def _eval_section(stage: str, report: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for name, m in report.get("models", {}).items():
        rec = m.get("reconstruction") or {}
        rows.append([e(name), e(str(m.get("architecture", "?"))), e(str(m.get("feature_dim", "?"))),
                     f"{100 * m['knn_top1']:.1f}%" if m.get("knn_top1") is not None else "-",
                     f"{100 * m['linear_top1']:.1f}%" if m.get("linear_top1") is not None else "-",
                     f"{rec['loss']:.4f}" if rec.get("loss") is not None else "-"])
    knn = report.get("knn", {})
    caption = (f"kNN (k={knn.get('k', '?')}, T={knn.get('temperature', '?')}) and a linear probe on frozen features, "
               f"{100 * float(report.get('label_fraction', 1.0)):.0f}% of the train labels")
    return (f"<h3>eval {e(stage)}</h3><p>{e(caption)}</p>"
            + _table(["model", "architecture", "dim", "kNN top-1", "linear top-1", "MAE val loss"], rows))


def _html(view: RunView, stages: list[StageView], evals: dict[str, dict[str, Any]], files: list[str]) -> str:
    e = html.escape
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vitforge run {e(view.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>run {e(view.name)}</h1><p>run root <code>{e(view.url)}</code> · generated {now}</p>",
             "<h2>stages</h2>",
             _table(["stage", "kind", "state", "progress", "checkpoint", "attempts", "duration", "metrics"],
                    _status_rows(stages))]
    titles = {"loss.png": "loss", "throughput.png": "throughput", "eval.png": "evaluation"}
    for name in files:
        parts.append(f"<h2>{titles.get(name, name)}</h2><a href='{e(name)}'><img src='{e(name)}' alt='{e(name)}'></a>")
    if not any(f in files for f in ("loss.png", "throughput.png")):
        parts.append("<p>No training metrics yet.</p>")
    for stage, report in evals.items():
        parts.append(_eval_section(stage, report))
    exports = [s for s in stages if s.export_url]
    if exports:
        parts.append("<h2>exports</h2><ul>" + "".join(
            f"<li>{e(s.name)}: <code>{e(s.export_url)}</code></li>" for s in exports) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

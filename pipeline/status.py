"""``vitforge status RUN_ROOT``: one row per stage: state, progress, checkpoint, attempts, metrics.

    stage     kind  state    progress   checkpoint      attempts  duration  metrics
    data      prep  done     4/4 shards -               1         0:41      130 images, 0 rejected
    pretrain  mae   running  37/120     step-00000032   2         3:12      loss 0.412, 410 img/s

Reads only the store (``pipeline/runstore.py``), so it works from any machine that can read the
run root, while a run is going on, on ``file://`` and ``s3://`` alike.
"""

from __future__ import annotations

from typing import Any

from pipeline.runstore import RunView, StageView

_STYLE = {"done": "green", "running": "cyan", "stale": "bold magenta", "preempted": "yellow", "failed": "bold red",
          "pending": "dim", "corrupt": "bold magenta"}


def run_status(run_root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's status as a JSON-able dict: ``{"run", "run_root", "stages": [...]}``."""
    view = RunView(run_root, storage_options)
    return {"run": view.name, "run_root": view.url, "stages": [s.as_dict() for s in view.stages()]}


def status_table(status: dict[str, Any]) -> Any:
    """A rich ``Table`` of :func:`run_status`'s result."""
    from rich.table import Table

    table = Table(title=f"run {status['run']}  ({status['run_root']})", title_justify="left")
    for col in ("stage", "kind", "state", "progress", "checkpoint", "attempts", "duration", "metrics"):
        table.add_column(col, justify="right" if col in ("attempts", "duration") else "left")
    for s in status["stages"]:
        st = StageView(**s)
        table.add_row(st.name, st.kind or "?", f"[{_STYLE.get(st.state, '')}]{state_text(st)}[/]", progress(st),
                      st.checkpoint or "-", str(st.attempts or "-"), duration(st.duration_s), key_metrics(st))
    return table


def state_text(st: StageView) -> str:
    """The state; ``stale`` with the heartbeat's age (e.g. ``stale (7m ago)``: its gang is gone)."""
    if st.state == "stale" and st.heartbeat_age_s is not None:
        return f"stale ({duration(st.heartbeat_age_s)} ago)"
    return st.state


def failures(status: dict[str, Any]) -> list[str]:
    """One line per failed stage: its name and the last line of its error."""
    lines = []
    for s in status["stages"]:
        if s["state"] in ("failed", "corrupt") and s.get("error"):
            last = [ln for ln in str(s["error"]).splitlines() if ln.strip()][-1:] or [""]
            lines.append(f"{s['name']}: {last[0][:300]}")
    return lines


def progress(st: StageView) -> str:
    if st.kind == "prep":
        if st.shards is None:
            return "-"
        return f"{st.shards}/{st.total_shards} shards" if st.total_shards is not None else f"{st.shards} shards"
    if st.kind == "eval":
        return f"{len(st.eval)} models" if st.eval else "-"
    if st.step is None:
        return "-"
    return f"{st.step}/{st.total_steps}" if st.total_steps else str(st.step)


def key_metrics(st: StageView) -> str:
    parts = []
    if st.kind == "prep" and st.samples is not None:
        parts.append(f"{st.samples} images, {st.rejected or 0} rejected")
    if st.last_loss is not None:
        parts.append(f"loss {st.last_loss:.4g}")
    if st.images_per_s:
        parts.append(f"{st.images_per_s:,.0f} img/s")
    if st.val_top1 is not None:
        parts.append(f"val top-1 {100 * st.val_top1:.1f}%")
    for model, tops in st.eval.items():
        accs = " / ".join(f"{k.split('_')[0]} {100 * v:.1f}%" for k, v in tops.items())
        parts.append(f"{model}: {accs}" if st.kind == "eval" else f"eval {accs}")
    return ", ".join(parts) or "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"

"""``vitforge demo``: the whole pipeline on scikit-learn's bundled digits, on this machine, in minutes.

What it does (``configs/demo.yaml`` holds the stages):

1. writes the 1,797 digit scans as an image folder under ``<repo>/.demo/digits`` (``dataprep/digits.py``);
2. starts an embedded S3 server (SeaweedFS) whose data lives in ``.demo/s3``, so a later demo finds its
   run, unless a storage URL is given (``--storage s3://bucket/prefix``, ``file:///…`` or a path;
   credentials from the environment, ``AWS_*``);
3. runs the spec: prep -> MAE (2 workers, ZeRO-2) -> distil -> fine-tune (from scratch: the pretrain
   architecture from random init; from MAE; from the student) / linear probe -> eval;
4. prints the accuracy table, where the exports and checkpoints are, and writes the report.

Running it again finds every stage done: it skips them all and shows the same table.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.spec import RunSpec

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "configs" / "demo.yaml"
DEMO_DIR = ROOT / ".demo"
DATA = "data"
DIGITS_SIZE = 16  # the scans are 8x8; 16x16 keeps 4x4 patches meaningful


@dataclass
class DemoResult:
    spec: RunSpec
    states: dict[str, str]
    skipped: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)     # the accuracy table
    report_url: str | None = None
    local_report: str | None = None
    status: dict[str, Any] | None = None                          # pipeline.status.run_status

    @property
    def preempted(self) -> bool:
        return "preempted" in self.states.values()


def run_demo(storage: str | None = None, overrides: Sequence[str] = (), restart_from: str | None = None,
             workdir: str | Path = DEMO_DIR, spec_path: str | Path = DEMO_SPEC,
             address: str | None = None) -> DemoResult:
    """Run the demo spec (with ``overrides``) on ``storage``, or on an embedded S3 server in ``workdir``."""
    from pipeline.run import run_spec

    workdir = Path(workdir).resolve()
    with _storage(storage, workdir) as storage_url:
        spec = prepare(storage_url, overrides, workdir, spec_path)
        result = run_spec(spec, address=address, restart_from=restart_from)
        demo = DemoResult(spec, result.states, result.skipped)
        if not result.preempted:
            from pipeline.status import run_status

            demo.rows = accuracy_rows(spec)
            demo.report_url, demo.local_report = _report(spec, workdir)
            demo.status = run_status(spec.run_root, spec.storage_options)
        return demo


def prepare(storage: str, overrides: Sequence[str], workdir: Path, spec_path: str | Path = DEMO_SPEC) -> RunSpec:
    """Write the digits, then load the demo spec with them (and ``overrides``)."""
    from dataprep.digits import write_digits_imagefolder
    from pipeline.spec import load_spec

    base = [f"storage={storage}"]
    digits = write_digits_imagefolder(str(workdir / f"digits-{DIGITS_SIZE}"), size=DIGITS_SIZE)
    base.append(f"stages.{DATA}.source={digits}")
    return load_spec(str(spec_path), overrides=[*base, *overrides])


def accuracy_rows(spec: RunSpec) -> list[dict[str, Any]]:
    """One row per fine-tune stage (val top-1 at its end) and per model of each eval stage (kNN, linear)."""
    from pipeline.runstore import RunView

    view = RunView(spec.run_root, spec.storage_options)
    rows = []
    for stage in spec.stages:
        if stage.kind == "finetune":
            st = view.stage(stage.name, evals={})
            init = stage.init or "random init"
            rows.append({"model": stage.name, "from": init, "how": f"{stage.mode} fine-tune" if stage.mode != "linear"
                         else "linear probe (frozen)", "top1": st.val_top1, "export": st.export_url})
        elif stage.kind == "eval":
            for model, tops in view.stage(stage.name).eval.items():
                for key, how in (("knn_top1", "kNN on frozen features"), ("linear_top1", "linear probe on features")):
                    if key in tops:
                        rows.append({"model": model, "from": f"eval {stage.name}", "how": how, "top1": tops[key],
                                     "export": None})
    return rows


def accuracy_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="digits, val top-1 (from scratch vs pretrained vs distilled)", title_justify="left")
    for col in ("model", "from", "how", "val top-1"):
        table.add_column(col, justify="right" if col == "val top-1" else "left")
    for r in rows:
        table.add_row(r["model"], r["from"], r["how"], "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%")
    return table


def locations(spec: RunSpec) -> list[str]:
    """Lines saying where each training stage's export and checkpoints are."""
    lines = [f"run root: {spec.run_root}"]
    for stage in spec.stages:
        if stage.kind in ("prep", "eval"):
            continue
        where = spec.layout.stage(stage.name)
        lines.append(f"  {stage.name:<10} export {where.export}  checkpoints {where.checkpoints}")
    return lines


# ---- internals ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _storage(storage: str | None, workdir: Path) -> Iterator[str]:
    """The storage URL: the given one, or an embedded S3 server (data in ``workdir/s3``) for the duration."""
    if storage:
        yield storage
        return
    from cluster.localstore import LocalS3

    server = LocalS3(str(workdir / "s3"))
    log.info("starting an embedded S3 server (SeaweedFS), data in %s", server.data_dir)
    os.makedirs(server.data_dir, exist_ok=True)
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # Ray (started later, embedded) and every Store inherit it
    try:
        yield f"s3://{server.bucket}/runs"
    finally:
        _shutdown_ray()
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _report(spec: RunSpec, workdir: Path) -> tuple[str | None, str | None]:
    """Write the report into the run root and, when that is remote, a copy under ``workdir/report``."""
    try:
        from pipeline.report import write_report
    except ImportError:  # the report module is optional for the demo
        return None, None
    url = write_report(spec.run_root, None, spec.storage_options).url
    local = None
    if "://" in spec.run_root and not spec.run_root.startswith("file://"):
        local = write_report(spec.run_root, str(workdir / "report" / spec.name), spec.storage_options).url
    return url, local

"""The ``vitforge`` command line. Each sub-command is a thin shell over a library call."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

def _console():
    """A rich console for tables: the terminal's width, or 200 columns in pipes and logs (not 80)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _flags_without_metavar() -> None:
    """typer's rich help prints ``<bool>`` beside on/off flags (``--json/--no-json <bool>``), as if they
    took a value; show flags as click does, bare."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag and self.metavar is None else shown(self, ctx)


_flags_without_metavar()

app = typer.Typer(
    name="vitforge",
    help="Distributed pretraining for Vision Transformers: prep shards, pretrain (MAE/DINO), distil, "
    "fine-tune and evaluate, with every stage checkpointed to object storage and exactly resumable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version as _v

        typer.echo(f"vitforge {_v('vitforge')}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the vitforge version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, os.environ.get("VITFORGE_LOG", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # "Found credentials in environment variables." on every new S3 client: not news
        logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)


@app.command()
def version() -> None:
    """Print the vitforge version."""
    from importlib.metadata import version as _v

    typer.echo(_v("vitforge"))


@app.command()
def prep(
    src: str = typer.Argument(..., help="Images: a folder (ImageFolder or flat), a CSV/JSONL list, Parquet or WebDataset tars."),
    dest: str = typer.Argument(..., help="Output folder or URL (s3://bucket/prefix, file://…)."),
    shard_size: int = typer.Option(None, help="Samples per shard (default 1000)."),
    shard_bytes: int = typer.Option(None, help="Input bytes per shard, instead of --shard-size."),
    resize: int = typer.Option(None, help="Shrink the shorter side to this many pixels (never enlarges)."),
    format: str = typer.Option("jpg", help="jpg, png, keep (the inputs' dominant format), or npy ([C, H, W] arrays "
                                           "at the source dtype: multi-channel, 16-bit, float)."),
    channels: str = typer.Option(None, help="Channel names in order, e.g. DNA,ER,RNA,AGP,Mito: the columns of a "
                                            "one-file-per-channel list."),
    to_rgb: bool = typer.Option(False, help="Under jpg/png, convert inputs that would lose channels or bit depth."),
    quality: int = typer.Option(90, help="JPEG quality."),
    masks: str = typer.Option(None, help="Segmentation masks: a folder of <input name>.png, or 'column' for a "
                                         "CSV/JSONL list's mask column."),
    val_fraction: float = typer.Option(0.0, help="Fraction of the samples for the val split."),
    seed: int = typer.Option(0, help="Seed of the split and shuffle."),
    workers: int = typer.Option(None, help="Shard tasks in flight (default: the cluster's CPUs)."),
    reject_threshold: float = typer.Option(0.05, help="Fail when a larger fraction of inputs is rejected."),
    min_side: int = typer.Option(8, help="Reject images with a side shorter than this (pixels)."),
    max_pixels: int = typer.Option(89_478_485, help="Reject larger images as decompression bombs (PIL's limit)."),
    max_side: int = typer.Option(4096, help="jpg/png without --resize: shrink a longer side above this to it "
                                 "(with a warning); 0 keeps every size."),
    source_kind: str = typer.Option("auto", help="auto, imagefolder, flat, csv, jsonl, parquet or wds."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
    overwrite: bool = typer.Option(False, help="Replace a prep with other options or another source at DEST."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
) -> None:
    """Turn images into WebDataset shards + manifest.json at DEST (idempotent, resumable)."""
    from pydantic import ValidationError

    from cluster.storage import StorageError
    from dataprep.prep import PrepError, PrepOptions, run_prep, summary_table
    from dataprep._sources import SourceError

    try:
        options = PrepOptions(
            shard_size=shard_size, shard_bytes=shard_bytes, resize=resize, format=format, quality=quality,
            val_fraction=val_fraction, seed=seed, workers=workers, reject_threshold=reject_threshold,
            min_side=min_side, max_pixels=max_pixels, max_side=max_side or None, source_kind=source_kind,
            overwrite=overwrite,
            channels=[c.strip() for c in channels.split(",") if c.strip()] if channels else None, to_rgb=to_rgb,
            masks=masks,
        )
        result = run_prep(src, dest, options, address=address, progress=progress)
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    except (SourceError, PrepError, StorageError) as exc:
        _fail(str(exc))
    _console().print(summary_table(result))
    if result.skipped:
        typer.echo(f"nothing to do: {result.manifest_url} already holds this prep")


@app.command()
def run(
    spec: str = typer.Argument(..., help="Run spec YAML (see configs/)."),
    set_: list[str] = typer.Option(None, "--set", metavar="PATH=VALUE",
                                   help="Override a spec value: a dotted path (stages addressed by name) and a "
                                   "YAML value, e.g. --set stages.pretrain.epochs=2 --set compute.workers=4. "
                                   "Repeatable."),
    restart_from: str = typer.Option(None, "--restart-from", metavar="STAGE",
                                     help="Clear STAGE and every stage downstream of it, then re-run them (needed "
                                     "when the spec of a started run changed)."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved spec and the plan (which stages "
                                 "run, skip or resume); write nothing."),
) -> None:
    """Run a spec's stages in order; finished stages are skipped, an interrupted one resumes.

    The spec is validated first (nothing is written to storage when it is invalid). Storage
    credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or a profile).

    Exit status: 0 done, 2 invalid spec or changed spec (see --restart-from), 75 preempted
    (SIGTERM/SIGINT; run again to continue), 1 failed.
    """
    loaded = _load_spec_or_exit(spec, set_ or ())
    if dry_run:
        _print_plan(loaded, restart_from)
        return
    _run_and_report(loaded, resume_command(spec, set_ or (), loaded.run_root), address, restart_from)


@app.command()
def validate(
    spec: str = typer.Argument(..., help="Run spec YAML (see configs/)."),
    set_: list[str] = typer.Option(None, "--set", metavar="PATH=VALUE", help="Override a spec value, as for run."),
    restart_from: str = typer.Option(None, "--restart-from", metavar="STAGE", help="Plan with this restart."),
    plan: bool = typer.Option(True, "--plan/--no-plan", help="Also read the run root and print the plan."),
) -> None:
    """Check a spec; print it resolved (defaults filled in, --set applied) and what `vitforge run` would do.

    Writes nothing. Exit status: 0 valid, 2 invalid or refused by the run root (changed spec,
    missing input), 1 the store cannot be read.
    """
    loaded = _load_spec_or_exit(spec, set_ or ())
    if plan:
        _print_plan(loaded, restart_from)
    else:
        from pipeline._modelcheck import check_models
        from pipeline.spec import dump_spec

        _run_or_exit(lambda: check_models(loaded))
        typer.echo(dump_spec(loaded), nl=False)


def _print_plan(loaded: Any, restart_from: str | None) -> None:
    """The resolved spec, then the plan of a run (reads the store only), once the models pass timm's checks."""
    from pipeline._dryrun import plan_lines
    from pipeline._modelcheck import check_models
    from pipeline.spec import dump_spec

    _run_or_exit(lambda: check_models(loaded))
    lines = _run_or_exit(lambda: plan_lines(loaded, restart_from))
    typer.echo(dump_spec(loaded) + "\n".join(lines))


@app.command()
def resume(
    run_root: str = typer.Argument(..., help="The run root: the spec's <storage>/<name> (s3://…, file://… or a path)."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
) -> None:
    """Continue a run from the spec stored in RUN_ROOT/run.yaml (the spec as first launched, --set included).

    Relative paths in that spec (a prep source such as ./images) are read from the current directory.
    Exit status as for `vitforge run`.
    """
    from pipeline._resume import stored_spec

    from pipeline.spec import SpecError

    try:
        loaded = _guard(stored_spec, run_root)
    except SpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)
    _run_and_report(loaded, f"vitforge resume {shlex.quote(run_root)}", address, None)


def resume_command(spec: str, sets: Sequence[str], run_root: str) -> str:
    """The command that continues this run: the same spec and ``--set`` arguments, shell-quoted."""
    return " ".join(["vitforge", "run", shlex.quote(spec), *(f"--set {shlex.quote(s)}" for s in sets)])


def _run_and_report(loaded: Any, again: str, address: str | None, restart_from: str | None) -> None:
    """Run a loaded spec; print each stage's state and, when it stopped early, the exact command to continue."""
    from jobs.engine import PREEMPTED_EXIT_CODE
    from pipeline._stop import StopAborted
    from pipeline.run import run_spec

    hint = f"`{again}` (or `vitforge resume {shlex.quote(loaded.run_root)}`)"
    try:
        result = _run_or_exit(lambda: run_spec(loaded, address=address, restart_from=restart_from))
    except StopAborted as exc:
        typer.echo(f"aborted: {exc}; run {hint} to continue from the last committed checkpoint", err=True)
        raise typer.Exit(code=130)
    for name, state in result.states.items():
        typer.echo(f"{name}: {state}{' (finished earlier, skipped)' if name in result.skipped else ''}")
    if result.preempted:
        typer.echo(f"preempted: run {hint} to continue from the last checkpoint", err=True)
        raise typer.Exit(code=PREEMPTED_EXIT_CODE)


@app.command()
def demo(
    storage: str = typer.Option(None, help="Run on this storage (s3://bucket/prefix, file:///…, a path) instead of "
                                "an embedded S3 server with its data in .demo/s3. Credentials: AWS_* env."),
    set_: list[str] = typer.Option(None, "--set", metavar="PATH=VALUE",
                                   help="Override a value of configs/demo.yaml, e.g. stages.pretrain.epochs=5."),
    restart_from: str = typer.Option(None, "--restart-from", metavar="STAGE",
                                     help="Clear STAGE and its downstream stages, then re-run them."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
    workdir: str = typer.Option(None, help="Folder for the digits, the embedded S3 data and the report "
                                "(default: .demo in the repository)."),
) -> None:
    """The whole pipeline on scikit-learn's handwritten digits, on this machine (CPU, a few minutes).

    prep -> MAE pretrain (2 workers, ZeRO-2) -> distil into a smaller ViT -> fine-tune (from scratch,
    from MAE, from the student) and a linear probe -> eval. Prints the accuracy table, where the
    checkpoints are and the report. Running it again skips every finished stage.
    """
    from pipeline.demo import DEMO_DIR, accuracy_table, locations, run_demo
    from pipeline.status import status_table

    result = _run_or_exit(lambda: run_demo(storage, set_ or (), restart_from, workdir=workdir or DEMO_DIR,
                                           address=address))
    console = _console()
    if result.skipped and len(result.skipped) == len(result.states):
        typer.echo("nothing to do: every stage of the demo finished earlier")
    if result.preempted:
        typer.echo("preempted: run `vitforge demo` again to continue", err=True)
        raise typer.Exit(code=75)
    console.print(accuracy_table(result.rows))
    for line in locations(result.spec):
        typer.echo(line)
    if result.report_url:
        typer.echo(f"report: {result.local_report or result.report_url}"
                   + (f"  (also {result.report_url})" if result.local_report else ""))
    if result.status is not None:
        console.print(status_table(result.status))


@app.command()
def status(
    run_root: str = typer.Argument(..., help="The run root: the spec's <storage>/<name> (s3://…, file://… or a "
                                   "path), or the spec file itself (with the same --set as its run)."),
    json_out: bool = typer.Option(False, "--json/--no-json", help="Print JSON instead of a table."),
    set_: list[str] = typer.Option(None, "--set", metavar="PATH=VALUE", help="With a spec file: its --set overrides."),
) -> None:
    """Show each stage's state, progress, latest checkpoint, attempts, duration and key metrics.

    Reads only the store: works from any machine, while the run goes on. A running training stage
    moves with rank 0's heartbeat (every VITFORGE_HEARTBEAT_S s, default 10); one whose heartbeat
    stopped is `stale` (with its age): its gang is gone, and `vitforge run` again continues it.
    """
    import json
    from pipeline.status import failures, run_status, status_table

    if _is_spec_file(run_root):
        run_root = _load_spec_or_exit(run_root, set_ or ()).run_root
    result = _guard(run_status, run_root)
    if json_out:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    _console().print(status_table(result))
    for line in failures(result):
        typer.echo(f"failed: {line}", err=True)


def _is_spec_file(arg: str) -> bool:
    return "://" not in arg and arg.endswith((".yaml", ".yml")) and os.path.isfile(arg)


@app.command()
def tensorboard(
    run_root: str = typer.Argument(..., help="The run root: the spec's <storage>/<name> (s3://…, file://… or a path)."),
    out: str = typer.Option(None, help="Local folder to mirror the event files to (default: a folder under the "
                            "temp directory named after the run)."),
) -> None:
    """Mirror every training stage's TensorBoard event files to a local folder; print the command to view them.

    A local run root needs no mirror: `tensorboard --logdir RUN_ROOT/stages`. Run it again to refresh.
    """
    import tempfile

    from jobs._trackers import mirror_events
    from pipeline.runstore import RunView

    view = _guard(RunView, run_root)
    dest = out or os.path.join(tempfile.gettempdir(), f"vitforge-tb-{view.name}")
    files = _guard(mirror_events, view.url, dest)
    if not files:
        _fail(f"no TensorBoard event files under {view.url}/stages/*/tensorboard (trackers: [] or no training "
              "stage started yet)")
    typer.echo(f"mirrored {len(files)} event file(s) to {dest}\n  view: tensorboard --logdir {shlex.quote(dest)}")


@app.command()
def report(
    run_root: str = typer.Argument(..., help="The run root: the spec's <storage>/<name>."),
    out: str = typer.Option(None, help="Output folder or URL (default: <run_root>/report)."),
) -> None:
    """Write PNG plots (loss, throughput, eval accuracy) and an index.html for a run."""
    from pipeline.report import write_report

    result = _guard(write_report, run_root, out)
    typer.echo(f"report: {result.url} ({', '.join(result.files)})")


@app.command()
def export(
    run_root: str = typer.Argument(..., help="The run root: the spec's <storage>/<name>."),
    stage: str = typer.Argument(..., help="A finished training stage."),
    dest: str = typer.Argument(None, help="Folder or URL to copy model.safetensors + config.json + README.md to "
                               "(optional with --push-to-hub)."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", metavar="REPO",
                                    help="Also upload the export to this Hugging Face Hub model repository "
                                    "(user/name; created when missing). Token: HF_TOKEN or `huggingface-cli login`; "
                                    "endpoint: HF_ENDPOINT."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
) -> None:
    """Copy a finished stage's export (timm-loadable model.safetensors + config.json + model card) to DEST,
    and/or push it to the Hugging Face Hub (then `timm.create_model("hf-hub:REPO", pretrained=True)` loads it)."""
    import tempfile

    from pipeline.hub import HubError, push_folder
    from pipeline.runstore import RunView, copy_export

    if dest is None and push_to_hub is None:
        _fail("give DEST, --push-to-hub REPO, or both")
    if dest is not None:
        names = _guard(lambda: copy_export(RunView(run_root), stage, dest))
        typer.echo(f"copied {', '.join(names)} to {dest}")
    if push_to_hub is None:
        return
    with tempfile.TemporaryDirectory(prefix="vitforge-hub-") as tmp:
        _guard(lambda: copy_export(RunView(run_root), stage, tmp))
        try:
            url = push_folder(tmp, push_to_hub, private=private, message=f"vitforge export of stage {stage}")
        except HubError as exc:
            _fail(str(exc))
    typer.echo(f"pushed to {push_to_hub}: {url}")


@app.command()
def submit(
    spec: str = typer.Argument(..., help="Run spec YAML (see configs/)."),
    address: str = typer.Option(None, envvar="RAY_JOB_ADDRESS",
                                help="The cluster's job server, http://HEAD:8265 (default: RAY_JOB_ADDRESS)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the job's logs; exit with its exit status."),
    set_: list[str] = typer.Option(None, "--set", help="Override a spec value, e.g. stages.pretrain.epochs=2 "
                                   "(forwarded to `vitforge run`; repeatable)."),
    restart_from: str = typer.Option(None, help="Forwarded to `vitforge run --restart-from`."),
    env_from_local: bool = typer.Option(False, "--env-from-local", help="Copy this shell's storage credentials "
                                        "(AWS_*) into the job's env_vars. Off by default: they become visible to "
                                        "anyone who can list the cluster's jobs; prefer node credentials."),
) -> None:
    """Submit SPEC to a Ray cluster (Jobs API) with this checkout's code; print the job id.

    The job runs `python -m pipeline.cli run SPEC` with this checkout's packages shipped as py_modules (the cluster needs only the dependencies). Without --follow it returns at once: follow it with `vitforge status RUN_ROOT` or `ray job logs JOB_ID --address ADDRESS`. With --follow the exit status is the job's.
    """
    from cluster.jobs_api import JobsAPIError, follow_job
    from cluster.lease import LeaseHeldError
    from pipeline.spec import SpecError
    from pipeline.submit import submit_spec

    if not address:
        _fail("give the job server: --address http://HEAD:8265 (or set RAY_JOB_ADDRESS)")
    try:
        job = submit_spec(spec, address, overrides=set_ or (), restart_from=restart_from,
                          env_from_local=env_from_local)
    except (SpecError, LeaseHeldError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)
    except (JobsAPIError, OSError) as exc:
        _fail(str(exc))
    typer.echo(job.job_id)
    typer.echo(f"submitted to {job.address}; run root {job.run_root}\n"
               f"  follow: ray job logs {job.job_id} --address {job.address} --follow\n"
               f"  status: vitforge status {job.run_root}\n"
               f"  stop:   ray job stop {job.job_id} --address {job.address}", err=True)
    if not follow:
        return
    try:
        outcome = follow_job(job.address, job.job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job.job_id} goes on", err=True)
        raise typer.Exit(code=130)
    except JobsAPIError as exc:
        _fail(str(exc))
    typer.echo(f"job {job.job_id}: {outcome.status}" + (f" ({outcome.message})" if outcome.message else ""), err=True)
    raise typer.Exit(code=outcome.exit_code)


def _guard(fn, *args):
    """Run a read/report call; turn the errors a user can act on into `error: …` and exit status 1."""
    from cluster.storage import StorageError
    from pipeline.runstore import ExportNotReadyError, RunNotFoundError

    try:
        return fn(*args)
    except (RunNotFoundError, ExportNotReadyError, StorageError) as exc:
        _fail(str(exc))


def _load_spec_or_exit(path: str, overrides: Sequence[str]) -> Any:
    """Load and validate a spec with ``--set`` overrides; an invalid one exits with status 2.

    Neither reading nor validating imports torch, timm or torchvision: a typo is refused at once.
    """
    from pipeline._specfile import SpecError, apply_overrides, read_yaml

    try:
        raw, lines = read_yaml(path)
        raw = apply_overrides(raw, overrides, source=path, lines=lines)
        from pipeline.spec import parse_spec

        return parse_spec(raw, source=path, lines=lines)
    except SpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)


def _run_or_exit(fn: Callable[[], Any]) -> Any:
    """Run a pipeline call: a refused spec (changed run, missing input) exits 2, a failure exits 1."""
    from cluster.gang import GangFailedError
    from cluster.lease import LeaseHeldError
    from cluster.storage import StorageError
    from dataprep._sources import SourceError
    from dataprep.prep import PrepError
    from jobs.checkpoint import CheckpointMismatchError
    from jobs.init import InitMismatchError
    from pipeline.spec import SpecError

    try:
        return fn()
    except (SpecError, LeaseHeldError, InitMismatchError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2)
    except (StorageError, CheckpointMismatchError, GangFailedError, SourceError, PrepError) as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


if __name__ == "__main__":
    app()

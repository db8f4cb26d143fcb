"""The ``vitforge`` command line. Each sub-command is a thin shell over a library call."""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(
    name="vitforge",
    help="Distributed pretraining for Vision Transformers: prep shards, pretrain (MAE/DINO), distil, "
    "fine-tune and evaluate, with every stage checkpointed to object storage and exactly resumable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, os.environ.get("VITFORGE_LOG", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
    format: str = typer.Option("jpg", help="jpg, png, or keep (the inputs' dominant format)."),
    quality: int = typer.Option(90, help="JPEG quality."),
    val_fraction: float = typer.Option(0.0, help="Fraction of the samples for the val split."),
    seed: int = typer.Option(0, help="Seed of the split and shuffle."),
    workers: int = typer.Option(None, help="Shard tasks in flight (default: the cluster's CPUs)."),
    reject_threshold: float = typer.Option(0.05, help="Fail when a larger fraction of inputs is rejected."),
    min_side: int = typer.Option(8, help="Reject images with a side shorter than this (pixels)."),
    max_pixels: int = typer.Option(89_478_485, help="Reject larger images as decompression bombs (PIL's limit)."),
    source_kind: str = typer.Option("auto", help="auto, imagefolder, flat, csv, jsonl, parquet or wds."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
    overwrite: bool = typer.Option(False, help="Replace a prep with other options or another source at DEST."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
) -> None:
    """Turn images into WebDataset shards + manifest.json at DEST (idempotent, resumable)."""
    from pydantic import ValidationError
    from rich.console import Console

    from cluster.storage import StorageError
    from dataprep.prep import PrepError, PrepOptions, run_prep, summary_table
    from dataprep._sources import SourceError

    try:
        options = PrepOptions(
            shard_size=shard_size, shard_bytes=shard_bytes, resize=resize, format=format, quality=quality,
            val_fraction=val_fraction, seed=seed, workers=workers, reject_threshold=reject_threshold,
            min_side=min_side, max_pixels=max_pixels, source_kind=source_kind, overwrite=overwrite,
        )
        result = run_prep(src, dest, options, address=address, progress=progress)
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    except (SourceError, PrepError, StorageError) as exc:
        _fail(str(exc))
    Console().print(summary_table(result))
    if result.skipped:
        typer.echo(f"nothing to do: {result.manifest_url} already holds this prep")


@app.command()
def run(
    spec: str = typer.Argument(..., help="Run spec YAML (see configs/)."),
    address: str = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)."),
) -> None:
    """Run a spec's stages; finished stages are skipped, an interrupted one resumes.

    Exit status: 0 done, 75 preempted (SIGTERM/SIGINT; run again to continue), 1 failed.
    """
    from cluster.gang import GangFailedError
    from cluster.storage import StorageError
    from jobs.checkpoint import CheckpointMismatchError
    from jobs.engine import PREEMPTED_EXIT_CODE
    from pipeline.run import run_spec
    from pipeline.spec import SpecError, load_spec

    try:
        result = run_spec(load_spec(spec), address=address)
    except (SpecError, StorageError, CheckpointMismatchError, GangFailedError) as exc:
        _fail(str(exc))
    for name, state in result.states.items():
        typer.echo(f"{name}: {state}")
    if result.preempted:
        typer.echo(f"preempted: run `vitforge run {spec}` again to continue", err=True)
        raise typer.Exit(code=PREEMPTED_EXIT_CODE)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


if __name__ == "__main__":
    app()

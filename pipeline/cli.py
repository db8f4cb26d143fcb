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


if __name__ == "__main__":
    app()

"""Entry point of one training rank without Ray, e.g. under ``torchrun``::

    torchrun --nproc-per-node 2 -m pipeline.launch --spec run.yaml --stage pretrain

Every rank resolves the same stage job from the spec and runs it; the process group comes from
the environment torchrun sets. Exit status: 0 done, 75 preempted (SIGTERM/SIGINT: the step was
finished and a checkpoint committed; run the same command again to continue), 1 failed.
torchrun gives its workers ``--shutdown-timeout`` seconds (default 30) after forwarding SIGTERM
before it SIGKILLs them; raise it when a synchronous checkpoint takes longer than that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs.engine import PREEMPTED_EXIT_CODE
from jobs.init import pin_init_hashes
from jobs.stage import run_worker
from pipeline.spec import load_spec


def _job(args: argparse.Namespace) -> dict:
    if args.job:
        with open(args.job) as f:
            return json.load(f)
    spec = load_spec(args.spec)
    pin_init_hashes(spec)  # as a run does: an init file's hash is part of its stage's digest
    return spec.stage_job(args.stage, launcher="torchrun")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", help="run spec YAML")
    parser.add_argument("--stage", help="name of the training stage to run")
    parser.add_argument("--job", help="a resolved stage job (JSON) instead of --spec/--stage")
    args = parser.parse_args(argv)
    if not args.job and not (args.spec and args.stage):
        parser.error("give --spec and --stage (or --job)")
    logging.basicConfig(level=os.environ.get("VITFORGE_LOG", "INFO").upper(),
                        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s")
    state = run_worker(_job(args))
    return PREEMPTED_EXIT_CODE if state == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())

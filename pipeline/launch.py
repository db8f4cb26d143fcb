"""Entry point of one training rank without Ray, e.g. under ``torchrun``::

    torchrun --nproc-per-node 2 -m pipeline.launch --spec run.yaml --stage pretrain

Every rank resolves the same stage job from the spec and runs it; the process group comes from
the environment torchrun sets. Exit status: 0 done, 75 preempted (SIGTERM/SIGINT: the step was
finished and a checkpoint committed; run the same command again to continue), 1 failed.
torchrun gives its workers ``--shutdown-timeout`` seconds (default 30) after forwarding SIGTERM
before it SIGKILLs them; raise it when a synchronous checkpoint takes longer than that.
"""

from __future__ import annotations

import signal


class _StartupStop:
    """Records a SIGTERM/SIGINT that arrives while this rank is still importing and starting: torchrun
    forwards a stop to every rank at once, and a rank killed by the default handler before it joins the
    process group would leave the others waiting for it. The engine's ``PreemptionWatch`` takes the
    record over when it installs its own handler, so the stop is honoured after the first step."""

    received = False

    def __call__(self, signum: int, _frame: object) -> None:
        self.received = True


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _StartupStop())

import argparse  # noqa: E402  (after the handler: these imports take seconds)
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from jobs.engine import PREEMPTED_EXIT_CODE  # noqa: E402
from jobs.init import pin_init_hashes  # noqa: E402
from jobs.stage import run_worker  # noqa: E402
from pipeline.spec import load_spec  # noqa: E402


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

"""JSON-able engine state for checkpoints: RNG states, config digests, code version, meta checks.

Everything here is plain JSON so it can live in a checkpoint's ``COMMITTED`` record and in each
rank's marker, readable without unpickling anything.
"""

from __future__ import annotations

import base64
import functools
import json
import random
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.config.digest import json_digest  # noqa: F401  (re-exported)


class CheckpointError(RuntimeError):
    """Base class of checkpoint failures a user must act on."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written with a different architecture or config than the one now running."""


# ---- RNG states -------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy global, torch CPU, and CUDA when initialised), as JSON.

    Call on every rank: each rank has its own streams and stores them in its own marker.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when CUDA is available."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_unb64(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: each visible device takes the state of the same index
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, device=i)


# ---- digests, versions, checks -----------------------------------------------------------------




@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``vitforge <version>`` plus the git commit (``+dirty`` when the tree has changes) if in a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"vitforge {version('vitforge')}"
    except PackageNotFoundError:
        text = "vitforge (not installed)"
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        text += f" git {sha[:12]}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _matches(value: Any, expected: Any) -> bool:
    return value in expected if isinstance(expected, frozenset) else value == expected


def check_compatible(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every key of ``expected`` whose value differs in ``saved``.

    Typical keys: ``arch`` (model config), ``config_digest``. Keys absent from ``expected`` are not compared;
    a ``frozenset`` value accepts any of its members (an extended stage's digests, ``jobs/_extensions.py``).
    """
    missing = object()
    diffs = [k for k in expected if not _matches(saved.get(k, missing), expected[k])]
    if not diffs:
        return
    lines = [f"  {k}: checkpoint has {_short(saved[k]) if k in saved else '(absent)'}, "
             f"this run has {_short(sorted(expected[k]) if isinstance(expected[k], frozenset) else expected[k])}" for k in diffs]
    raise CheckpointMismatchError(
        f"{where} does not match this run; differing keys: {', '.join(diffs)}\n" + "\n".join(lines)
        + "\nResume with the same config, or start the stage afresh in a new run directory."
    )

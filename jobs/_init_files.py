"""An init's weights file, torch-free: where it is, its SHA-256, and the hash a run pins into each stage
whose ``init`` is a file or URL (:func:`pin_init_hashes`; validation and ``--dry-run`` call it too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cluster._digest import file_sha256 as sha256_file
from cluster.storage import Store, local_staging
from jobs.config.init import InitRef, WeightsFile
from jobs.layout import EXPORT_WEIGHTS_NAME as WEIGHTS



class InitChangedError(ValueError):
    """The init's weights are not the ones the stage's ``init_sha256`` pins."""


def _weights_location(init: InitRef, url: str | None) -> tuple[str, str, str]:
    """(parent URL, file name, where: for messages) of ``init``'s weights file."""
    if isinstance(init, WeightsFile):
        weights = init.weights if "://" in init.weights else os.path.abspath(os.path.expanduser(init.weights))
        parent, name = weights.rsplit("/", 1)
        return parent, name, weights
    url = url or init
    return url, WEIGHTS, url


@contextmanager
def fetched(init: InitRef, url: str | None, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, str]]:
    """(local copy, where) of ``init``'s weights file, removed on exit."""
    parent, name, where = _weights_location(init, url)
    if not name.endswith(".safetensors"):
        raise ValueError(f"init {where}: only .safetensors weights are loaded (no pickle); convert it with "
                         "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    with local_staging("vitforge-init-") as tmp:
        path = os.path.join(tmp, name)
        Store(parent, storage_options).get_file(name, path)
        yield path, where


def init_sha256(init: InitRef, url: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """SHA-256 of ``init``'s weights file (what the stage digest pins)."""
    with fetched(init, url, storage_options) as (path, _):
        return sha256_file(path)


def pin_init_hashes(spec: Any) -> None:
    """Set ``init_sha256`` of every stage whose ``init`` is a weights file or an export URL/path (not an
    earlier stage, whose own digest covers it) to that file's SHA-256: the hash is then part of the stage
    digest, so a finished stage counts as done, and a checkpoint resumes, only on the same weights.
    A hash the spec already gives must match (else :class:`InitChangedError`). Reads the files only."""
    names = {s.name for s in spec.stages}
    for i, stage in enumerate(spec.stages):
        init = getattr(stage, "init", None)
        if init is None or (isinstance(init, str) and init in names):
            continue
        digest = init_sha256(init, spec.export_url(init) if isinstance(init, str) else None, spec.storage_options)
        if stage.init_sha256 is not None and stage.init_sha256 != digest:
            raise InitChangedError(f"stages[{i}] ({stage.name}) > init_sha256: the spec pins {stage.init_sha256}, "
                                   f"but the init's weights have {digest}; give the pinned weights, or update "
                                   "init_sha256")
        stage.init_sha256 = digest

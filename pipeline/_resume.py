"""``vitforge resume RUN_ROOT``: the run's own spec, read back from ``<run_root>/run.yaml``."""

from __future__ import annotations

from typing import Any

import yaml

from cluster.storage import Store
from pipeline._plan import RUN_YAML
from pipeline.runstore import RunNotFoundError
from pipeline.spec import RunSpec, SpecError, parse_spec


def stored_spec(run_root: str, storage_options: dict[str, Any] | None = None) -> RunSpec:
    """The spec in ``run.yaml``, placed at ``run_root`` (its ``storage`` may have been a relative path).

    Raises :class:`RunNotFoundError` when ``run_root`` holds no ``run.yaml``.
    """
    store = Store(run_root, storage_options)
    try:
        raw = yaml.safe_load(store.get_bytes(RUN_YAML).decode())
    except FileNotFoundError:
        raise RunNotFoundError(f"{store.url_of(RUN_YAML)} does not exist: {run_root} is not a run root "
                               "(it is <storage>/<name> of a spec that `vitforge run` started)") from None
    spec = parse_spec(raw, source=store.url_of(RUN_YAML))
    if Store(spec.run_root, storage_options).url.rstrip("/") != store.url.rstrip("/"):
        raise SpecError(f"{store.url_of(RUN_YAML)} names storage {spec.storage!r}, which from here is "
                        f"{spec.run_root}, not {run_root}: run `vitforge resume` from the directory the run "
                        "was started in (a relative storage path is read from the current directory)")
    return spec

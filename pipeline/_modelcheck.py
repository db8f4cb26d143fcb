"""What a valid spec is checked for with timm and torch, after its own validation (``pipeline/spec.py``,
which imports neither, so a typo is refused at once):

* every stage's ``model`` is one timm builds: the architecture exists, each ViT field given applies
  to it (``jobs.models.model_problems``), named with its line like any spec error;
* every ``init`` fits its stage's model (meta-device models, :func:`jobs.init.check_inits`).

The runner checks this before anything is written, and so do ``vitforge validate`` and
``vitforge run --dry-run``: a spec they pass is one a run accepts.
"""

from __future__ import annotations

from jobs.init import check_inits
from jobs.models import model_problems
from pipeline._specerrors import where
from pipeline._specfile import SpecError
from pipeline.spec import RunSpec


def check_models(spec: RunSpec) -> None:
    """Raise :class:`SpecError` naming every stage model timm refuses (then
    :class:`jobs.init.InitMismatchError` for an init that cannot fit its model)."""
    problems = [f"  stages[{i}] ({stage.name}) > model > {field}{where(spec._lines, ('stages', i, 'model', field))}: "
                f"{message}"
                for i, stage in enumerate(spec.stages) for field, message in model_problems(getattr(stage, "model", None))]
    if problems:
        raise SpecError(f"{spec._source} is invalid:\n" + "\n".join(problems))
    check_inits(spec)

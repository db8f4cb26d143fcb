"""Stage configs: the pydantic models a run spec's stages are validated with, one module per method
plus the shared ones (``train``: every training stage's fields; ``models``, ``init``, ``peft``).

Nothing here imports torch, timm or torchvision, so a spec validates in well under two seconds.
What needs them (the architecture exists in timm, an init fits its model) is checked by the runner
(``pipeline/_modelcheck.py``). The method modules (``jobs/mae.py`` …) import their config from here
and re-export it.

Importing this package registers the built-in training kinds (:mod:`jobs.config.kinds`), in the
order below, which is the order of the kinds in messages.
"""

from jobs.config import mae  # noqa: F401, I001
from jobs.config import dino  # noqa: F401, I001
from jobs.config import ibot  # noqa: F401, I001
from jobs.config import distill  # noqa: F401, I001
from jobs.config import finetune  # noqa: F401, I001
from jobs.config.kinds import config_class, config_classes, import_methods, register_config, training_kinds

__all__ = ["config_class", "config_classes", "import_methods", "register_config", "training_kinds"]

"""The built-in training methods, imported so each registers its kind (see :mod:`jobs.method`).

Import this module to look a kind up (:func:`method_class`); a method of your own registers when
its module is imported (a run spec's ``methods:`` list, :func:`import_methods`).
"""

from __future__ import annotations

# in this order (the order of the spec's kinds in messages); each registers its kind on import
from jobs import mae  # noqa: F401, I001
from jobs import dino  # noqa: F401, I001
from jobs import ibot  # noqa: F401, I001
from jobs import distill  # noqa: F401, I001
from jobs import finetune  # noqa: F401, I001
from jobs.method import Method, config_classes, import_methods, method_class, register, training_kinds

__all__ = ["Method", "config_classes", "import_methods", "method_class", "register", "training_kinds"]

"""The training kinds: each kind's stage ``Config`` class, known without importing any method module.

The run spec's stage union and its list of training kinds are built from here
(``pipeline/spec.py``), so validating a spec imports no torch, timm or torchvision. The built-in
configs register when :mod:`jobs.config` is imported; a method of your own registers its ``Config``
when its class is created (:class:`jobs.method.Method`, which also maps the kind to the method).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable

from jobs.config.train import TrainConfig

_CONFIGS: dict[str, type[TrainConfig]] = {}


def kind_of(config: object, owner: str) -> str:
    """The ``kind`` a stage config declares (``kind: Literal['mae'] = 'mae'``); ``owner`` names it in errors."""
    if not (isinstance(config, type) and issubclass(config, TrainConfig)):
        raise TypeError(f"method {owner}: Config must be a subclass of jobs.engine.TrainConfig, got {config!r}")
    field = config.model_fields.get("kind")
    kind = field.default if field is not None else None
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"method {owner}: {config.__qualname__} needs a field "
                        f"kind: Literal['<kind>'] = '<kind>' (the stage's kind in a run spec)")
    return kind


def register_config(config: type[TrainConfig], replace: bool = False) -> type[TrainConfig]:
    """Register ``config`` under its ``kind``. Another class already holding the kind is an error unless
    ``replace``, or it is the same class imported again under another module name (same file, same name)."""
    kind = kind_of(config, config.__qualname__)
    held = _CONFIGS.get(kind)
    if held is not None and held is not config and not replace and not same_source(held, config):
        raise TypeError(f"stage kind {kind!r} is already registered by {held.__module__}.{held.__qualname__}; "
                        f"{config.__module__}.{config.__qualname__} needs another kind")
    _CONFIGS[kind] = config
    return config


def same_source(a: type, b: type) -> bool:
    """The same class defined in the same file (a module imported twice under two names)."""
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)
    except TypeError:
        return False


def config_class(kind: str) -> type[TrainConfig]:
    """The stage config of training ``kind`` (plugins: import their modules first, :func:`import_methods`)."""
    try:
        return _CONFIGS[kind]
    except KeyError:
        raise ValueError(f"unknown training stage kind {kind!r}; known: {', '.join(sorted(_CONFIGS))} (a method "
                         "of your own: name its module in the run spec's methods: list)") from None


def training_kinds() -> tuple[str, ...]:
    """Every registered kind, in registration order (the built-ins first)."""
    return tuple(_CONFIGS)


def config_classes() -> tuple[type[TrainConfig], ...]:
    """The stage config class of every registered kind, in registration order."""
    return tuple(_CONFIGS.values())


def import_methods(modules: Iterable[str]) -> None:
    """Import each dotted module path (a plugin's methods register themselves, and their configs, on import)."""
    for name in modules:
        importlib.import_module(name)

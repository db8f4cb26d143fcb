"""The method contract: one base class with every hook the engine calls, and the registry of kinds.

A method (``jobs/mae.py``, a plugin module of your own) is a subclass of :class:`Method` that
declares its stage config as the class attribute ``Config`` (a :class:`~jobs.engine.TrainConfig`
subclass whose ``kind`` field is a ``Literal`` with a default). Declaring ``Config`` registers the
class under that ``kind``, and the ``Config`` as the kind's stage config in :mod:`jobs.config.kinds`,
from which the run spec's stage union and its training kinds are built (``pipeline/spec.py``, which
imports no method module, hence no torch), so a new method is one file::

    class BlockMAEConfig(TrainConfig):
        kind: Literal["block_mae"] = "block_mae"

    class BlockMAE(Method):
        Config = BlockMAEConfig
        def build_model(self): ...
        def train_transform(self): ...
        def step(self, model, batch, step): ...
        def encoder(self, model): ...

A method the engine could not run (it misses ``build_model``, ``train_transform``, ``step``, or
both ``encoder`` and ``export``) is refused when its class is created, with the hook named. A
subclass that does not declare its own ``Config`` (a test's traced variant of MAE) inherits its
parent's kind and registers nothing; :func:`register` with ``replace=True`` puts it in its parent's
place for one process.

Methods outside ``jobs/`` are found by module: a run spec names them in its top-level
``methods: [my_lab.block_mae]`` (dotted module paths, importable on the driver and on every
worker); :func:`import_methods` imports them, which registers their kinds. The built-in kinds'
configs are registered by importing :mod:`jobs.config` (torch-free), their methods by importing
``jobs.methods``.

Every hook below has a documented default; the engine calls each of them directly. ``model``
is the unwrapped ``nn.Module`` that :meth:`Method.build_model` returned, except in
:meth:`Method.step`, whose ``model`` is the DeepSpeed engine around it: its forward is what
registers DeepSpeed's gradient-accumulation scaling on the loss, so the training forward must go
through it (attributes of your module: keep what you need from ``build_model``). Batches reach
``step`` and ``eval_step`` on the model's device, floating tensors in its dtype.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from dataprep.mixing import Mix
from jobs._engine_config import OptimConfig, StageContext, TrainConfig, param_groups
from jobs._channels import export_channels
from jobs.config.kinds import (config_class, config_classes, import_methods, kind_of,  # noqa: F401  (re-exported)
                               register_config, same_source, training_kinds)
from jobs.export import export_encoder
from jobs.models import encoder_in_chans

log = logging.getLogger(__name__)

REQUIRED_HOOKS = ("build_model", "train_transform", "step")

_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """What a training method supplies to :func:`jobs.engine.train` (see the module docstring).

    Construct with the stage's validated ``Config`` and this worker's rank. Hooks are called by
    every rank, in this order: :meth:`setup`, :meth:`build_model`, :meth:`param_groups` (or :meth:`layer_decay`),
    :meth:`train_sample_ids`, :meth:`train_transform` / :meth:`train_mix` / :meth:`eval_transform`,
    :meth:`set_run_length`, then per step :meth:`weight_decay_at`, :meth:`frozen_groups`, :meth:`step`
    (per micro-batch), :meth:`after_step`; :meth:`extra_state` at each checkpoint,
    :meth:`load_extra_state` at resume, :meth:`eval_step` at each epoch end, :meth:`export` when the stage is done.
    """

    Config: ClassVar[type[TrainConfig]]
    kind: ClassVar[str]
    #: the pooling the method trains (``token``: the CLS token; ``avg``: the mean patch token), recorded in
    #: the export's ``config.json`` (``vitforge.pool``); ``eval`` uses it unless the eval stage sets ``pool``
    pool: ClassVar[Literal["token", "avg", "channels"] | None] = None  # a method may set its own per instance
    # the weights the model starts from (a jobs.init.InitSource, set by setup when the stage has an init):
    # its digest is in every checkpoint, and a resume from another init is refused
    init_source: Any = None
    # the data's channels (its manifest's dataprep.manifest.ChannelInfo; None: 8-bit images), set by setup:
    # the export records their names and per-channel mean / std
    data_channels: Any = None

    def __init__(self, cfg: TrainConfig, rank: int = 0) -> None:
        self.cfg, self.rank = cfg, rank

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" not in cls.__dict__:
            return  # a variant of a registered method (or an abstract helper): it keeps its parent's kind
        cls.kind = _kind_of(cls)
        _check_hooks(cls)
        register(cls)

    # ---- required ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The module DeepSpeed trains (built after :meth:`setup`; torch is already seeded by the engine)."""
        raise NotImplementedError

    def train_transform(self) -> Callable:
        """The loader's per-sample transform of the train split."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and extra metrics to log. ``model`` is the DeepSpeed engine (call
        it for the forward), ``batch`` is on its device; ``step`` counts completed optimizer steps."""
        raise NotImplementedError

    # ---- required: one of the two ------------------------------------------------------------------
    def encoder(self, model: nn.Module) -> nn.Module:
        """The timm encoder inside ``model`` that the default :meth:`export` writes."""
        raise NotImplementedError

    def export(self, model: nn.Module, dest_url: str, *, rank: int, storage_options: dict[str, Any],
               extra: dict[str, Any]) -> None:
        """Write the stage's export to ``dest_url`` (every rank calls: ZeRO-3 gathers). Default: the
        :meth:`encoder` with ``cfg.model`` as a timm model (:func:`jobs.export.export_encoder`)."""
        encoder = self.encoder(model)
        export_encoder(encoder, self.cfg.model, dest_url, rank=rank, storage_options=storage_options, extra=extra,
                       channels=export_channels(self.data_channels, encoder_in_chans(encoder)))

    # ---- optional, with no-op defaults -------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        """Once, before :meth:`build_model`: read ``ctx.refs`` (resolved ``init`` / ``teacher``), ``ctx.data_url``."""

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        """Once, before the first step: for schedules counted in epochs."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After each optimizer step (e.g. an EMA teacher); every rank, in step (ZeRO-3 gathers are collective)."""

    def weight_decay_at(self, step: int) -> float | None:
        """The weight decay of the decayed parameter groups at ``step``; None (default) keeps ``optim``'s."""
        return None

    def frozen_groups(self, step: int) -> set[str]:
        """Names (a group's ``name`` key, see :meth:`param_groups`) of the AdamW groups that get no update at
        all at ``step``: no weight decay, no moments, no optimizer state created. Default: none."""
        return set()

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
        """The AdamW groups; a group's ``lr_scale`` multiplies the scheduled lr, its ``name`` is what
        :meth:`frozen_groups` names. Default: the engine's :func:`~jobs.engine.param_groups` from
        :meth:`no_weight_decay` and :meth:`layer_decay` (override to add a group of your own)."""
        return param_groups(model, optim.weight_decay, self.no_weight_decay(model), self.layer_decay())

    def layer_decay(self) -> float | None:
        """Layer-wise lr decay of the engine's groups (``lr_scale = layer_decay ** (L + 1 - layer)`` per ViT
        layer, :func:`jobs.engine.param_groups`). None (default): two groups, decayed / not."""
        return None

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """Parameter names (full, or their last component) kept out of weight decay besides every 1-D one."""
        return set()

    def train_sample_ids(self) -> Any:
        """The train sample ids the loader serves, the same on every rank (e.g. a label fraction); None: all."""
        return None

    def train_mix(self) -> Mix | None:
        """Mixup / cutmix of the train loader's batches (:mod:`dataprep.mixing`: keyed by (seed, epoch,
        sample id); the batch then has ``mix_lam``, ``partner_label``, ``partner_index``). None (default): off."""
        return None

    def eval_transform(self) -> Callable | None:
        """The val split's transform: a method that returns one (and defines :meth:`eval_step`) is evaluated
        on the manifest's val split at every epoch end. None (default): no per-epoch evaluation."""
        return None

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Sums over this rank's val batch with a ``count`` key (padded samples, ``batch["pad"]``, are the
        method's to skip); the engine sums over ranks and logs ``val_<key>`` per sample."""
        raise NotImplementedError(f"{type(self).__name__} returns an eval_transform but defines no eval_step")

    def extra_state(self) -> dict[str, torch.Tensor] | None:
        """Replicated method state a resume needs besides the engine's (rank 0 saves it); None: none."""
        return None

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """What :meth:`extra_state` returned, at resume (every rank). Define both or neither."""

    def arch(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (JSON-able). Default: the kind and ``cfg.model``."""
        model = getattr(self.cfg, "model", None)
        return {"kind": self.kind, "model": model.model_dump(mode="json") if model is not None else None}

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (fwd + bwd) per image, for MFU on GPU; None (default): no MFU logged."""
        return None

    @classmethod
    def reconstruction_report(cls, stage_url: str, data_url: str, split: str, seed: int,
                              storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
        """For ``kind: eval``: a reconstruction measurement of this method's stage at ``stage_url`` on
        ``split`` (MAE), put in ``eval.json`` as the model's ``reconstruction``; None (default): none."""
        return None

    # ---- introspection -------------------------------------------------------------------------------
    @classmethod
    def defines(cls, hook: str) -> bool:
        """Whether this class (or a parent below :class:`Method`) overrides ``hook``."""
        return getattr(cls, hook) is not getattr(Method, hook)


# ---- registration ------------------------------------------------------------------------------------


def _kind_of(cls: type[Method]) -> str:
    return kind_of(cls.__dict__["Config"], cls.__qualname__)


def _check_hooks(cls: type[Method]) -> None:
    """Refuse, at class creation, a method the engine could not run, naming the hook it misses."""
    for hook in REQUIRED_HOOKS:
        if not cls.defines(hook):
            raise TypeError(f"method {cls.__qualname__} (kind {cls.kind!r}) does not define {hook}(): "
                            f"{_first_line(getattr(Method, hook))}")
    if not (cls.defines("encoder") or cls.defines("export")):
        raise TypeError(f"method {cls.__qualname__} (kind {cls.kind!r}) defines neither encoder() nor export(): "
                        "a training stage must export a model (define encoder() for the default timm export, "
                        "or export())")
    if cls.defines("eval_transform") and not cls.defines("eval_step"):
        raise TypeError(f"method {cls.__qualname__} (kind {cls.kind!r}) defines eval_transform() but not "
                        f"eval_step(): {_first_line(Method.eval_step)}")
    for a, b in (("extra_state", "load_extra_state"), ("load_extra_state", "extra_state")):
        if cls.defines(a) and not cls.defines(b):
            raise TypeError(f"method {cls.__qualname__} (kind {cls.kind!r}) defines {a}() but not {b}(): "
                            "a resumed run needs both")


def _first_line(fn: Any) -> str:
    return (inspect.getdoc(fn) or "").split("\n")[0]


def register(cls: type[Method], replace: bool = False) -> type[Method]:
    """Register ``cls`` under its ``kind``, and its ``Config`` as that kind's (subclassing with a ``Config``
    does this).

    Another class already holding the kind is an error unless ``replace`` (a test's variant), or it
    is the same class imported again under another module name (same file, same name).
    """
    kind = cls.Config.model_fields["kind"].default
    held = _REGISTRY.get(kind)
    if held is not None and held is not cls and not replace and not same_source(held, cls):
        raise TypeError(f"method kind {kind!r} is already registered by {held.__module__}.{held.__qualname__}; "
                        f"{cls.__module__}.{cls.__qualname__} needs another kind")
    register_config(cls.Config, replace=replace)
    _REGISTRY[kind] = cls
    return cls


def method_class(kind: str) -> type[Method]:
    """The registered method of ``kind`` (built-ins: import ``jobs.methods``; plugins: :func:`import_methods`)."""
    config_class(kind)  # an unknown kind: the spec's error, naming the known ones
    if kind not in _REGISTRY:
        raise ValueError(f"stage kind {kind!r} has a config but no method registered in this process: import "
                         "jobs.methods (the built-in methods) or the module that defines its method")
    return _REGISTRY[kind]

"""Starting a stage from an existing encoder (``init:`` on every training kind).

``init`` is an earlier training stage (its export), an export directory or URL, or any timm model
with a ``.safetensors`` file (``{arch: vit_base_patch16_224, weights: ./mae_b16.safetensors}``,
the same shape as distillation's teacher weights). :func:`read_init` reads it once, with the
SHA-256 of its weights file. A run pins that hash before any stage starts (:func:`pin_init_hashes`:
the stage's ``init_sha256``, part of its digest) where the init is a file or URL; an init naming an
earlier stage is covered by that stage's digest. So a finished stage is skipped, and a checkpoint
resumes, only on the same weights (every checkpoint also records the hash, for library callers);
:func:`load_init` puts it into the stage's freshly built model:

* tensors of equal shape are copied exactly; nothing re-initialises them afterwards;
* an absolute position embedding on another patch grid is resampled (timm's
  ``resample_abs_pos_embed``) and a patch embedding of another patch size too
  (``resample_patch_embed``), each with a log line;
* the source's classifier (``head.*``) is dropped where the model has none or another size: the
  new head starts fresh, as timm does for ``pretrained=True`` with another ``num_classes``;
* anything else that differs (depth, width, channels, missing tensors) is an
  :class:`InitMismatchError` naming both shapes. :func:`check_init_shapes` runs the same check on
  meta-device models, so a run refuses such a spec before any stage starts.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from jobs._init_files import (InitChangedError, fetched, init_sha256, pin_init_hashes,  # noqa: F401  (re-exported)
                              sha256_file)
from jobs.config.init import InitFields, InitRef, WeightsFile  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")  # the classifier of a timm ViT: fresh when it differs


class InitMismatchError(ValueError):
    """The init's weights cannot be loaded into the stage's model (names both shapes)."""


@dataclass
class InitSource:
    """An init, read: its weights (timm key names), where they came from, and their content hash."""

    where: str
    state: dict[str, torch.Tensor]
    digest: str
    config: dict[str, Any] = field(default_factory=dict)  # the export's config.json ({} for a weights file)


def init_arch(init: InitRef | None) -> str | dict[str, Any] | None:
    """The init as written in the spec (JSON-able)."""
    return init.model_dump() if isinstance(init, WeightsFile) else init


def weights_file_config(init: WeightsFile) -> dict[str, Any]:
    """An export-style config (``jobs.export.timm_export_config``) of the model a weights file holds."""
    import timm

    from jobs.export import timm_export_config

    args = {**init.args, "num_classes": init.num_classes, **({"img_size": init.img_size} if init.img_size else {})}
    with torch.device("meta"):
        size = init.img_size or int(timm.create_model(init.arch, **args).pretrained_cfg["input_size"][-1])
    return timm_export_config(init.arch, args, size)


def read_init(init: InitRef, url: str | None = None, storage_options: dict[str, Any] | None = None,
              sha256: str | None = None) -> InitSource:
    """Read ``init`` (``url``: its resolved export URL when it names a stage). ``sha256``: the hash the run
    pinned (the stage's ``init_sha256``); other weights raise :class:`InitChangedError`."""
    from jobs.export import read_export_config

    config = {} if isinstance(init, WeightsFile) else read_export_config(url or init, storage_options)
    with fetched(init, url, storage_options) as (path, where):
        digest = sha256_file(path)
        if sha256 is not None and digest != sha256:
            raise InitChangedError(f"init {where} has sha256 {digest}, but the stage's init_sha256 is {sha256}: its "
                                   "weights changed since the run pinned them; put the pinned weights back, or "
                                   "re-run the stage on the new ones (vitforge run --restart-from STAGE)")
        return InitSource(where=where, state=load_file(path), digest=digest, config=config)


# ---- fitting a state into a model -----------------------------------------------------------------


def _prefix_rows(model: nn.Module) -> int:
    """Rows of ``pos_embed`` that belong to prefix tokens (cls, registers) rather than patches."""
    return 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))


def _resample(name: str, value: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """``value`` resampled to ``target``'s shape the way timm does, or None when that is not a grid change
    (a meta ``value``: only whether it is one; the result is ``target``)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    if name == "pos_embed" and value.ndim == 3 and value.shape[-1] == target.shape[-1]:
        rows = _prefix_rows(model)
        old, new = value.shape[1] - rows, target.shape[1] - rows
        side_old, side_new = int(round(old ** 0.5)), int(round(new ** 0.5))
        if old > 0 and side_old ** 2 == old and side_new ** 2 == new:
            if value.is_meta:
                return target
            return resample_abs_pos_embed(value.float(), new_size=[side_new, side_new],
                                          old_size=[side_old, side_old], num_prefix_tokens=rows).to(value.dtype)
    if name.endswith("patch_embed.proj.weight") and value.ndim == 4 and value.shape[:2] == target.shape[:2]:
        return target if value.is_meta else resample_patch_embed(value.float(), list(target.shape[-2:])).to(value.dtype)
    return None


def fit_state(state: dict[str, torch.Tensor], model: nn.Module, where: str,
              target: dict[str, torch.Tensor] | None = None, fresh: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``state`` made loadable into ``model`` (see the module docstring); raises :class:`InitMismatchError`.

    ``fresh``: ``fnmatch`` patterns of tensors the stage's model adds (prompts, adapters): they keep
    their own init where the init has none."""
    target = model.state_dict() if target is None else target
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name, want in target.items():
        have = state.get(name)
        if have is None:
            if not name.startswith(HEAD_PREFIXES) and not any(fnmatch.fnmatchcase(name, p) for p in fresh):
                problems.append(f"{name}: the model has {tuple(want.shape)}, the init has no such tensor")
            continue
        if tuple(have.shape) == tuple(want.shape):
            out[name] = have
        elif name.startswith(HEAD_PREFIXES):
            log.info("init %s: %s %s does not fit the model's %s; the head starts fresh", where, name,
                     tuple(have.shape), tuple(want.shape))
        elif (fitted := _resample(name, have, want, model)) is not None:
            log.info("init %s: resampled %s from %s to %s (timm, bicubic)", where, name, tuple(have.shape),
                     tuple(want.shape))
            out[name] = fitted
        else:
            problems.append(f"{name}: the model has {tuple(want.shape)}, the init has {tuple(have.shape)}")
    extra = sorted(k for k in state if k not in target and not k.startswith(HEAD_PREFIXES))
    problems += [f"{k}: the init has {tuple(state[k].shape)}, the model has no such tensor" for k in extra[:5]]
    if problems:
        more = f"\n  … {len(extra) - 5} more" if len(extra) > 5 else ""
        raise InitMismatchError(f"init {where} cannot be loaded into {type(model).__name__} (only the image size "
                                "and patch size are resampled):\n  " + "\n  ".join(problems[:12]) + more +
                                "\nGive the stage's model the init's shape (depth, embed_dim, num_heads, "
                                "in_chans, reg_tokens), or another init")
    return out


def load_init(model: nn.Module, source: InitSource, fresh: tuple[str, ...] = ()) -> None:
    """Copy ``source`` into ``model`` in place (every fitted tensor exactly; the fresh head and the
    ``fresh`` tensors stay as built)."""
    state = fit_state(source.state, model, source.where, fresh=fresh)
    with torch.no_grad():
        own = model.state_dict()
        for name, value in state.items():
            own[name].copy_(value)
    log.info("initialised %s from %s (%d tensors, sha256 %s)", type(model).__name__, source.where, len(state),
             source.digest[:12])


def check_init_shapes(source: dict[str, Any], model: nn.Module, where: str) -> None:
    """Raise :class:`InitMismatchError` when tensors of ``source``'s shapes cannot fit ``model`` (a
    meta-device model is enough: nothing is computed)."""
    fit_state({k: torch.empty(tuple(v.shape), device="meta") for k, v in source.items()}, model, where,
              target={k: torch.empty(tuple(v.shape), device="meta") for k, v in model.state_dict().items()})


def start_encoder(encoder: nn.Module, source: InitSource | None, peft: Any = None,
                  trainable: tuple[str, ...] = ()) -> nn.Module:
    """``encoder`` loaded from ``source`` (if any), then frozen but for ``peft``'s tensors (if any)."""
    if source is not None:
        load_init(encoder, source)
    if peft is not None:
        from jobs.peft import apply_peft

        encoder = apply_peft(encoder, peft, trainable)
    return encoder


def read_stage_init(cfg: Any, ctx: Any) -> InitSource | None:
    """The init of stage ``cfg`` (``ctx.refs["init"]``: its resolved export URL), or None without one."""
    if cfg.init is None:
        return None
    return read_init(cfg.init, ctx.refs.get("init"), ctx.storage_options, sha256=cfg.init_sha256)


# ---- before anything runs: does each stage's init fit its model? -------------------------------------


def _meta_model(model_cfg: Any) -> nn.Module | None:
    """The (headless) model of a stage's ``model`` config on the meta device; None for another config."""
    from jobs.models import ModelConfig, TimmModelConfig, build_encoder, build_timm_model

    with torch.device("meta"):
        if isinstance(model_cfg, ModelConfig):
            return build_encoder(model_cfg)
        if isinstance(model_cfg, TimmModelConfig):
            return build_timm_model(model_cfg, num_classes=0)
    return None


def _source_shapes(spec: Any, init: InitRef, seen: int = 0) -> dict[str, Any] | None:
    """Shapes of the tensors ``init`` holds, from the spec alone where it names a stage; None: unknown here."""
    import timm

    if isinstance(init, WeightsFile):
        if "://" in init.weights or not os.path.exists(os.path.expanduser(init.weights)):
            return None  # read (and checked) when the stage loads it
        from safetensors import safe_open

        with safe_open(os.path.expanduser(init.weights), "pt") as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    names = {s.name: s for s in spec.stages}
    if init in names and seen < 8:
        stage = names[init]
        if getattr(stage, "init", None) is not None and getattr(stage, "kind", "") == "finetune":
            return _source_shapes(spec, stage.init, seen + 1)  # a fine-tune keeps its init's architecture
        model = _meta_model(getattr(stage, "model", None))
        return None if model is None else dict(model.state_dict())
    try:
        from jobs.export import read_export_config

        config = read_export_config(spec.export_url(init), spec.storage_options)
    except FileNotFoundError:
        return None
    with torch.device("meta"):
        return dict(timm.create_model(config["architecture"], **config["model_args"]).state_dict())


def check_inits(spec: Any) -> None:
    """Refuse a spec in which some stage's ``init`` cannot be loaded into its model (both shapes named)."""
    for i, stage in enumerate(spec.stages):
        init = getattr(stage, "init", None)
        if init is None or getattr(stage, "kind", "") == "finetune":
            continue  # a fine-tune builds its model from its init
        model = _meta_model(getattr(stage, "model", None))
        shapes = _source_shapes(spec, init) if model is not None else None
        if shapes is not None:
            where = init if isinstance(init, str) else init.weights
            try:
                check_init_shapes(shapes, model, where)
            except InitMismatchError as exc:
                raise InitMismatchError(f"stages[{i}] ({stage.name}) > init: {exc}") from None

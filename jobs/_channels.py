"""Channels between the data and a model: ``in_chans`` from the manifest, and channel subsets by name.

A ``format: npy`` manifest names its channels (``dataprep.manifest.ChannelInfo``); 8-bit image
shards are three channels ``0, 1, 2``. Every stage takes ``in_chans`` from its data
(:func:`data_in_chans`); an explicit ``in_chans`` that disagrees is an error naming both.

``channels: [DNA, ER, RNA]`` on a finetune or eval stage selects (and orders) some of the data's
channels (:func:`plan_channels`): a ChannelViT takes any subset of the channels it was trained on
(each token carries a learned embedding of its channel), a plain model only exactly ``in_chans``
of them, and the refusal names the fix. The resulting :class:`ChannelPlan` slices each batch
(``select``) and tells a ChannelViT which of its channels the input holds (``model``).

``withhold: [Mito, BF]`` (eval) measures a model without some of the channels it reads: a ChannelViT
reads the others, a plain model gets each withheld channel as zeros after normalisation (its train
mean: the only way to give a plain model an input without that channel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from dataprep.manifest import ChannelInfo, load_manifest

CHANNELVIT_EXAMPLE = "channelvit_tiny_patch16_224"
RGB_NAMES = ("0", "1", "2")  # an 8-bit image manifest's channels, as a format: npy manifest names unnamed ones


def is_channelvit(arch: str) -> bool:
    return arch.startswith("channelvit_")


def data_channels(data_url: str, storage_options: dict[str, Any] | None = None) -> ChannelInfo | None:
    """The manifest's channel description (None: 8-bit image shards, 3 channels)."""
    return load_manifest(data_url, storage_options)[0].channels


def channel_names(info: ChannelInfo | None) -> list[str]:
    return list(info.names) if info is not None else list(RGB_NAMES)


def data_in_chans(explicit: int | None, info: ChannelInfo | None, where: str, field: str = "model.in_chans",
                  selected: Sequence[str] | None = None, data: str = "the data") -> int:
    """``in_chans`` for a model trained on this data (or on ``selected`` of its channels): the data's
    count, or ``explicit`` when it agrees; a disagreeing one is an error naming both."""
    names = list(selected) if selected else channel_names(info)
    if explicit is None or explicit == len(names):
        return len(names)
    what = f"channels {names}" if selected else (f"{data} has {len(names)} channels ({', '.join(names)})"
                                                  if info is not None else f"{data} is RGB images (3 channels)")
    raise ValueError(f"{where}: {field} is {explicit} but {what}; remove {field} or set it to {len(names)}")


@dataclass(frozen=True)
class ChannelPlan:
    """Which data channels feed the model (``data``: indices, None = all in order) and, for a ChannelViT,
    which of its trained channels they are (``model``: indices, None = all in order)."""

    data: tuple[int, ...] | None = None
    model: tuple[int, ...] | None = None
    names: tuple[str, ...] = ()
    zero: tuple[int, ...] = ()  # positions (in the selected order) a plain model gets as zeros: withheld
    withheld: tuple[str, ...] = ()

    def select(self, imgs: Any) -> Any:
        """``[N, C, H, W]`` -> ``[N, k, H, W]``: the planned channels, in the planned order (withheld ones
        of a plain model zeroed: normalised images, so each is its train mean)."""
        out = imgs if self.data is None else imgs[:, list(self.data)]
        if self.zero:
            out = out.clone() if out is imgs else out
            out[:, list(self.zero)] = 0
        return out

    @property
    def withheld_as(self) -> str | None:
        """How the model went without the withheld channels: ``absent`` (a ChannelViT), ``zero`` (plain)."""
        return None if not self.withheld else "zero" if self.zero else "absent"

    def bind(self, model: Any) -> None:
        """Tell a ChannelViT (and only one) which of its channels the input holds."""
        target = getattr(model, "encoder", model)  # a linear probe wraps its encoder
        if hasattr(target, "channel_subset"):
            target.channel_subset = list(self.model) if self.model is not None else None


def plan_channels(where: str, selected: Sequence[str] | None, data_names: Sequence[str], arch: str, in_chans: int,
                  model_names: Sequence[str] | None = None, withheld: Sequence[str] | None = None) -> ChannelPlan:
    """The :class:`ChannelPlan` of a stage whose model ``arch`` takes ``in_chans`` channels (a ChannelViT:
    trained on ``model_names``, by default the data's when the counts agree) on data with ``data_names``;
    ``withheld``: of the channels it reads, those it must go without (see the module docstring)."""
    if withheld:
        return _withheld_plan(where, selected, list(data_names), arch, in_chans, model_names, list(withheld))
    data_names = list(data_names)
    names = list(selected) if selected else data_names
    unknown = [n for n in names if n not in data_names]
    if unknown:
        raise ValueError(f"{where}: channels: {unknown} are not channels of the data; it has {data_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: channels: {names} names a channel twice")
    data_idx = tuple(data_names.index(n) for n in names)
    if is_channelvit(arch):
        return _channelvit_plan(where, names, data_idx, data_names, in_chans, model_names)
    if len(names) != in_chans:
        chosen = f"channels: {names} selects {len(names)}" if selected else f"the data has {len(names)} ({names})"
        raise ValueError(f"{where}: {chosen} channels, but the model ({arch}) takes exactly in_chans={in_chans}: "
                         f"a plain ViT has one input per trained channel. Select {in_chans} channels, train the "
                         f"model on these (in_chans: {len(names)}), or use a ChannelViT (model: {{arch: "
                         f"{CHANNELVIT_EXAMPLE}}}), which takes any subset of its channels")
    return ChannelPlan(data_idx if selected else None, None, tuple(names))


def _withheld_plan(where: str, selected: Sequence[str] | None, data_names: list[str], arch: str, in_chans: int,
                   model_names: Sequence[str] | None, withheld: list[str]) -> ChannelPlan:
    reads = list(selected) if selected else data_names
    unknown = [n for n in withheld if n not in reads]
    if unknown:
        what = "the channels: it selects" if selected else "the data's channels"
        raise ValueError(f"{where}: withhold: {unknown} are not among {what} {reads}")
    if len(set(withheld)) != len(withheld):
        raise ValueError(f"{where}: withhold: {withheld} names a channel twice")
    if len(withheld) == len(reads):
        raise ValueError(f"{where}: withhold: {withheld} withholds every channel the model reads; keep at least one")
    if is_channelvit(arch):
        keep = [n for n in reads if n not in withheld]
        return replace(plan_channels(where, keep, data_names, arch, in_chans, model_names), withheld=tuple(withheld))
    plan = plan_channels(where, selected, data_names, arch, in_chans, model_names)
    return replace(plan, zero=tuple(plan.names.index(n) for n in withheld), withheld=tuple(withheld))


def _channelvit_plan(where: str, names: list[str], data_idx: tuple[int, ...], data_names: list[str], in_chans: int,
                     model_names: Sequence[str] | None) -> ChannelPlan:
    trained = list(model_names) if model_names else (data_names if len(data_names) == in_chans else None)
    if trained is None:
        raise ValueError(f"{where}: the ChannelViT was trained on {in_chans} channels and the data has "
                         f"{len(data_names)} ({data_names}); its export names none, so give the channels by name "
                         "from data with the model's channel layout")
    missing = [n for n in names if n not in trained]
    if missing:
        raise ValueError(f"{where}: channels {missing} are not among the ChannelViT's trained channels {trained}; "
                         "a ChannelViT takes any subset of those, and no other channel")
    model_idx = tuple(trained.index(n) for n in names)
    full = data_idx == tuple(range(len(data_names))) and model_idx == tuple(range(in_chans))
    return ChannelPlan(None, None, tuple(names)) if full else ChannelPlan(data_idx, model_idx, tuple(names))


def model_channel_plan(where: str, selected: Sequence[str] | None, config: dict[str, Any],
                       info: ChannelInfo | None, withheld: Sequence[str] | None = None) -> ChannelPlan:
    """:func:`plan_channels` for the export whose ``config.json`` is ``config`` on data described by ``info``."""
    names = ((config.get("vitforge") or {}).get("channels") or {}).get("names")
    in_chans = int(config["pretrained_cfg"]["input_size"][0])
    return plan_channels(where, selected, channel_names(info), config["architecture"], in_chans, names, withheld)


def export_channels(info: ChannelInfo | None, count: int, plan: ChannelPlan | None = None) -> dict[str, Any]:
    """What an export of a ``count``-channel model records about its channels (``config.json``
    ``vitforge.channels``: names, dtype, and the per-channel mean / std of the data's train split, in the
    data's units, which also go to its ``pretrained_cfg``). A plain model fine-tuned on ``channels:`` records
    those; a ChannelViT its trained channels plus ``input``, the subset it was fine-tuned on. {}: RGB images."""
    if info is None:
        return {}
    subset = plan is not None and plan.data is not None
    idx = list(plan.data) if subset and len(plan.data) == count else list(range(info.count))
    if len(idx) != count:
        return {}
    out: dict[str, Any] = {"names": [info.names[i] for i in idx], "dtype": info.dtype,
                           "mean": [info.mean[i] for i in idx], "std": [info.std[i] for i in idx]}
    if subset and plan.model is not None:
        out["input"] = list(plan.names)
    return out


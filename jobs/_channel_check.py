"""Before anything runs: can each finetune / eval stage's model take the channels its ``channels:`` names?

The rule is :func:`jobs._channels.plan_channels`; this applies it to a run spec as far as the spec and
finished stages tell (a prep's ``channels:``, manifests and exports already written), so a plain ViT
given a subset it cannot take is refused when the run starts, naming the fix.
"""

from __future__ import annotations

from typing import Any

from jobs._channels import channel_names, data_channels, is_channelvit, plan_channels
from jobs.export import read_export_config
def check_stage_channels(spec: Any) -> None:
    """Refuse, before any stage starts, a finetune or eval stage whose ``channels:`` its model cannot take,
    as far as the spec and finished stages tell (the rest is checked when the stage starts, with the
    same message)."""
    for i, stage in enumerate(spec.stages):
        selected, withheld = getattr(stage, "channels", None), getattr(stage, "withhold", None)
        if stage.kind not in ("finetune", "eval") or not (selected or withheld):
            continue
        data = _spec_data_names(spec, stage)
        refs = stage.models if stage.kind == "eval" else [stage.init] if isinstance(stage.init, str) else []
        for ref in refs:
            found = _spec_model(spec, ref)
            if found is None:
                continue
            arch, in_chans, names = found
            if in_chans is None or (data is None and (is_channelvit(arch) or not selected)):
                continue  # decided when the stage starts and reads its data
            field = "channels" if selected else "withhold"
            plan_channels(f"stages[{i}] ({stage.name}) > {field}, model {ref!r}", selected, data or selected, arch,
                          in_chans, names, withheld)


def _spec_data_names(spec: Any, stage: Any) -> list[str] | None:
    """The channel names of a stage's data: its prep's ``channels:``, else a manifest already written."""
    names = {s.name: s for s in spec.stages}
    prep = names.get(stage.data)
    if prep is not None and getattr(prep, "channels", None):
        return list(prep.channels)
    try:
        return channel_names(data_channels(spec.data_url(stage), spec.storage_options))
    except FileNotFoundError:
        return None


def _spec_model(spec: Any, ref: str, depth: int = 0) -> tuple[str, int | None, list[str] | None] | None:
    """(arch, in_chans or None when its data decides it, trained channel names) of a model a stage names."""
    stage = next((s for s in spec.stages if s.name == ref), None)
    if stage is None:
        try:
            config = read_export_config(spec.export_url(ref), spec.storage_options)
        except FileNotFoundError:
            return None
        return (config["architecture"], int(config["pretrained_cfg"]["input_size"][0]),
                ((config.get("vitforge") or {}).get("channels") or {}).get("names"))
    if isinstance(getattr(stage, "init", None), str) and stage.kind == "finetune" and depth < 8:
        return _spec_model(spec, stage.init, depth + 1)  # a fine-tune keeps its init's architecture
    model = getattr(stage, "model", None)
    if model is None or not hasattr(model, "in_chans"):
        return None
    if model.in_chans is not None:
        return model.arch, model.in_chans, None
    data = _spec_data_names(spec, stage) if getattr(stage, "data", None) else None
    return model.arch, (len(data) if data is not None else None), None

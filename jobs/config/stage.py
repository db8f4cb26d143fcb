"""A training stage resolved for its workers (:class:`StageJob`); what every worker runs: ``jobs/stage.py``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.config.train import TrainConfig
from jobs.config.kinds import config_class
from jobs._faults import FaultHooks

# Stage fields that name an earlier stage's export (or an export URL); a stage job carries each one
# resolved as ``<field>_url`` (pipeline/spec.py), which reaches the method as ``ctx.refs[<field>]``.
REFERENCE_FIELDS = ("init", "teacher")


class StageJob(BaseModel):
    """One training stage, resolved for its workers (the module docstring shows its JSON form)."""

    model_config = ConfigDict(extra="forbid")

    stage: dict[str, Any] = Field(description="the stage's spec mapping; its method's Config validates it")
    stage_url: str
    data_url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    launcher: Literal["ray", "torchrun", "local"] = "torchrun"
    methods: list[str] = Field(default_factory=list, description="plugin modules that register methods")
    init_url: str | None = None
    teacher_url: str | None = None
    cache_url: str | None = Field(default=None, description="a distill stage's teacher_outputs cache (targets: cached)")
    fault: FaultHooks | None = Field(default=None, description="tests only: step callbacks that kill a worker")
    lease: dict[str, Any] | None = Field(default=None, description="the run lease's fence (cluster/lease.py)")

    @property
    def refs(self) -> dict[str, str]:
        """The resolved references by field (``{"init": <export URL>}``), as ``StageContext.refs``."""
        return {f: url for f in (*REFERENCE_FIELDS, "cache") if (url := getattr(self, f"{f}_url"))}

    def config(self) -> TrainConfig:
        """The stage's config, validated by its kind's method (import :attr:`methods` first)."""
        return stage_config_class(self.stage["kind"]).model_validate(self.stage)

    def dump(self) -> dict[str, Any]:
        """The JSON-able form that travels to the workers (unset references and faults left out)."""
        return self.model_dump(mode="json", exclude_none=True)



def stage_config_class(kind: str) -> type:
    """The stage config class of training ``kind`` (its registered method's ``Config``)."""
    return config_class(kind)

"""The run spec: one YAML file, validated strictly before any work starts.

Every model forbids unknown keys, so a typo is an error that names its path
(``stages[1] (pretrain) > model > img_siz: unknown field``). Stages are a discriminated union on
``kind``; each training kind's fields live in its config module (``jobs/config/mae.py``'s
``MAEConfig``, re-exported by ``jobs/mae.py``), the prep fields in ``dataprep.options.PrepOptions``.
The training kinds are the registered ones (``jobs/config/kinds.py``): the built-ins, plus those of
the methods in the modules a spec names in ``methods:``, imported by :func:`parse_spec` before the
stages are validated (and by every worker).

Validation imports no torch, timm or torchvision (a typo is refused in well under two seconds);
what needs timm (the architecture exists, an ``init`` fits its model) is checked after it, by
:func:`pipeline._modelcheck.check_models` (the runner, ``vitforge validate``, ``--dry-run``).

    name: mae-digits
    storage: s3://my-bucket/runs          # run root = <storage>/<name>
    compute: {workers: 2, gpus_per_worker: 0, cpus_per_worker: 1}
    stages:
      - {name: data, kind: prep, source: ./digits, resize: 64, shard_size: 256}
      - {name: pretrain, kind: mae, data: data, model: {arch: vit_tiny_patch16_224, img_size: 32, patch_size: 4}}
"""

from __future__ import annotations

import os
import posixpath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, model_validator

from cluster.storage import credential_keys
from dataprep.options import PrepOptions
from jobs.config import config_classes, import_methods, training_kinds
from jobs.config.digest import json_digest
from jobs.config.evaluate import EvalConfig
from jobs.config.stage import REFERENCE_FIELDS, FaultHooks, StageJob
from jobs.config.teacher_outputs import TeacherOutputsConfig, check_cache_reference
from jobs.layout import RunLayout
from pipeline._specerrors import FieldError, did_you_mean, format_errors, where
from pipeline._specfile import SpecError, apply_overrides, read_yaml


class ComputeSpec(BaseModel):
    """The Ray Train gang each training stage runs on."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=2, ge=0, description="gang restarts (from the last checkpoint) before giving up")


class PrepStage(PrepOptions):
    """``kind: prep``: images -> WebDataset shards in ``<run>/stages/<name>/shards``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["prep"] = "prep"
    source: str = Field(description="image folder, list file or shards URL")

    def digest(self) -> str:
        """Digest of what shapes the shards: the output options and the source (not ``workers``)."""
        return json_digest({"options": self.output_options(), "source": self.source})


def _stage_union(configs: tuple[type, ...]) -> Any:
    return Annotated[Union[(PrepStage, *configs, EvalConfig, TeacherOutputsConfig)], Field(discriminator="kind")]


_BUILTIN_CONFIGS = config_classes()
Stage = _stage_union(_BUILTIN_CONFIGS)  # the built-in kinds; see spec_model() for plugins
TRAINING_KINDS = training_kinds()  # the built-in ones; is_training_kind() also knows plugins
INPUT_FIELDS = ("data", *REFERENCE_FIELDS, "cache")  # stage fields naming an earlier stage or a URL


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = Field(description="parent of the run root: s3://bucket/prefix, file:///path or a path")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="extra fsspec options (never secrets)")
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    methods: list[str] = Field(default_factory=list, description="modules defining methods of your own (dotted "
                               "import paths, importable on the driver and every worker)")
    stages: list[Stage] = Field(min_length=1)
    # where the spec came from, for later checks' messages (pipeline/_modelcheck.py): set by parse_spec
    _source: str = PrivateAttr(default="the spec")
    _lines: dict[tuple, int] | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        """Equal when the fields are: where a spec was read from is no part of it."""
        return isinstance(other, RunSpec) and self.model_dump() == other.model_dump()

    @model_validator(mode="after")
    def _no_secrets(self) -> "RunSpec":
        """The spec is stored in clear (run.yaml): credentials in storage_options are refused."""
        if found := credential_keys(self.storage_options):
            raise FieldError(
                ("storage_options",), f"{', '.join(found)}: credentials never go in a spec (it is stored in clear as the run's run.yaml). "
                "Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or AWS_PROFILE with a "
                "profile in ~/.aws/credentials, or use the machine's instance role")
        return self

    @model_validator(mode="after")
    def _stage_graph(self) -> "RunSpec":
        _check_cycles(self.stages)
        seen: dict[str, str] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise FieldError(("stages", i, "name"), f"duplicate stage name {stage.name!r}")
            data = getattr(stage, "data", None)
            if data is not None and not _is_url(data):
                if data not in seen:
                    raise FieldError(("stages", i, "data"), f"{data!r} is neither an earlier stage nor a URL/path "
                                     f"(use s3://…, file://…, /abs/path or ./rel/path){did_you_mean(data, seen)}")
                if seen[data] != "prep":
                    raise FieldError(("stages", i, "data"), f"stage {data!r} is a {seen[data]} stage, not a prep stage")
            _check_references(i, stage, seen)
            check_cache_reference(i, stage, {s.name: s for s in self.stages[:i]})
            _check_models(i, stage, seen)
            seen[stage.name] = stage.kind
        return self

    # ---- places in the store ---------------------------------------------------------------
    @property
    def run_root(self) -> str:
        storage = self.storage.rstrip("/")
        if "://" not in storage:
            storage = os.path.abspath(storage)
        return posixpath.join(storage, self.name)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_root)

    def stage_url(self, name: str) -> str:
        return self.layout.stage(name).url

    def stage(self, name: str) -> Any:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in run {self.name!r}; stages: {[s.name for s in self.stages]}")

    def data_url(self, stage: Any) -> str:
        """The manifest location a training stage reads."""
        data = stage.data
        if _is_url(data):
            return data if "://" in data else os.path.abspath(data)
        return self.layout.stage(data).shards

    def export_url(self, ref: str) -> str:
        """Where a reference (``init: pretrain``, ``teacher: s3://…/export``) points: a stage's export dir, or the URL."""
        if _is_url(ref):
            return ref if "://" in ref else os.path.abspath(os.path.expanduser(ref))
        return self.layout.stage(ref).export

    def stage_job(self, name: str, launcher: str, fault: dict[str, Any] | None = None) -> dict[str, Any]:
        """The job every worker of training stage ``name`` runs: a :class:`jobs.stage.StageJob`, dumped
        (JSON-able) once here; ``fault``: test-only :class:`jobs.stage.FaultHooks`."""
        stage = self.stage(name)
        if not is_training_kind(stage.kind):
            raise ValueError(f"stage {name!r} is a {stage.kind} stage, not a training stage")
        refs = {f"{f}_url": self.export_url(getattr(stage, f)) for f in REFERENCE_FIELDS
                if isinstance(getattr(stage, f, None), str)}
        if isinstance(getattr(stage, "cache", None), str):
            refs["cache_url"] = self.cache_url(stage.cache)
        return StageJob(stage=stage.model_dump(mode="json"), stage_url=self.stage_url(name),
                        data_url=self.data_url(stage), storage_options=self.storage_options, launcher=launcher,
                        methods=self.methods, fault=FaultHooks(**fault) if fault else None, **refs).dump()

    def cache_url(self, ref: str) -> str:
        """Where ``cache: REF`` points: a teacher_outputs stage's cache folder, or the URL."""
        if _is_url(ref):
            return ref if "://" in ref else os.path.abspath(os.path.expanduser(ref))
        return self.layout.stage(ref).cache

    def eval_job(self, name: str) -> dict[str, Any]:
        """The JSON-able job of eval stage ``name`` (see ``jobs/evaluate.py``): its models resolved to export URLs."""
        stage = self.stage(name)
        if stage.kind != "eval":
            raise ValueError(f"stage {name!r} is a {stage.kind} stage, not an eval stage")
        return {"stage": stage.model_dump(mode="json"), "stage_url": self.stage_url(name),
                "data_url": self.data_url(stage), "storage_options": self.storage_options,
                "methods": list(self.methods), "models": [self._model_ref(ref) for ref in stage.models]}

    def _model_ref(self, ref: str) -> dict[str, Any]:
        """An eval model: its export URL, plus the stage's kind and place when ``ref`` names a stage."""
        if _is_url(ref):
            return {"name": ref, "url": self.export_url(ref)}
        return {"name": ref, "url": self.export_url(ref), "kind": self.stage(ref).kind, "stage_url": self.stage_url(ref)}


_SPEC_MODELS: dict[tuple[type, ...], type[RunSpec]] = {}


def spec_model() -> type[RunSpec]:
    """:class:`RunSpec` with a stage union of every method registered now (plugins included)."""
    configs = config_classes()
    if configs == _BUILTIN_CONFIGS:
        return RunSpec
    if configs not in _SPEC_MODELS:
        _SPEC_MODELS[configs] = create_model("RunSpec", __base__=RunSpec,
                                             stages=(list[_stage_union(configs)], Field(min_length=1)))
    return _SPEC_MODELS[configs]


def is_training_kind(kind: str) -> bool:
    return kind in training_kinds()


def stage_inputs(stage: Any) -> list[str]:
    """The stage names or URLs a stage reads: ``data``, ``init``, ``teacher`` and ``models``."""
    refs = [getattr(stage, f, None) for f in INPUT_FIELDS]
    return [r for r in [*refs, *(getattr(stage, "models", None) or [])] if isinstance(r, str)]


def _check_cycles(stages: list[Any]) -> None:
    """Refuse a cycle (``a`` reads ``b`` reads ``a``) with the loop spelled out; stages run in spec order."""
    names = {s.name for s in stages}
    graph = {s.name: [r for r in stage_inputs(s) if r in names and not _is_url(r)] for s in stages}

    position = {s.name: i for i, s in enumerate(stages)}

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            loop = trail[trail.index(name):] + [name]
            raise FieldError(("stages", position[loop[0]]), f"stages form a cycle: {' -> '.join(loop)} (each stage may only read earlier stages)")
        for dep in graph[name]:
            visit(dep, [*trail, name])

    for s in stages:
        visit(s.name, [])
    for i, s in enumerate(stages):
        later_names = {t.name for t in stages[i + 1:]}
        later = [(field, ref) for field, ref in _named_inputs(s) if ref in later_names]
        if later:
            field, ref = later[0]
            raise FieldError(("stages", i, *field), f"{ref!r} is a later stage: stages run in spec order, so move "
                             f"{ref!r} before {s.name!r}")


def _named_inputs(stage: Any) -> list[tuple[tuple, str]]:
    """``(key path in the stage, value)`` of every input field of a stage (``("models", 1)`` for list items)."""
    found = [((f,), getattr(stage, f, None)) for f in INPUT_FIELDS]
    found += [(("models", j), m) for j, m in enumerate(getattr(stage, "models", None) or [])]
    return [(f, v) for f, v in found if isinstance(v, str)]


def _check_models(i: int, stage: Any, seen: dict[str, str]) -> None:
    """An eval stage's ``models`` name earlier training stages (their export) or export URLs/paths."""
    for j, ref in enumerate(getattr(stage, "models", None) or []):
        if _is_url(ref):
            continue
        if ref not in seen:
            raise FieldError(("stages", i, "models", j), f"{ref!r} is neither an earlier stage nor an export "
                             f"URL/path (use s3://…, file://…, /abs/path or ./rel/path){did_you_mean(ref, seen)}")
        if not is_training_kind(seen[ref]):
            raise FieldError(("stages", i, "models", j), f"stage {ref!r} is a {seen[ref]} stage; it exports no "
                             "model (name a training stage)")


def _check_references(i: int, stage: Any, seen: dict[str, str]) -> None:
    """``init`` / ``teacher`` name an earlier training stage (its export) or an export URL/path."""
    for field in REFERENCE_FIELDS:
        ref = getattr(stage, field, None)
        if not isinstance(ref, str) or _is_url(ref):
            continue
        if ref not in seen:
            raise FieldError(("stages", i, field), f"{ref!r} is neither an earlier stage nor an export URL/path "
                             f"(use s3://…, file://…, /abs/path or ./rel/path){did_you_mean(ref, seen)}")
        if not is_training_kind(seen[ref]):
            raise FieldError(("stages", i, field), f"stage {ref!r} is a {seen[ref]} stage; it exports no model "
                             "(name a training stage)")


def _is_url(value: str) -> bool:
    return "://" in value or value.startswith(("/", "./", "../", "~"))


def parse_spec(raw: Any, source: str = "the spec", lines: dict[tuple, int] | None = None) -> RunSpec:
    """Validate a spec mapping. ``lines`` (from :func:`pipeline._specfile.read_yaml`) adds file lines to errors."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    _import_spec_methods(raw, source, lines)
    try:
        model = spec_model()
        spec = model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source} is invalid:\n{format_errors(exc, raw, lines, model)}") from None
    spec._source, spec._lines = source, lines
    return spec


def _import_spec_methods(raw: dict[str, Any], source: str, lines: dict[tuple, int] | None) -> None:
    """Import the modules of the spec's ``methods:`` (their methods register their kinds) before validating."""
    modules = raw.get("methods") or []
    if not isinstance(modules, list):
        return  # validation names the field
    for i, name in enumerate(modules):
        if not isinstance(name, str):
            continue
        try:
            import_methods([name])
        except Exception as exc:
            raise SpecError(f"{source} is invalid:\n  methods[{i}]{where(lines, ('methods', i))}: cannot import {name!r}: "
                            f"{type(exc).__name__}: {exc}") from None


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read and validate a YAML run spec, with ``--set`` ``overrides`` (``stages.pretrain.epochs=2``) applied.

    :class:`SpecError` names every bad field (with its line in ``path`` where it has one).
    """
    raw, lines = read_yaml(path)
    raw = apply_overrides(raw, overrides, source=path, lines=lines)
    return parse_spec(raw, source=path, lines=lines)


def input_paths(spec: RunSpec) -> list[tuple[str, str]]:
    """``(field path, URL or path)`` of every input that is not an earlier stage of the run."""
    found = []
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.kind == "prep":
            found.append((f"{where} > source", stage.source))
        for field in INPUT_FIELDS:
            ref = getattr(stage, field, None)
            if isinstance(ref, str) and _is_url(ref):
                found.append((f"{where} > {field}", ref))
        for j, ref in enumerate(getattr(stage, "models", None) or []):
            if _is_url(ref):
                found.append((f"{where} > models[{j}]", ref))
    return found


def dump_spec(spec: RunSpec) -> str:
    data = spec.model_dump(mode="json", exclude_defaults=False)
    if not data["methods"]:
        del data["methods"]  # run.yaml of a spec without plugins reads as before
    return yaml.safe_dump(data, sort_keys=False)

"""Stage config of ``kind: teacher_outputs`` (what it does: ``jobs/teacher_cache.py``), and the check that a
distill stage's ``cache:`` was made for it."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ConfigDict, Field

from dataprep.mixing import Mix, MixFields

from jobs.config.digest import json_digest
from jobs.config.distill import TeacherWeights


class TeacherOutputsConfig(MixFields):
    """A ``kind: teacher_outputs`` stage (see ``jobs/teacher_cache.py``). ``mixup`` / ``cutmix``: the student's
    mixing settings; the teacher then sees each (epoch, sample)'s mixed image (``dataprep/mixing.py``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["teacher_outputs"] = "teacher_outputs"
    data: str = Field(description="an earlier prep stage, or a manifest URL / prep output directory")
    teacher: str | TeacherWeights = Field(description="an earlier training stage, an export URL/path, or timm + weights")
    epochs: int = Field(default=1, ge=1, description="how many epochs of targets, from epoch_start")
    epoch_start: int = Field(default=0, ge=0, description="first epoch (parts of a range may run on other clusters)")
    topk: int = Field(default=10, ge=1, description="classes kept per sample (all of them: exact targets)")
    temperature: float = Field(default=1.0, gt=0, description="the distillation temperature the log-probs are taken at")
    features: bool = Field(default=False, description="also store the teacher's pooled feature (fp16)")
    img_size: int = Field(default=224, ge=8, description="the student's input size (the crop the teacher sees)")
    crop_scale: tuple[float, float] = (0.2, 1.0)
    seed: int = Field(default=0, description="the student stage's seed (it seeds every sample's augmentation)")
    batch_size: int = Field(default=64, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def recipe(self) -> dict[str, Any]:
        """What shapes the augmented image of (epoch, sample): compared with the student's."""
        return student_recipe(self.img_size, self.crop_scale, self.seed, self.mix(self.seed))

    def teacher_ref(self) -> Any:
        return self.teacher if isinstance(self.teacher, str) else self.teacher.model_dump(mode="json")

    def digest(self) -> str:
        return json_digest(self.model_dump(mode="json", exclude={"batch_size"}))


def student_recipe(img_size: int, crop_scale: tuple[float, float] | list[float], seed: int,
                   mix: Mix | None = None) -> dict[str, Any]:
    """The augmentation recipe of a distill student (``mae_transform``: RandomResizedCrop + flip, bicubic;
    ``mix``: its mixup / cutmix, None when off)."""
    return {"transform": "random_resized_crop_flip_bicubic", "img_size": int(img_size),
            "crop_scale": [float(s) for s in crop_scale], "seed": int(seed),
            "mix": mix.recipe() if mix is not None else None}


def check_cache_reference(i: int, stage: Any, earlier: dict[str, Any]) -> None:
    """At spec time: a distill stage's ``cache: NAME`` is an earlier teacher_outputs stage made for its
    recipe, temperature, data, teacher and epochs (what differs is named)."""
    ref = getattr(stage, "cache", None)
    if not isinstance(ref, str) or "://" in ref or ref.startswith(("/", "./", "../", "~")):
        return
    where = f"stages[{i}] ({stage.name}) > cache"
    cache = earlier.get(ref)
    if cache is None or cache.kind != "teacher_outputs":
        raise ValueError(f"{where}: {ref!r} is not an earlier teacher_outputs stage" +
                         (f" (it is a {cache.kind} stage)" if cache is not None else ""))
    have = {"recipe": cache.recipe(), "temperature": cache.temperature, "teacher": cache.teacher_ref()}
    diffs = [f"recipe.{k}: cache {have['recipe'].get(k)!r}, student {v!r}"
             for k, v in cache_expectations(stage)["recipe"].items() if have["recipe"].get(k) != v]
    for key, want in cache_expectations(stage).items():
        if key != "recipe" and have[key] != want:
            diffs.append(f"{key}: cache {have[key]!r}, student {want!r}")
    if cache.data != stage.data:
        diffs.append(f"data: cache {cache.data!r}, student {stage.data!r}")
    if stage.max_steps is None and (cache.epoch_start > 0 or cache.epochs < math.ceil(stage.epochs - 1e-9)):
        diffs.append(f"epochs: cache [{cache.epoch_start}, {cache.epoch_start + cache.epochs}), student "
                     f"[0, {math.ceil(stage.epochs - 1e-9)})")
    if diffs:
        raise ValueError(f"{where}: stage {ref!r} made its targets for another setting; differs: {'; '.join(diffs)}")



def cache_expectations(cfg: Any, data_dig: str | None = None) -> dict[str, Any]:
    """What the cache must match for student ``cfg``: recipe, temperature, teacher (if named), data."""
    expect: dict[str, Any] = {"recipe": student_recipe(cfg.model.img_size, cfg.crop_scale, cfg.seed, cfg.mix(cfg.seed)),
                              "temperature": cfg.loss.temperature}
    if cfg.teacher is not None:
        expect["teacher"] = cfg.teacher.model_dump(mode="json") if isinstance(cfg.teacher, TeacherWeights) \
            else cfg.teacher
    if data_dig is not None:
        expect["data_digest"] = data_dig
    return expect


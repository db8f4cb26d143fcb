"""The method contract (``jobs/method.py``): a method of one's own in one file, run by ``vitforge run``,
and a method the engine could not run refused when its class is created, naming the hook.

The throwaway method lives in this file and nowhere else: the run spec names this module in its
``methods:`` list, so the driver and the Ray worker import it (which registers ``kind: toy_energy``).
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field
from typer.testing import CliRunner

from cluster.storage import Store
from jobs.metrics import read_metrics
from dataprep.transforms import mae_transform
from jobs.engine import TrainConfig
from jobs.method import Method, method_class
from jobs.models import build_encoder
from pipeline.cli import app
from pipeline.spec import SpecError, parse_spec
from tests._train_util import TINY_MODEL

THIS_MODULE = "tests.test_method_plugin"


class ToyEnergyConfig(TrainConfig):
    """``kind: toy_energy``: shrink the encoder's pooled features towards zero (a loss with no labels)."""

    kind: Literal["toy_energy"] = "toy_energy"
    scale: float = Field(default=1.0, gt=0)


class ToyEnergy(Method):
    Config = ToyEnergyConfig

    def build_model(self) -> torch.nn.Module:
        return build_encoder(self.cfg.model)  # a timm ViT: the default export writes it as is

    def train_transform(self):
        return mae_transform(self.cfg.model.img_size)

    def step(self, model, batch, step):
        feats = model(batch["image"])  # [N, D]
        return self.cfg.scale * feats.float().pow(2).mean(), {"feature_norm": float(feats.detach().norm(dim=1).mean())}

    def encoder(self, model):
        return model


def spec_mapping(storage: str, source: str) -> dict:
    return {
        "name": "toy", "storage": storage, "compute": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "methods": [THIS_MODULE],
        "stages": [
            {"name": "data", "kind": "prep", "source": source, "format": "png", "shard_size": 16, "val_fraction": 0.2},
            {"name": "toy", "kind": "toy_energy", "data": "data", "model": TINY_MODEL, "scale": 0.5, "max_steps": 3,
             "batch_size": 8, "loader_workers": 0, "zero_stage": 2, "checkpoint": {"every_steps": 2}},
        ],
    }


def test_a_spec_naming_a_methods_module_validates_its_kind_and_field_paths(tmp_path):
    spec = parse_spec(spec_mapping(str(tmp_path), "./images"))
    assert spec.stage("toy").kind == "toy_energy" and spec.stage("toy").scale == 0.5
    assert spec.stage_job("toy", launcher="ray")["methods"] == [THIS_MODULE]
    bad = spec_mapping(str(tmp_path), "./images")
    bad["stages"][1]["scael"] = 2
    with pytest.raises(SpecError, match=r"stages\[1\] \(toy\) > scael: Extra inputs are not permitted"):
        parse_spec(bad)
    missing = {**spec_mapping(str(tmp_path), "./images"), "methods": ["tests.no_such_module"]}
    with pytest.raises(SpecError, match=r"methods\[0\]: cannot import 'tests.no_such_module'"):
        parse_spec(missing)


def test_a_method_defined_in_a_test_file_runs_through_vitforge_run_on_a_one_worker_gang(
        tmp_path, s3_url, images_dir, ray_local):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec_mapping(s3_url, images_dir), sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    stage = Store(f"{s3_url}/toy/stages/toy")
    status = stage.get_json("STATUS.json")
    assert status["state"] == "done" and status["kind"] == "toy_energy" and status["step"] == 3
    records = read_metrics(stage)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["feature_norm"] > 0 for r in records)
    config = stage.get_json("export/config.json")
    assert config["architecture"] == TINY_MODEL["arch"]


def test_a_method_missing_a_required_hook_is_refused_at_class_creation_naming_the_hook():
    class NoStepConfig(TrainConfig):
        kind: Literal["toy_no_step"] = "toy_no_step"

    with pytest.raises(TypeError, match=r"does not define step\(\)"):
        class NoStep(Method):  # noqa: F841
            Config = NoStepConfig

            def build_model(self):
                return torch.nn.Linear(2, 2)

            def train_transform(self):
                return None

            def encoder(self, model):
                return model

    class NoExportConfig(TrainConfig):
        kind: Literal["toy_no_export"] = "toy_no_export"

    with pytest.raises(TypeError, match=r"defines neither encoder\(\) nor export\(\)"):
        class NoExport(Method):  # noqa: F841
            Config = NoExportConfig

            def build_model(self):
                return torch.nn.Linear(2, 2)

            def train_transform(self):
                return None

            def step(self, model, batch, step):
                return torch.zeros(()), {}

    with pytest.raises(ValueError, match="unknown training stage kind 'toy_no_step'"):
        method_class("toy_no_step")  # nothing half-registered


def test_a_second_class_cannot_take_a_registered_kind():
    class ImpostorConfig(TrainConfig):
        kind: Literal["mae"] = "mae"

    with pytest.raises(TypeError, match="method kind 'mae' is already registered by jobs.mae.MAEMethod"):
        class Impostor(ToyEnergy):  # noqa: F841
            Config = ImpostorConfig
    assert method_class("mae").__qualname__ == "MAEMethod"

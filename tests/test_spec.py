"""The run spec as a user meets it: `vitforge run SPEC [--set k=v]` refuses a bad spec with exit
status 2, a message naming the field path (and its line in the file), and nothing written to storage.

In-process through the real typer app (no Ray needed: refusals happen before any work starts).
"""

from __future__ import annotations

import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from cluster.storage import Store
from pipeline.cli import app
from pipeline.spec import SpecError, load_spec

TINY = "{arch: vit_tiny_patch16_224, img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 4}"


def spec_text(storage: str, source: str, pretrain_extra: str = "", probe_init: str = "pretrain") -> str:
    return textwrap.dedent(f"""\
        name: specrun
        storage: {storage}
        compute: {{workers: 1, cpus_per_worker: 1}}
        stages:
          - {{name: data, kind: prep, source: {source}, format: png, shard_size: 20}}
          - name: pretrain
            kind: mae
            data: data
            model: {TINY}
            epochs: 1{pretrain_extra}
          - {{name: probe, kind: finetune, mode: linear, data: data, init: {probe_init}}}
        """)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def write(tmp_path, images_dir):
    def _write(storage: str, **kw) -> str:
        path = tmp_path / "spec.yaml"
        path.write_text(spec_text(storage, kw.pop("source", images_dir), **kw))
        return str(path)
    return _write


def assert_refused(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def assert_nothing_written(run_root: str) -> None:
    store = Store(run_root)
    assert store.ls("") == [] and not store.exists("run.yaml"), store.ls("")


def test_unknown_key_is_refused_with_its_path_and_line_and_nothing_is_written(write, s3_url):
    path = write(s3_url, pretrain_extra="\n" + " " * 12 + "epochz: 3")
    result = cli("run", path)
    assert_refused(result, "stages[1] (pretrain) > epochz (line 11)", "Extra inputs are not permitted")
    assert_nothing_written(f"{s3_url}/specrun")


def test_wrong_type_from_the_command_line_names_the_set_path(write, s3_url):
    result = cli("run", write(s3_url), "--set", "stages.pretrain.epochs=many")
    assert_refused(result, "stages[1] (pretrain) > epochs (--set)", "valid number")
    assert_nothing_written(f"{s3_url}/specrun")


def test_dangling_reference_is_refused(write, s3_url):
    result = cli("run", write(s3_url, probe_init="pretrian"))
    assert_refused(result, "stages[2] (probe) > init (line 11): 'pretrian' is neither an earlier stage",
                   "did you mean 'pretrain'?")
    assert_nothing_written(f"{s3_url}/specrun")


def test_cycle_is_refused_with_the_loop_spelled_out(write, s3_url):
    result = cli("run", write(s3_url), "--set", "stages.data.kind=mae", "--set", "stages.data.data=probe",
                 "--set", "stages.data.source=null")
    assert result.exit_code == 2, result.output
    result = cli("run", write(s3_url), "--set", "stages.pretrain.data=probe")
    assert_refused(result, "cycle: pretrain -> probe -> pretrain")
    assert_nothing_written(f"{s3_url}/specrun")


def test_missing_local_source_is_refused(write, s3_url, tmp_path):
    result = cli("run", write(s3_url, source=str(tmp_path / "no-such-folder")))
    assert_refused(result, "stages[0] (data) > source", "no-such-folder does not exist")
    assert_nothing_written(f"{s3_url}/specrun")


def test_missing_s3_source_is_refused_before_anything_is_written(write, s3_url):
    result = cli("run", write(s3_url, source=f"{s3_url}-images/none"))
    assert_refused(result, "stages[0] (data) > source", "does not exist")
    assert_nothing_written(f"{s3_url}/specrun")


def test_unknown_stage_in_set_names_the_stages(write, s3_url):
    result = cli("run", write(s3_url), "--set", "stages.pretrian.epochs=2")
    assert_refused(result, "--set stages.pretrian.epochs", "no stage named 'pretrian'", "data, pretrain, probe")


def test_set_overrides_take_yaml_typed_values_and_address_stages_by_name(write, tmp_path):
    spec = load_spec(write(str(tmp_path / "runs")), overrides=[
        "stages.pretrain.epochs=2", "stages.pretrain.optim.base_lr=1e-3", "compute.workers=3",
        "stages.pretrain.model.depth=3", "stages.1.batch_size=16", "storage_options={anon: false}"])
    pretrain = spec.stage("pretrain")
    assert (pretrain.epochs, pretrain.optim.base_lr, pretrain.model.depth, pretrain.batch_size) == (2, 1e-3, 3, 16)
    assert spec.compute.workers == 3 and spec.storage_options == {"anon": False}
    assert pretrain.model.embed_dim == 64  # siblings of an overridden key are kept


def test_set_on_a_stage_built_from_a_yaml_anchor_changes_only_that_stage(tmp_path, images_dir):
    """``<<: *anchor`` shares nested mappings between stages; a --set on one must not reach the other."""
    path = tmp_path / "anchored.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: anchored
        storage: {tmp_path / "runs"}
        stages:
          - {{name: data, kind: prep, source: {images_dir}, format: png}}
          - &ft {{name: a, kind: finetune, data: data, model: {TINY}, optim: {{base_lr: 1.0e-3}}}}
          - {{<<: *ft, name: b}}
        """))
    spec = load_spec(str(path), overrides=["stages.a.optim.base_lr=4e-3", "stages.a.model.depth=3"])
    assert (spec.stage("a").optim.base_lr, spec.stage("a").model.depth) == (4e-3, 3)
    assert (spec.stage("b").optim.base_lr, spec.stage("b").model.depth) == (1e-3, 2)


def test_invalid_yaml_and_missing_file_are_spec_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML") as err:
        load_spec(str(bad))
    assert f'in "{bad}", line 2' in str(err.value) and "<unicode string>" not in str(err.value)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(str(tmp_path / "absent.yaml"))


def test_run_yaml_round_trips_through_the_loader(write, tmp_path):
    from pipeline.spec import dump_spec, parse_spec

    spec = load_spec(write(str(tmp_path / "runs")))
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec


def test_near_misses_of_keys_kinds_values_and_stage_names_are_suggested_with_their_lines(write, s3_url):
    path = write(s3_url, pretrain_extra="\n" + " " * 12 + "optim: {base_lrr: 0.1}\n" + " " * 12 + "precision: bf61")
    result = cli("run", path, "--set", "stages.probe.kind=finetun")
    assert_refused(result, "stages[1] (pretrain) > optim > base_lrr (line 11)", "did you mean 'base_lr'?",
                   "stages[1] (pretrain) > precision (line 12)", "did you mean 'bf16'?",
                   "stages[2] (probe) > kind (--set)", "did you mean 'finetune'?")
    typo = cli("run", write(s3_url), "--set", "stages.pretrain.data=dta")
    assert_refused(typo, "stages[1] (pretrain) > data (--set): 'dta' is neither", "did you mean 'data'?")
    loop = cli("run", write(s3_url), "--set", "stages.pretrain.data=probe")
    assert_refused(loop, "stages[1] (pretrain) (line 6): stages form a cycle")
    assert_nothing_written(f"{s3_url}/specrun")

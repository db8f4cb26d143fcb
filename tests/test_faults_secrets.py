"""Fault suite, secrets never persist (issue 14 point 9): credentials in ``storage_options`` are
refused before anything is written; storage_options (and an endpoint in them) may change between
launches of one run without making it "a different spec"."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from cluster.storage import Store
from pipeline._plan import plan_run, record_spec
from pipeline.cli import app
from pipeline.spec import RunSpec
from jobs.layout import StageStatus

pytestmark = pytest.mark.faults

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _doc(storage: str, **opts) -> dict:
    return {"name": "sec", "storage": storage, "storage_options": opts,
            "stages": [{"name": "data", "kind": "prep", "source": "./nowhere", "resize": 8}]}


@pytest.mark.parametrize("opts", [{"secret": SECRET}, {"key": "AKIA", "secret": SECRET},
                                  {"client_kwargs": {"aws_secret_access_key": SECRET}},
                                  {"config_kwargs": {"session_token": SECRET}}],
                         ids=["s3fs-secret", "s3fs-key", "botocore-client-kwargs", "nested-token"])
def test_credentials_in_storage_options_are_refused_pointing_to_aws_variables_and_nothing_is_written(
        s3, s3_url, tmp_path, opts):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_doc(s3_url, **opts)))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert "storage_options." in result.output and "AWS_ACCESS_KEY_ID" in result.output and "AWS_PROFILE" in result.output
    assert SECRET not in result.output
    assert Store(s3_url).ls() == []


def test_changed_storage_options_and_endpoint_are_not_a_different_run(s3, s3_url):
    first = RunSpec.model_validate(_doc(s3_url))
    record_spec(first)
    StageStatus(first.stage_url("data")).update(state="running", kind="prep")  # started: changes are checked
    later = RunSpec.model_validate(_doc(s3_url, client_kwargs={"endpoint_url": s3.endpoint},
                                        config_kwargs={"read_timeout": 30}))
    assert plan_run(later).first_launch is False  # no RunConflictError
    changed = RunSpec.model_validate({**_doc(s3_url), "stages": [
        {"name": "data", "kind": "prep", "source": "./nowhere", "resize": 16}]})
    with pytest.raises(Exception, match="stages.data.resize"):  # a real change still is
        plan_run(changed)

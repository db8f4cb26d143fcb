"""The cluster examples parse, pin the same Ray as pyproject.toml, and run valid vitforge commands on valid specs."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import typer
import yaml

from pipeline.cli import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "cluster", "examples")


def ray_pin() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', f.read()).group(1)


def load(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name)) as f:
        return yaml.safe_load(f)


def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """Parse ``vitforge ARGV`` as the CLI would (unknown commands/options raise); (command, its params)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("vitforge", list(argv), resilient_parsing=True)
    command = group.get_command(ctx, argv[0])
    assert command is not None, f"`vitforge {argv[0]}` is not a command of our CLI"
    sub = command.make_context(argv[0], list(argv[1:]), parent=ctx)
    return argv[0], sub.params


def vitforge_args(command: str) -> list[str]:
    """``python -m pipeline.cli ARGS`` or ``vitforge ARGS`` -> ARGS."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pipeline.cli"]:
        return words[3:]
    assert words[0] == "vitforge", f"not a vitforge command: {command}"
    return words[1:]


def check_spec_command(argv: list[str]) -> None:
    """The command names a spec in this repository that validates with its --set overrides."""
    from pipeline.spec import load_spec

    name, params = parse_cli(argv)
    assert name in ("run", "submit")
    path = os.path.join(ROOT, params["spec"])
    assert os.path.isfile(path), f"{params['spec']} is not a file of this repository"
    spec = load_spec(path, overrides=list(params.get("set_") or ()))
    assert spec.compute.gpus_per_worker >= 1  # a GPU cluster spec


def test_rayjob_manifest_runs_a_repo_spec_on_gpu_workers():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = vitforge_args(job["spec"]["entrypoint"])
    assert argv[0] == "run"
    check_spec_command(argv)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin()
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert gpus and all(n >= 1 for n in gpus)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/vitforge"  # where the Dockerfile puts the repository


def test_ray_up_cluster_installs_this_repo_and_its_documented_commands_are_valid():
    cfg = load("ray-cluster.yaml")
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_pin()}-")
    assert cfg["file_mounts"]["~/vitforge"] == "."
    assert any("pip install" in c and "-e ~/vitforge" in c for c in cfg["setup_commands"])
    gpu_nodes = [t for t in cfg["available_node_types"].values() if t["node_config"]["InstanceType"].startswith(("p", "g"))]
    assert gpu_nodes
    with open(os.path.join(EXAMPLES, "ray-cluster.yaml")) as f:
        commands = [m.group(1) for line in f if (m := re.match(r"#\s+(vitforge .+)$", line.rstrip()))]
    assert [vitforge_args(c)[0] for c in commands] == ["submit", "status", "report"]
    check_spec_command(vitforge_args(commands[0]))
    for command in commands[1:]:
        parse_cli(vitforge_args(command))


def test_dockerfile_pins_the_same_ray_and_installs_the_repo():
    with open(os.path.join(EXAMPLES, "Dockerfile")) as f:
        text = f.read()
    assert f"FROM rayproject/ray:{ray_pin()}-" in text
    assert "pip install --no-cache-dir -e ." in text
    for package in ("cluster", "dataprep", "jobs", "pipeline", "configs"):
        assert f"COPY --chown=ray:users {package} ./{package}" in text


def test_an_invalid_command_is_caught_by_the_checker():
    with pytest.raises(Exception, match="No such option"):
        parse_cli(["run", "configs/mae-vitb16-imagenet.yaml", "--no-such-option"])
    with pytest.raises(AssertionError):
        parse_cli(["no-such-command"])

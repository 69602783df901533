"""deploy/: the files parse, and the commands they run exist with valid flags."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from atlasdgd.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _check_command(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "atlasdgd", command
    build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown flag


def test_rayjob_manifest_runs_a_valid_train_command():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_command(job["spec"]["entrypoint"])
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    cpus = int(workers["rayStartParams"]["num-cpus"])
    assert args.workers <= workers["replicas"] * cpus  # the job fits the cluster it asks for
    assert args.data.startswith("s3://") and args.out.startswith("s3://")


def test_cluster_launcher_config_is_valid_for_ray_and_its_job_command_too():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (DEPLOY / "cluster.yaml").read_text()
    validate_config(prepare_config(yaml.safe_load(text)))
    commands = re.findall(r"-- (atlasdgd .+)$", text, flags=re.M)
    assert commands
    for command in commands:
        _check_command(command)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_pin_torch_like_the_project_and_run_the_cli(name):
    text = (DEPLOY / name).read_text()
    # the package takes ranges (issue 14); the development environment's pin lives in the Makefile
    makefile = (DEPLOY.parent / "Makefile").read_text()
    pin = re.search(r"torch==([\d.]+)", makefile).group(1)
    assert "torch==" not in (DEPLOY.parent / "pyproject.toml").read_text()
    assert f"torch=={pin}" in text
    assert 'ENTRYPOINT ["atlasdgd"]' in text
    assert re.search(r"^FROM \S+", text, flags=re.M)


def test_guide_commands_are_valid():
    text = (DEPLOY / "README.md").read_text()
    commands = [c for c in re.findall(r"^\s+(atlasdgd .+)$", text, flags=re.M)]
    assert commands
    for command in commands:
        _check_command(command)

"""cluster.yaml is a config `ray up` accepts, and it scales GPU workers from zero."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_rays_schema(config):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_gpu_workers_scale_from_zero(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers a GPU"
    assert config["head_node_type"] not in gpu_types
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0
        assert node_type["max_workers"] >= 1
        assert node_type["max_workers"] <= config["max_workers"]
    assert head["resources"].get("GPU") == 0, "the head must advertise GPU: 0 so no training lands on it"
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]


def test_setup_installs_this_project(config):
    mounts = {remote: (ROOT / local).resolve() for remote, local in config["file_mounts"].items()}
    assert mounts["~/ssm"] == ROOT, "run `ray up` from the project root so '.' is the project"
    assert (mounts["~/ssm"] / "pyproject.toml").exists()
    assert any(cmd.strip() == "pip install -e ~/ssm" for cmd in config["setup_commands"])
    # The project must be installed after the environment is activated and Ray is installed.
    commands = config["setup_commands"]
    install = next(i for i, c in enumerate(commands) if "~/ssm" in c)
    assert all("~/ssm" not in c for c in commands[:install])
    assert any("ray[" in c for c in commands[:install])

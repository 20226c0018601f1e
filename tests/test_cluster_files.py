"""cluster/: the launcher YAML is valid for Ray's cluster launcher; the script's usage is sound."""

import json
import os
import subprocess

import pytest
import yaml

from .conftest import ROOT

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")


def ray_cluster_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def test_cloud_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, ray_cluster_schema())
    assert "gpu" in config["docker"]["image"] and ray.__version__ in config["docker"]["image"]


def test_broken_cluster_yaml_is_caught():
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    config["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


def test_cluster_script_usage_and_env():
    script = ROOT / "cluster" / "ray-cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "local" in usage.stdout
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/tmp/x/token"}
    out = subprocess.run(["bash", str(script), "env", "10.1.2.3"], capture_output=True, text=True, env=env).stdout
    assert "RAY_ADDRESS=http://10.1.2.3:8265" in out and "RAY_AUTH_MODE=token" in out and "/tmp/x/token" in out

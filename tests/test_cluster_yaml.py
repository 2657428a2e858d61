"""cluster.yaml is a valid Ray cluster launcher config (schema and Ray's own checks, offline) and
secure by default: token auth on every node, the job server on 127.0.0.1, storage rights on every
node that writes, versions pinned to what the client runs."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))
    validate_config(prepare_config(cluster))  # merges provider defaults; checks head_node_type
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_every_node_starts_ray_with_token_auth_and_has_the_token(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    mounts = cluster["file_mounts"]
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cluster["setup_commands"])


def test_the_job_server_listens_on_loopback_only(cluster):
    (head,) = (c for c in cluster["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in yaml.safe_dump(cluster)


def test_cpu_data_nodes_and_gpu_train_nodes_all_with_storage_rights(cluster):
    types = cluster["available_node_types"]
    gpu = [n for n, t in types.items() if t["node_config"]["InstanceType"].startswith(("p", "g"))]
    cpu = [n for n, t in types.items() if n not in gpu and n != cluster["head_node_type"]]
    assert gpu and cpu
    for name, node in types.items():  # every node may be rank 0 or write results
        assert node["node_config"].get("IamInstanceProfile"), name


def test_nodes_install_pinned_versions_that_match_the_client(cluster):
    lock = ROOT / "requirements-cluster.txt"
    assert any(lock.name in c and "-r" in c for c in cluster["setup_commands"])
    assert any("--no-deps" in c and "psm-pose" in c for c in cluster["setup_commands"])
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, ver = line.partition("==")
            assert sep and ver, f"{lock.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name.lower())] = ver
    # every dependency pinned at a version pyproject.toml accepts
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", pyproject, re.S).group(1)
    for dep in re.findall(r'"([^"]+)"', deps):
        requirement = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", requirement.name.lower())
        assert name in pins, f"{dep} missing from {lock.name}"
        assert requirement.specifier.contains(pins[name]), f"{lock.name}: {name}=={pins[name]}"

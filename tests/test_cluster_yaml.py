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


def _policy(name: str) -> dict[str, set[str]]:
    """iam/NAME.json as {action: resources}."""
    granted: dict[str, set[str]] = {}
    for statement in json.loads((ROOT / "iam" / f"{name}.json").read_text())["Statement"]:
        assert statement["Effect"] == "Allow", statement
        resources = statement["Resource"]
        for action in (
            [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        ):
            granted.setdefault(action, set()).update(
                [resources] if isinstance(resources, str) else resources
            )
    return granted


# what Ray 2.60's AWS node provider calls on the head to bring up and end workers
# (ray/autoscaler/_private/aws/node_provider.py: describe_instance_types, instances.filter,
# create_instances with the workers' profile, create_tags, terminate, describe_images)
AUTOSCALER = {
    "ec2:DescribeInstanceTypes", "ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags",
    "ec2:TerminateInstances", "ec2:DescribeImages", "iam:PassRole",
}  # fmt: skip


def test_the_head_launches_workers_that_get_only_bucket_rights(cluster):
    """One profile for all once meant either no worker could start (no EC2 rights on the head)
    or every job's code could launch instances (EC2 rights on every node)."""
    types = cluster["available_node_types"]
    profile = {n: t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items()}
    head = profile.pop(cluster["head_node_type"])
    gpu = [n for n, t in types.items() if t["node_config"]["InstanceType"].startswith(("p", "g"))]
    assert gpu and set(profile) - set(gpu), "a GPU worker type and a CPU worker type"
    assert set(profile.values()) == {"psm-pose-worker"} and head == "psm-pose-head"

    head_rights, worker_rights = _policy("head-policy"), _policy("worker-policy")
    assert AUTOSCALER <= head_rights.keys()
    # the head passes the workers' role, and no other
    assert head_rights["iam:PassRole"] == {"arn:aws:iam::ACCOUNT_ID:role/psm-pose-worker"}
    assert {a.split(":")[0] for a in worker_rights} == {"s3"}  # no EC2, no IAM
    assert worker_rights["s3:GetObject"] == {
        f"arn:aws:s3:::BUCKET/{p}/*" for p in ("coco", "runs", "results")
    }
    assert worker_rights["s3:PutObject"] == {
        f"arn:aws:s3:::BUCKET/{p}/*" for p in ("runs", "results")
    }
    # job drivers run on the head: it has the workers' bucket rights too
    assert all(head_rights[a] == r for a, r in worker_rights.items())
    trust = json.loads((ROOT / "iam" / "ec2-trust-policy.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_ssh_only_from_the_users_address_and_only_the_repo_is_shipped(cluster):
    [rule] = cluster["provider"]["security_group"]["IpPermissions"]
    assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == ["SET-YOUR-IP/32"]  # ray up fails until set
    assert cluster["rsync_filter"] == [".gitignore"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "runs/", "mlflow.db", "mlartifacts/", "data/"} <= set(ignored)


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

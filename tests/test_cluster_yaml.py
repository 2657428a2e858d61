"""cluster.yaml is a valid Ray cluster launcher config (schema and Ray's own checks, offline)."""

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    validate_config(prepare_config(cfg))  # merges provider defaults; checks head_node_type etc.
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install" in c and "psm-pose" in c for c in cfg["setup_commands"])

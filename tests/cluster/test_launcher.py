"""cluster/aws.yaml and cluster/gcp.yaml pass the Ray cluster launcher's own validation.

`AutoscalingConfig` is what `ray up` (autoscaler v2, the default in Ray 2.60) builds from the YAML:
`prepare_config` merges the provider defaults, then `validate_config` checks the result against the
`ray-schema.json` shipped inside the installed ray package. No cloud credentials are needed.
"""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

from tests.cluster.cluster_helpers import LAUNCHER_YAMLS, load_yaml

ids = [p.name for p in LAUNCHER_YAMLS]


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=ids)
def test_raw_yaml_matches_ray_schema(path):
    """The file as written, before defaults: unknown keys are errors (additionalProperties: false)."""
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(load_yaml(path), json.load(f))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=ids)
def test_ray_validator_accepts_prepared_config(path):
    validate_config(prepare_config(load_yaml(path)))
    node_types = AutoscalingConfig(load_yaml(path), skip_content_hash=True).get_node_type_configs()
    assert set(node_types) == set(load_yaml(path)["available_node_types"])


def test_validator_is_not_vacuous():
    """A misspelt key must fail, or the two tests above prove nothing."""
    config = load_yaml(LAUNCHER_YAMLS[0])
    config["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=ids)
def test_cluster_shape(path, roles):
    """Head does no work; every worker type scales from zero; each role has spot and on-demand types."""
    label, _ = roles
    config = load_yaml(path)
    provider = config["provider"]["type"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head must advertise CPU: 0 so no task lands on it"
    assert config["idle_timeout_minutes"] > 0

    markets: dict[str, set[bool]] = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        assert node_type.get("min_workers", 0) == 0, f"{path.name}: {name} must scale from 0"
        assert node_type["max_workers"] >= 1, f"{path.name}: {name} can never start"
        markets.setdefault(node_type["labels"][label], set()).add(
            _is_spot(provider, node_type["node_config"])
        )
    assert markets == {"decode": {True, False}, "encode": {True, False}, "train": {True, False}}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=ids)
def test_keys_a_user_must_touch_are_marked(path):
    """The README promises that every key to edit before `ray up` carries a `# TOUCH` comment."""
    text = path.read_text()
    must_touch = ["cluster_name", "max_workers", "region", "availability_zone", "image"]
    if load_yaml(path)["provider"]["type"] == "gcp":
        must_touch.append("project_id")
    for key in must_touch:
        assert re.search(rf"^\s*{key}:.*# TOUCH", text, re.M), (
            f"{path.name}: `{key}` lacks a '# TOUCH' comment"
        )

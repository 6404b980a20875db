"""Every node type advertises exactly its role's custom resource (cluster/resources.yaml).

This is what makes placement work: pipeline encode actors ask for {GPU: 1, encode_gpu: 1} and Ray
Train workers for {GPU: 1, train_gpu: 1}, so a node type that advertised the wrong name or amount
would either never receive its work or take another stage's.
"""

from __future__ import annotations

import pytest
from ray._private.label_utils import validate_node_label_syntax
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from tests.cluster.cluster_helpers import CLUSTER, LAUNCHER_YAMLS, load_yaml

BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def _node_types() -> list[tuple[str, dict]]:
    """(where, autoscaler node type) for every launcher node type and every KubeRay group."""
    found = []
    for path in LAUNCHER_YAMLS:
        for name, node_type in load_yaml(path)["available_node_types"].items():
            found.append((f"{path.name}:{name}", node_type))
    cr = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    cr["metadata"].setdefault("namespace", "default")
    # Ray's own reading of the CR: the resources and labels its autoscaler will plan with.
    for name, node_type in _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"].items():
        found.append((f"raycluster.yaml:{name}", node_type))
    return found


NODE_TYPES = _node_types()


def test_role_table_is_well_formed(roles):
    label, table = roles
    validate_node_label_syntax({label: "head"})
    assert set(table) == {"head", "decode", "encode", "train"}
    names = [entry["resource"] for role, entry in table.items() if role != "head"]
    assert len(set(names)) == len(names), f"two roles share a resource name: {names}"
    assert table["head"]["resource"] is None
    for role in ("decode", "encode", "train"):
        assert table[role]["per_node"] in {"CPU", "GPU"}, role


@pytest.mark.parametrize("where,node_type", NODE_TYPES, ids=[w for w, _ in NODE_TYPES])
def test_node_type_advertises_its_role(where, node_type, roles):
    label, table = roles
    labels = node_type.get("labels", {})
    validate_node_label_syntax(labels)
    role = labels.get(label)
    assert role in table, f"{where}: label {label!r} is {role!r}, not one of {sorted(table)}"

    resources = node_type["resources"]
    custom = {k: v for k, v in resources.items() if k not in BUILTIN}
    if role == "head":
        assert resources.get("CPU") == 0 and not custom, f"{where}: the head must run nothing: {resources}"
        return
    entry = table[role]
    per_node = resources.get(entry["per_node"], 0)
    assert per_node >= 1, f"{where}: a {role} node needs {entry['per_node']} >= 1, has {resources}"
    assert custom == {entry["resource"]: per_node}, (
        f"{where}: expected exactly {{{entry['resource']}: {per_node}}} (one per {entry['per_node']}), got {custom}"
    )
    if role == "decode":
        assert not resources.get("GPU"), f"{where}: decode nodes must not offer GPUs"

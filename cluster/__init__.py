"""Ray cluster definitions (launcher YAMLs, KubeRay manifests, runtime_env) and `python -m cluster.check`.

Not part of the installed wheel: it travels with `ray job submit --working-dir .` like the rest of
the checkout. The role -> resource table lives in `cluster/resources.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
RESOURCES_YAML = CLUSTER_DIR / "resources.yaml"


def load_roles(path: Path = RESOURCES_YAML) -> tuple[str, dict[str, dict]]:
    """Return (node label key, {role: {"resource", "per_node", "runs"}}) from `cluster/resources.yaml`."""
    table = yaml.safe_load(path.read_text())
    if set(table) != {"label", "roles"}:
        raise ValueError(f"{path}: expected top-level keys 'label' and 'roles', got {sorted(table)}")
    for role, entry in table["roles"].items():
        if set(entry) != {"resource", "per_node", "runs"}:
            raise ValueError(f"{path}: role {role!r} must have resource, per_node, runs; got {sorted(entry)}")
    return table["label"], table["roles"]

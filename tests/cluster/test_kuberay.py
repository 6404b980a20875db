"""KubeRay manifests validate against the vendored CRD v1 schemas, strictly, and agree with the rest.

Strict means what `kubectl apply --validate=strict` does: an unknown or misspelt field is an error,
not silently dropped. CEL rules (`x-kubernetes-validations`) are not evaluated offline.
"""

from __future__ import annotations

import re

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from tests.cluster.cluster_helpers import (
    CLUSTER,
    CRD_FILES,
    KUBERAY_MANIFESTS,
    LAUNCHER_YAMLS,
    crd_schema,
    load_yaml,
)

ids = [p.name for p in KUBERAY_MANIFESTS]
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENTRYPOINTS = {  # the CLIs of the three entry points, as the top-level README documents them
    "pipeline.run": r"python -m pipeline\.run --config pipeline/configs/\S+\.yaml --input \S+ --output \S+",
    "training.run": r"python -m training\.run --config training/configs/\S+\.yaml --data \S+ --output \S+",
    "tuning.run": r"python -m tuning\.run --config tuning/configs/\S+\.yaml --output \S+( --resume)?",
}


def _manifests(kind: str) -> list[dict]:
    return [m for m in (load_yaml(p) for p in KUBERAY_MANIFESTS) if m["kind"] == kind]


def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(kind))


def test_vendored_crds_are_small_enough_for_git():
    for path in CRD_FILES.values():
        assert path.stat().st_size < 2 * 1024 * 1024, f"{path} is over 2 MiB: strip it to the v1 schema"


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=ids)
def test_manifest_matches_crd_schema(path):
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1", path.name
    assert manifest["kind"] in CRD_FILES, f"{path.name}: kind {manifest['kind']} has no vendored CRD"
    assert DNS_1123.match(manifest["metadata"]["name"]), f"{path.name}: bad metadata.name"
    errors = sorted(_validator(manifest["kind"]).iter_errors(manifest), key=lambda e: e.json_path)
    assert not errors, f"{path.name}:\n" + "\n".join(f"  {e.json_path}: {e.message[:300]}" for e in errors)


def test_schema_check_is_strict():
    """A misspelt field and a wrong type are caught, or the test above proves nothing."""
    cr = _manifests("RayCluster")[0]
    cr["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    cr["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    cr["spec"]["enableInTreeAutoscaling"] = "yes"
    paths = {e.json_path for e in _validator("RayCluster").iter_errors(cr)}
    assert paths == {
        "$.spec.workerGroupSpecs[0]",
        "$.spec.headGroupSpec.template.spec.containers[0]",
        "$.spec.enableInTreeAutoscaling",
    }


def test_kinds_present():
    assert len(_manifests("RayCluster")) == 1
    modules = sorted(m["spec"]["entrypoint"].split()[2] for m in _manifests("RayJob"))
    assert modules == sorted(ENTRYPOINTS), f"expected one RayJob per entry point, got {modules}"


def test_raycluster_autoscales_with_the_launcher_groups():
    (cr,) = _manifests("RayCluster")
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert all(group["minReplicas"] == 0 for group in spec["workerGroupSpecs"])
    cr["metadata"].setdefault("namespace", "default")
    _derive_autoscaling_config_from_ray_cr(cr)  # Ray's translator; runs Ray's validate_config
    groups = {group["groupName"] for group in spec["workerGroupSpecs"]}
    for path in LAUNCHER_YAMLS:
        config = load_yaml(path)
        workers = {
            n.replace("_", "-") for n in config["available_node_types"] if n != config["head_node_type"]
        }
        assert groups == workers, f"raycluster.yaml groups differ from {path.name}: {groups ^ workers}"
    images = {
        c["image"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1, f"all Ray pods must run one image, found {images}"


@pytest.mark.parametrize("job", _manifests("RayJob"), ids=lambda m: m["metadata"]["name"])
def test_rayjob_entrypoint_and_runtime_env(job):
    (cr,) = _manifests("RayCluster")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cr["metadata"]["name"]}
    entrypoint = " ".join(spec["entrypoint"].split())
    module = entrypoint.split()[2]
    assert re.fullmatch(ENTRYPOINTS[module], entrypoint), f"{job['metadata']['name']}: {entrypoint!r}"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    shared = load_yaml(CLUSTER / "runtime_env.yaml")
    assert runtime_env["env_vars"] == shared["env_vars"], (
        "runtimeEnvYAML env_vars drifted from runtime_env.yaml"
    )
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir, "working_dir must be where cluster/Dockerfile puts the code"

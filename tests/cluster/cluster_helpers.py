"""Shared by the cluster/ tests: file lists, pyproject pins, strict KubeRay CRD schemas, and submitting a job to
a Ray head a test started (rehearsal_cluster.py imports this file as a script, so it imports nothing from tests/)."""

from __future__ import annotations

import functools
import importlib.util
import re
import socket
import sys
import time
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = CLUSTER / "kuberay" / "crds"
LAUNCHER_YAMLS = sorted([CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"])
KUBERAY_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CRD_FILES = {"RayCluster": CRDS / "ray.io_rayclusters.yaml", "RayJob": CRDS / "ray.io_rayjobs.yaml"}


def load_yaml(path: Path):
    # libyaml's loader when present: the vendored CRDs are 2.3 MB, ~10x faster to parse in C.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_requirement() -> str:
    """The `ray[...]==X` line of pyproject's dependencies, e.g. 'ray[data,train,tune]==2.60.*'."""
    reqs = [r for r in pyproject()["project"]["dependencies"] if re.match(r"ray(\[|\s*[=<>~!])", r)]
    if len(reqs) != 1:
        raise AssertionError(f"pyproject.toml: expected exactly one ray requirement, found {reqs}")
    return reqs[0]


def strict_openapi(schema: dict) -> dict:
    """A Kubernetes structural schema as JSON Schema, checked the way `kubectl apply` (strict) does.

    - `x-kubernetes-int-or-string: true` accepts an integer or a string;
    - `nullable: true` also accepts null;
    - an object listing `properties` rejects unknown fields, unless it preserves unknown fields.
    CEL rules (`x-kubernetes-validations`) are not evaluated.
    """
    node = {k: v for k, v in schema.items()}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {name: strict_openapi(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_openapi(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict_openapi(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict_openapi(sub) for sub in node[key]]
    if isinstance(node.get("not"), dict):
        node["not"] = strict_openapi(node["not"])
    return node


@functools.cache
def crd_schema(kind: str) -> dict:
    """The strict JSON Schema of `kind`'s v1 version from the vendored CRD."""
    crd = load_yaml(CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind, f"{CRD_FILES[kind]} defines {crd['spec']['names']['kind']}"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict_openapi(v1["schema"]["openAPIV3Schema"])


def cluster_package():
    """`cluster/__init__.py`, loaded by path: `cluster` is not an installed package (jobs ship it)."""
    spec = importlib.util.spec_from_file_location("t2v_cluster", CLUSTER / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_and_wait(client, entrypoint: str, runtime_env: dict, timeout_s: float) -> tuple[str, str, str]:
    """(job id, final status, logs) of one job through the Job Submission API: retried while the head's job
    agent is not up yet (tens of seconds on a loaded machine), stopped if still running after `timeout_s`."""
    deadline = time.monotonic() + 90
    while True:
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job)
    if not status.is_terminal():
        client.stop_job(job)
    return job, str(getattr(status, "value", status)), client.get_job_logs(job)

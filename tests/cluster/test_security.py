"""Nothing in cluster/ lets the network reach the dashboard / job API (port 8265) without token auth.

The job API runs any command on the cluster, with the nodes' cloud credentials. `python -m cluster.check
--exposure` checks the cluster definitions offline. These tests run it on every file here, show that it
fails on the exposures it exists to catch (among them the `--dashboard-host=0.0.0.0` head this repo used
to ship), and that the documented token-auth option (the lines marked `# TOKEN-AUTH`, uncommented)
passes Ray's and KubeRay's validation as well as the check.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.docker import docker_start_cmds
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.cluster.cluster_helpers import (
    CLUSTER,
    KUBERAY_MANIFESTS,
    LAUNCHER_YAMLS,
    REPO,
    crd_schema,
    load_yaml,
)

MANIFESTS = LAUNCHER_YAMLS + KUBERAY_MANIFESTS
# A commented-out YAML line that ends in `# TOKEN-AUTH` (optionally `# TOKEN-AUTH: why`).
TOKEN_AUTH_LINE = re.compile(r"^([ \t]*)# (\S.*\s# TOKEN-AUTH(?::.*)?)$", re.M)
OPEN_HEAD = "--dashboard-host=0.0.0.0"  # what aws.yaml and gcp.yaml shipped before issue 17


@pytest.fixture(scope="module")
def check():
    """`cluster/check.py` (it imports `cluster`, which jobs ship with the checkout rather than install)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("cluster.check")


def _with_token_auth(text: str) -> str:
    return TOKEN_AUTH_LINE.sub(r"\1\2", text)


def _raycluster() -> dict:
    (path,) = [p for p in KUBERAY_MANIFESTS if load_yaml(p)["kind"] == "RayCluster"]
    return load_yaml(path)


def test_check_covers_every_manifest(check):
    assert set(check.cluster_definitions()) == set(MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_keeps_job_api_private(check, path):
    assert check.check_exposure([path]) == []


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
def test_launcher_head_listens_on_loopback_with_token_auth_off(path):
    """`ray dashboard` tunnels to the head's localhost; the default needs no token file to `ray up`."""
    config = load_yaml(path)
    head = " ".join(" ".join(config["head_start_ray_commands"]).split())
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE" not in json.dumps(config), "token auth is an option: its lines stay commented"
    assert len(TOKEN_AUTH_LINE.findall(path.read_text())) == 2, "README: 'uncomment the two TOKEN-AUTH lines'"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
@pytest.mark.parametrize("flag", [OPEN_HEAD, "--dashboard-host 0.0.0.0", "--dashboard-host='::'"])
def test_check_fails_an_open_head_without_token(check, path, flag):
    text = path.read_text()
    assert "--dashboard-host=127.0.0.1" in text
    problems = check.exposure_problems(yaml.safe_load(text.replace("--dashboard-host=127.0.0.1", flag)))
    assert len(problems) == 1 and "without token auth" in problems[0], problems


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
def test_token_auth_option_validates_and_may_open_the_head(check, path):
    text = _with_token_auth(path.read_text())
    config = yaml.safe_load(text)
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(config, json.load(f))
    validate_config(prepare_config(copy.deepcopy(config)))
    assert check.exposure_problems(config) == []
    assert (
        check.exposure_problems(yaml.safe_load(text.replace("--dashboard-host=127.0.0.1", OPEN_HEAD))) == []
    )

    # Where the launcher puts it: `docker run` env of every node (host network, so the SSH tunnel to the
    # head's localhost reaches the dashboard), and the token at the container user's ~/.ray/auth_token.
    docker = config["docker"]
    run = docker_start_cmds(
        "ubuntu",
        docker["image"],
        config["file_mounts"],
        "ray_container",
        docker["run_options"],
        "c",
        "/home/ray",
        "docker",
    )
    assert "--env=RAY_AUTH_MODE=token" in run and "--net=host" in run
    assert re.search(r"-v \S+:/home/ray/\.ray/auth_token\b", run), run

    mount_only = yaml.safe_load(path.read_text().replace("  # ~/.ray/auth_token:", "  ~/.ray/auth_token:"))
    assert "~/.ray/auth_token" in mount_only["file_mounts"]
    assert any("workers cannot join" in p for p in check.exposure_problems(mount_only))
    no_token = copy.deepcopy(config)
    del no_token["file_mounts"]["~/.ray/auth_token"]
    assert any("no token reaches" in p for p in check.exposure_problems(no_token))
    head_only = copy.deepcopy(config)
    head_only["docker"]["run_options"].remove("--env=RAY_AUTH_MODE=token")
    head_only["docker"]["head_run_options"] = ["--env=RAY_AUTH_MODE=token"]
    problems = check.exposure_problems(head_only)
    assert problems and all("every node needs it" in p for p in problems), problems


# headGroupSpec keys that open the head to the network (None: key removed). Each variant is a valid RayCluster.
KUBE_EXPOSURES = {
    "LoadBalancer": {"serviceType": "LoadBalancer"},
    "NodePort": {"serviceType": "NodePort"},
    "unstated": {
        "serviceType": None
    },  # ClusterIP by default, but the check wants it said (and diffs show a change)
    "headService": {"headService": {"spec": {"type": "LoadBalancer"}}},
    "ingress": {"enableIngress": True},
}


@pytest.mark.parametrize("name", sorted(KUBE_EXPOSURES))
def test_check_fails_exposed_raycluster(check, name):
    cr = _raycluster()
    head = cr["spec"]["headGroupSpec"]
    for key, value in KUBE_EXPOSURES[name].items():
        if value is None:
            del head[key]
        else:
            head[key] = value
    assert not list(jsonschema.Draft7Validator(crd_schema("RayCluster")).iter_errors(cr)), "invalid variant"
    assert len(check.exposure_problems(cr)) == 1
    job = {"kind": "RayJob", "metadata": {"name": "j"}, "spec": {"rayClusterSpec": cr["spec"]}}
    assert len(check.exposure_problems(job)) == 1, "a RayJob's own cluster is checked too"


def test_check_fails_host_network_head_without_token(check):
    cr = _raycluster()
    cr["spec"]["headGroupSpec"]["template"]["spec"]["hostNetwork"] = True
    assert len(check.exposure_problems(cr)) == 1
    cr["spec"]["authOptions"] = {"mode": "token"}
    assert check.exposure_problems(cr) == []


def test_check_fails_public_kubernetes_services(check):
    def service(kind: str, **spec) -> dict:
        return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "ray"}, "spec": spec}

    assert len(check.exposure_problems(service("Service", type="LoadBalancer"))) == 1
    assert len(check.exposure_problems(service("Service", type="NodePort"))) == 1
    assert len(check.exposure_problems(service("Ingress"))) == 1
    assert check.exposure_problems(service("Service", type="ClusterIP")) == []
    assert check.exposure_problems({"not": "a cluster definition"})


def test_raycluster_token_auth_option(check):
    """Uncommented, the option is KubeRay's authOptions (KubeRay >= 1.5.1; it needs Ray >= 2.52)."""
    (path,) = [p for p in KUBERAY_MANIFESTS if load_yaml(p)["kind"] == "RayCluster"]
    assert len(TOKEN_AUTH_LINE.findall(path.read_text())) == 1
    cr = yaml.safe_load(_with_token_auth(path.read_text()))
    assert cr["spec"]["authOptions"] == {"mode": "token"}
    assert not list(jsonschema.Draft7Validator(crd_schema("RayCluster")).iter_errors(cr))
    assert tuple(int(x) for x in cr["spec"]["rayVersion"].split(".")[:2]) >= (2, 52)
    assert check.exposure_problems(cr) == []
    cr["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert len(check.exposure_problems(cr)) == 1, "a public LoadBalancer fails even with token auth"


def test_cli(check, tmp_path, caplog):
    assert check.main(["--exposure"]) == 0
    bad = tmp_path / "open-head.yaml"
    bad.write_text(LAUNCHER_YAMLS[0].read_text().replace("--dashboard-host=127.0.0.1", OPEN_HEAD))
    assert check.main(["--exposure", str(bad)]) == 1
    assert "open-head.yaml: the head binds the dashboard / job API to 0.0.0.0" in caplog.text


def test_readme_documents_the_access_paths():
    readme = (CLUSTER / "README.md").read_text()
    name = _raycluster()["metadata"]["name"]
    for line in (
        *(f"ray dashboard cluster/{p.name}" for p in LAUNCHER_YAMLS),
        f"kubectl port-forward svc/{name}-head-svc 8265:8265",
        "ray get-auth-token --generate",
        "export RAY_AUTH_MODE=token",
        f"kubectl get secret {name} -o jsonpath='{{.data.auth_token}}' | base64 -d",
        "python -m cluster.check --exposure",
    ):
        assert line in readme, f"cluster/README.md lacks `{line}`"


def test_ray_client_sends_the_token_only_in_token_mode():
    """What the README tells clients: `ray job submit` sends RAY_AUTH_TOKEN only under RAY_AUTH_MODE=token."""
    code = (
        "from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled as h;"
        "from ray.scripts.scripts import cli; assert 'get-auth-token' in cli.commands; print(h({}))"
    )
    seen = {}
    for mode in ("token", None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(RAY_AUTH_TOKEN="t0ken", **({"RAY_AUTH_MODE": mode} if mode else {}))
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        seen[mode] = out.stdout.strip().splitlines()[-1]
    assert seen == {"token": "{'authorization': 'Bearer t0ken'}", None: "{}"}

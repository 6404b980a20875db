"""Check that work lands on the node types `cluster/resources.yaml` says it should.

Run it right after `ray up` / `kubectl apply`, before paying for a real pipeline or training run:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m cluster.check
    ray job submit ... -- python -m cluster.check --roles decode,encode,train

Decode and encode are probed with the same Ray Data shape the pipeline uses (CPU tasks, then a GPU
actor pool), train with one actor shaped like a Ray Train worker. Each probe records the node it ran
on; the check fails if any probe ran on a node whose `t2v-ray/role` label is not its role. On an
autoscaling cluster the first run also scales each node type up from zero, so expect minutes.
The last stdout line is `CLUSTER_CHECK {json}`: role -> node ids, for scripts and tests.

`python -m cluster.check --exposure [FILE ...]` runs offline instead (no Ray, no cloud account): it fails
when a cluster definition (default: every launcher YAML and KubeRay manifest in cluster/) lets the network
reach the dashboard / job API without token auth. See `exposure_problems`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import ray
import yaml

from cluster import CLUSTER_DIR, load_roles

logger = logging.getLogger(__name__)


def _where() -> dict:
    """Node id and role label of the worker this runs in."""
    label_key, _ = load_roles()
    ctx = ray.get_runtime_context()
    labels = ctx.get_node_labels()
    return {"node_id": ctx.get_node_id(), "node_role": labels.get(label_key)}


def _decode_probe(batch: dict) -> dict:
    where = _where()
    n = len(batch["id"])
    batch["decode_node"] = [where["node_id"]] * n
    batch["decode_node_role"] = [where["node_role"]] * n
    return batch


class _EncodeProbe:
    """Stands in for the pipeline's GPU actor (load once in __init__, then map batches)."""

    def __init__(self) -> None:
        self.where = _where()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        batch["encode_node"] = [self.where["node_id"]] * n
        batch["encode_node_role"] = [self.where["node_role"]] * n
        return batch


@ray.remote
class _TrainProbe:
    def where(self) -> dict:
        return _where()


def probe_pipeline(roles: dict[str, dict], rows: int, gpus_per_actor: float) -> list[dict]:
    """Decode tasks then one encode actor, requesting the role resources as pipeline stages do."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.range(rows, override_num_blocks=rows)
    ds = ds.map_batches(_decode_probe, batch_size=1, num_cpus=1, resources={roles["decode"]["resource"]: 1})
    ds = ds.map_batches(
        _EncodeProbe,
        batch_size=rows,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
        num_gpus=gpus_per_actor,
        resources={roles["encode"]["resource"]: 1},
    )
    return ds.take_all()


def probe_train(roles: dict[str, dict], gpus_per_actor: float) -> dict:
    actor = _TrainProbe.options(
        num_cpus=0, num_gpus=gpus_per_actor, resources={roles["train"]["resource"]: 1}
    ).remote()
    try:
        return ray.get(actor.where.remote())
    finally:
        ray.kill(actor)


# --- Offline: who can reach the dashboard and its job API (port 8265)? --------------------------
# The job API runs any command on the cluster, with the nodes' cloud credentials. Ray 2.60 serves it
# without authentication unless RAY_AUTH_MODE=token is set on every node (and on the client).

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
_TOKEN_MODE = re.compile(r"\bRAY_AUTH_MODE=['\"]?token\b")
_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ]['\"]?([^\s'\"]+)")


def cluster_definitions(root: Path = CLUSTER_DIR) -> list[Path]:
    """Launcher YAMLs (a top-level `provider`) in `root`, then the KubeRay manifests in root/kuberay."""
    launchers = [
        p for p in sorted(root.glob("*.yaml")) if "provider" in (_as_dict(yaml.safe_load(p.read_text())))
    ]
    return launchers + sorted((root / "kuberay").glob("*.yaml"))


def _as_dict(doc) -> dict:
    return doc if isinstance(doc, dict) else {}


def _joined(*parts) -> str:
    return " ".join(" ".join(p) if isinstance(p, list) else (p or "") for p in parts)


def _launcher_problems(config: dict) -> list[str]:
    """`ray up` config: the head's --dashboard-host, and RAY_AUTH_MODE=token on every node or none.

    Token mode counts when it is in a node's start command or in the `docker run` options of its
    container (every launcher command runs in that container, so they all inherit it).
    """
    docker = _as_dict(config.get("docker"))
    head_cmds = " ".join(_joined(config.get("head_start_ray_commands")).split())
    head_env = _joined(head_cmds, docker.get("run_options"), docker.get("head_run_options"))
    head_token = bool(_TOKEN_MODE.search(head_env))
    problems = []
    if "ray start --head" not in head_cmds:
        problems.append(
            "head_start_ray_commands never runs `ray start --head`: cannot tell where the dashboard listens"
        )
    hosts = _DASHBOARD_HOST.findall(head_cmds)  # without one, `ray start --head` binds to localhost
    host = hosts[-1] if hosts else "127.0.0.1"
    if host not in LOOPBACK and not head_token:
        problems.append(
            f"the head binds the dashboard / job API to {host} without token auth: anything that reaches port "
            "8265 can submit jobs. Bind it to 127.0.0.1 (reach it with `ray dashboard`), or set RAY_AUTH_MODE=token"
        )
    head_type = config.get("head_node_type")
    for name, node_type in sorted(_as_dict(config.get("available_node_types")).items()):
        if name == head_type:
            continue
        own = _as_dict(_as_dict(node_type).get("docker")).get("worker_run_options")
        env = _joined(
            config.get("worker_start_ray_commands"),
            docker.get("run_options"),
            docker.get("worker_run_options") if own is None else own,
        )
        if bool(_TOKEN_MODE.search(env)) != head_token:
            where = f"the head but not on {name}" if head_token else f"{name} but not on the head"
            problems.append(f"RAY_AUTH_MODE=token is set on {where}: every node needs it, or none")
    mounted = any(k.endswith(".ray/auth_token") for k in _as_dict(config.get("file_mounts")))
    if head_token and not (mounted or "RAY_AUTH_TOKEN" in head_env):
        problems.append(
            "token auth is on but no token reaches the nodes: mount ~/.ray/auth_token in file_mounts"
        )
    if mounted and not head_token:  # `ray start --head` then turns token mode on by itself, workers do not
        problems.append(
            "~/.ray/auth_token is mounted but RAY_AUTH_MODE=token is not set: workers cannot join"
        )
    return problems


def _ray_cluster_problems(what: str, spec: dict) -> list[str]:
    """A RayCluster spec (also embedded in a RayJob / RayService): the head Service stays ClusterIP."""
    head = _as_dict(spec.get("headGroupSpec"))
    pod = _as_dict(_as_dict(head.get("template")).get("spec"))
    token = _as_dict(spec.get("authOptions")).get("mode") == "token" or any(
        env.get("name") == "RAY_AUTH_MODE" and env.get("value") == "token"
        for c in pod.get("containers") or []
        for env in _as_dict(c).get("env") or []
    )
    problems = []
    if head.get("serviceType") != "ClusterIP":
        problems.append(
            f"{what}: headGroupSpec.serviceType is {head.get('serviceType')!r}, not ClusterIP: say ClusterIP "
            "and reach the head with `kubectl port-forward`; never LoadBalancer / NodePort"
        )
    service_type = _as_dict(_as_dict(head.get("headService")).get("spec")).get("type")
    if service_type in PUBLIC_SERVICE_TYPES:
        problems.append(f"{what}: headGroupSpec.headService is a {service_type}: it publishes the job API")
    if head.get("enableIngress") and not token:
        problems.append(f"{what}: headGroupSpec.enableIngress publishes the job API without token auth")
    if pod.get("hostNetwork") and not token:
        problems.append(
            f"{what}: the head pod uses hostNetwork, so the dashboard listens on the node's network "
            "without token auth (authOptions.mode: token)"
        )
    return problems


def exposure_problems(doc: dict) -> list[str]:
    """Why one parsed cluster definition lets the network reach the job API unauthenticated ([] if not).

    - launcher YAML: the dashboard binds to loopback, unless RAY_AUTH_MODE=token is on every node and
      a token reaches them;
    - RayCluster (or a RayJob / RayService with rayClusterSpec): the head Service is ClusterIP, with no
      LoadBalancer / NodePort headService, and no Ingress or hostNetwork head without `authOptions`;
    - a Kubernetes Service of type LoadBalancer / NodePort, or any Ingress, always fails.
    """
    doc = _as_dict(doc)
    if "provider" in doc:
        return _launcher_problems(doc)
    kind, spec = doc.get("kind"), _as_dict(doc.get("spec"))
    what = f"{kind} {_as_dict(doc.get('metadata')).get('name')}"
    if kind == "RayCluster":
        return _ray_cluster_problems(what, spec)
    if kind in ("RayJob", "RayService"):  # without rayClusterSpec it submits to an existing RayCluster
        return (
            _ray_cluster_problems(what, _as_dict(spec["rayClusterSpec"])) if "rayClusterSpec" in spec else []
        )
    if kind == "Service" and spec.get("type") in PUBLIC_SERVICE_TYPES:
        return [f"{what} is a {spec['type']}: keep Ray's services ClusterIP and use `kubectl port-forward`"]
    if kind == "Ingress":
        return [f"{what} publishes a service of the Ray cluster: use `kubectl port-forward`"]
    if kind is None:
        return ["neither a launcher config (no `provider`) nor a Kubernetes object (no `kind`)"]
    return []


def check_exposure(paths: list[Path]) -> list[str]:
    """`exposure_problems` of every document in every file, each prefixed with the file name."""
    return [
        f"{path.name}: {problem}"
        for path in paths
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
        for problem in exposure_problems(doc)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.check", description=__doc__.splitlines()[0])
    parser.add_argument("--roles", default="decode,encode", help="comma list of decode, encode, train")
    parser.add_argument("--rows", type=int, default=8, help="rows pushed through the decode/encode probe")
    parser.add_argument(
        "--gpus-per-actor", type=float, default=1.0, help="GPUs each encode/train probe asks for"
    )
    parser.add_argument(
        "--exposure",
        nargs="*",
        metavar="FILE",
        help="offline, no Ray: fail if a cluster definition (default: all in cluster/) exposes the job API",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.exposure is not None:
        paths = [Path(p) for p in args.exposure] or cluster_definitions()
        problems = check_exposure(paths)
        for line in problems:
            logger.error("EXPOSED: %s", line)
        if not problems:
            logger.info("job API private in %s", ", ".join(p.name for p in paths))
        return 1 if problems else 0

    _, roles = load_roles()
    wanted = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"decode", "encode", "train"})
    if unknown:
        parser.error(f"--roles: unknown role(s) {unknown}; choose from decode, encode, train")

    if not ray.is_initialized():  # under `ray job submit`, RAY_ADDRESS points at the cluster
        ray.init(log_to_driver=False)
    placed: dict[str, set[str]] = {}
    wrong: list[str] = []
    if {"decode", "encode"} & set(wanted):
        for row in probe_pipeline(roles, args.rows, args.gpus_per_actor):
            for stage in ("decode", "encode"):
                placed.setdefault(stage, set()).add(row[f"{stage}_node"])
                if row[f"{stage}_node_role"] != stage:
                    wrong.append(
                        f"{stage} ran on node {row[f'{stage}_node']} labelled {row[f'{stage}_node_role']!r}"
                    )
    if "train" in wanted:
        where = probe_train(roles, args.gpus_per_actor)
        placed["train"] = {where["node_id"]}
        if where["node_role"] != "train":
            wrong.append(f"train ran on node {where['node_id']} labelled {where['node_role']!r}")

    for role, nodes in sorted(placed.items()):
        logger.info("%-7s %-11s -> %s", role, roles[role]["resource"], ", ".join(sorted(nodes)))
    for line in wrong:
        logger.error("MISPLACED: %s", line)
    print("CLUSTER_CHECK " + json.dumps({role: sorted(nodes) for role, nodes in placed.items()}), flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

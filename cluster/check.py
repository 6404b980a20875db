"""Check that work lands on the node types `cluster/resources.yaml` says it should.

Run it right after `ray up` / `kubectl apply`, before paying for a real pipeline or training run:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m cluster.check
    ray job submit ... -- python -m cluster.check --roles decode,encode,train

Decode and encode are probed with the same Ray Data shape the pipeline uses (CPU tasks, then a GPU
actor pool), train with one actor shaped like a Ray Train worker. Each probe records the node it ran
on; the check fails if any probe ran on a node whose `t2v-ray/role` label is not its role. On an
autoscaling cluster the first run also scales each node type up from zero, so expect minutes.
The last stdout line is `CLUSTER_CHECK {json}`: role -> node ids, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import ray

from cluster import load_roles

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.check", description=__doc__.splitlines()[0])
    parser.add_argument("--roles", default="decode,encode", help="comma list of decode, encode, train")
    parser.add_argument("--rows", type=int, default=8, help="rows pushed through the decode/encode probe")
    parser.add_argument(
        "--gpus-per-actor", type=float, default=1.0, help="GPUs each encode/train probe asks for"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

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

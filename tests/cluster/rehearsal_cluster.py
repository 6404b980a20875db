"""Multi-node rehearsal, run as its own process by test_rehearsal.py (never inside the pytest process).

Starts a local Ray cluster shaped like cluster/aws.yaml at toy scale - a head with CPU: 0, a decode
node advertising `decode_cpu`, an encode node advertising `encode_gpu` (and one declared GPU) - then
submits `python -m cluster.check` through the Job Submission API with cluster/runtime_env.yaml, the
way a user submits to a real cluster, and writes what happened as JSON to the path in argv[1].

Isolation from other Ray users on the machine: a private RAY_TMPDIR (so the "current cluster"
address file other `ray.init()` calls look up is not ours), free ports, and `Cluster.shutdown()`,
which stops only the processes this cluster started.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from cluster_helpers import free_port, submit_and_wait  # this file runs as a script from its dir

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = "python -m cluster.check --roles decode,encode --rows 4"
JOB_TIMEOUT_S = 150


def _client(address: str, deadline: float):
    from ray.job_submission import JobSubmissionClient

    while True:  # the dashboard's HTTP server comes up a few seconds after the head
        try:
            return JobSubmissionClient(address)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def main(out_path: str) -> int:
    # The job's `python` must be this interpreter (the project venv), as it is on a real node.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="t2vc-")  # short: Ray's unix socket paths must stay < 108 chars
    os.environ["RAY_TMPDIR"] = tmp
    ray_tmp = Path(tmp, "ray")
    ray_tmp.mkdir()

    from ray.cluster_utils import Cluster

    roles = yaml.safe_load((REPO / "cluster" / "resources.yaml").read_text())
    label = roles["label"]
    decode_res = roles["roles"]["decode"]["resource"]
    encode_res = roles["roles"]["encode"]["resource"]
    dashboard_port = free_port()
    result: dict = {"entrypoint": ENTRYPOINT}
    started = time.monotonic()
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "labels": {label: "head"},
                "temp_dir": str(ray_tmp),
                # Each node's dashboard agent takes a free port: the default (52365) may be held by
                # another Ray on this machine (the suite's own local Ray, or a user's), and the job
                # server then finds "no available agent".
                "dashboard_agent_listen_port": free_port(),
            },
        )
        decode = cluster.add_node(
            num_cpus=1,
            resources={decode_res: 1},
            labels={label: "decode"},
            dashboard_agent_listen_port=free_port(),
        )
        encode = cluster.add_node(
            num_cpus=1,
            num_gpus=1,
            resources={encode_res: 1},
            labels={label: "encode"},
            dashboard_agent_listen_port=free_port(),
        )
        result["nodes"] = {
            "head": cluster.head_node.node_id,
            "decode": decode.node_id,
            "encode": encode.node_id,
        }

        address = f"http://127.0.0.1:{dashboard_port}"
        client = _client(address, deadline=time.monotonic() + 60)
        runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        runtime_env["working_dir"] = str(REPO)  # what `--working-dir .` from the repo root resolves to
        job_id, result["status"], logs = submit_and_wait(client, ENTRYPOINT, runtime_env, JOB_TIMEOUT_S)
        result["job_id"] = job_id
        result["logs_tail"] = logs[-4000:]
        lines = [ln for ln in logs.splitlines() if ln.startswith("CLUSTER_CHECK ")]
        result["placed"] = json.loads(lines[-1].split(" ", 1)[1]) if lines else None
    except Exception as exc:  # recorded for the test's failure message, never swallowed silently
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        result["seconds"] = round(time.monotonic() - started, 1)
        Path(out_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Multi-node rehearsal: a job submitted through the Job Submission API lands on the labelled nodes.

The cluster runs in a child process (rehearsal_cluster.py), so it never shares a process with the
session-wide `ray_local` fixture. The job is `python -m cluster.check`, which drives the pipeline's
shape - Ray Data CPU tasks requesting `decode_cpu`, then a GPU actor pool requesting `encode_gpu` -
shipped with cluster/runtime_env.yaml from the repository root exactly as `ray job submit
--runtime-env cluster/runtime_env.yaml --working-dir .` would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _needs_ray_default() -> None:
    from ray._private.utils import get_dashboard_dependency_error

    error = get_dashboard_dependency_error()
    if error is not None:
        pytest.skip(
            "the Job Submission API needs the dashboard: install ray[default] "
            f"(pyproject: ray[default,data,train,tune]); import failed with: {error}"
        )


@pytest.mark.slow
def test_job_stages_run_on_their_labelled_nodes(tmp_path):
    _needs_ray_default()
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "rehearsal_cluster.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.exists(), f"rehearsal wrote no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    context = json.dumps({k: v for k, v in result.items() if k != "logs_tail"}, indent=1)
    context += (
        "\n--- job log tail ---\n" + result.get("logs_tail", "") + "\n--- stderr ---\n" + proc.stderr[-2000:]
    )

    assert "error" not in result, context
    assert result["status"] == "SUCCEEDED", context
    nodes = result["nodes"]
    # Every decode task ran on the decode node and the encode actor on the encode node; none on the head.
    assert result["placed"] == {"decode": [nodes["decode"]], "encode": [nodes["encode"]]}, context

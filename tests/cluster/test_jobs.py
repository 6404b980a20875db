"""The three entry points, submitted as cluster/README.md says: the Job Submission API, cluster/runtime_env.yaml,
the checkout as working dir, against a Ray head this module starts (and stops, by its pid) on 127.0.0.1.

The head has its own temp dir, free ports and RAY_AUTH_MODE=disabled, so it never meets the suite's local
Ray or a user's. Every path a job is given is absolute (a job runs in Ray's temporary copy of the checkout);
the demo presets find the tiny zoo through T2V_TINY_ZOO, set on the entrypoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster.cluster_helpers import (
    CLUSTER,
    KUBERAY_MANIFESTS,
    REPO,
    free_port,
    load_yaml,
    submit_and_wait,
)

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def head():
    """A Ray head started with `ray start --head --block`; yields (JobSubmissionClient, temp dir)."""
    from ray._private.utils import get_dashboard_dependency_error

    if (error := get_dashboard_dependency_error()) is not None:
        pytest.skip(f"the Job Submission API needs ray[default]: {error}")
    from ray.job_submission import JobSubmissionClient

    tmp = Path(tempfile.mkdtemp(prefix="t2vj-"))  # short: Ray's unix socket paths must stay < 108 chars
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="disabled",
        # A job's `python` is this interpreter (the project venv), as it is on a real node's image.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=4"]
    cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
                client.list_jobs()
                break
            except Exception as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Ray head did not come up:\n{(tmp / 'head.log').read_text()[-3000:]}"
                    ) from exc
                time.sleep(1.0)
        yield client, tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _runtime_env(source: dict) -> dict:
    """A runtime env as `--runtime-env FILE --working-dir .` from the repository root gives it."""
    env = dict(source)
    env["working_dir"] = str(REPO)
    return env


def _run_job(client, entrypoint: str, runtime_env: dict) -> str:
    """The logs of `entrypoint` run as a job; fails with their tail unless it SUCCEEDED."""
    _, status, logs = submit_and_wait(client, entrypoint, runtime_env, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", f"{entrypoint}\n-> {status}\n{logs[-6000:]}"
    return logs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from fixtures.synth import write_shards
    from fixtures.zoo import ensure_tiny_zoo

    root = tmp_path_factory.mktemp("jobs")
    write_shards(
        root / "shards", shards=1, per_shard=6, frames=24, fps=8, height=64, width=64, seed=0, bad=True
    )
    zoo = ensure_tiny_zoo(root / "zoo")
    return root, Path(zoo.root)


def _cmd(zoo: Path, *args: str) -> str:
    return f"T2V_TINY_ZOO={shlex.quote(str(zoo))} python -m " + " ".join(shlex.quote(a) for a in args)


def _no_job_dir(text: str, where: str) -> None:
    assert "runtime_resources" not in text and "_ray_pkg_" not in text, f"{where} records a job's temp dir"


def test_pipeline_training_and_tuning_jobs_succeed(head, inputs):
    client, _ = head
    root, zoo = inputs
    runtime_env = _runtime_env(load_yaml(CLUSTER / "runtime_env.yaml"))

    curated = root / "curated"
    logs = _run_job(
        client,
        _cmd(
            zoo,
            "pipeline.run",
            "--config",
            "pipeline/configs/demo.yaml",
            "--input",
            str(root / "shards"),
            "--output",
            str(curated),
        ),
        runtime_env,
    )
    assert "shard 00000 written:" in logs, logs[-3000:]  # progress while the stream runs
    summary = json.loads((curated / "summary.json").read_text())
    assert summary["samples_in"] > 0 and summary["clips_out"] > 0, logs[-3000:]
    assert summary["unaccounted_samples"] == {}, summary
    clips = pq.read_table(curated / "clips")
    assert clips.num_rows > 0
    _no_job_dir(
        json.dumps({k.decode(): v.decode() for k, v in clips.schema.metadata.items()}), "clips metadata"
    )

    run_dir = root / "train"
    train = [
        "optim.max_steps=4",
        "optim.warmup_steps=1",
        "run.checkpoint_every=4",
        "run.val_every=4",
        "run.log_every=2",
    ]
    logs = _run_job(
        client,
        _cmd(
            zoo,
            "training.run",
            "--config",
            "training/configs/demo.yaml",
            "--data",
            str(curated),
            "--output",
            str(run_dir),
            *train,
        ),
        runtime_env,
    )
    # Each progress line once (not print's copy through Ray Train's logger too); no report dict dumps.
    assert sum(line.endswith("step 2/4") or "step 2/4 " in line for line in logs.splitlines()) == 1, logs[
        -4000:
    ]
    assert "Reporting training result" not in logs
    assert (run_dir / "export" / "trainable.safetensors").is_file()
    _no_job_dir((run_dir / "export" / "config.yaml").read_text(), "export/config.yaml")
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["step"] == 4

    sweep = root / "sweep"
    _run_job(
        client,
        _cmd(
            zoo,
            "tuning.run",
            "--config",
            "tuning/configs/demo_sampling.yaml",  # the sampling sweep on the model just trained (the
            "--checkpoint",  # training sweep runs in-process in tests/tuning/test_run.py)
            str(run_dir),
            "--output",
            str(sweep),
            "budget.sampler.steps=2",
        ),
        runtime_env,
    )
    rows = (sweep / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and all("TERMINATED" in r for r in rows[1:]), rows
    assert (sweep / "best.yaml").is_file() and (sweep / "objective.png").stat().st_size > 0
    _no_job_dir((sweep / "best.yaml").read_text(), "best.yaml")


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS, ids=lambda p: p.stem)
def test_kuberay_job_env_merges_with_the_entry_points_ray_init(head, manifest):
    """The RayJob manifests' runtimeEnvYAML, with the entry points' own ray.init: no merge conflict, and the
    workers see both the job's variables and the driver's."""
    doc = load_yaml(manifest)
    if doc["kind"] != "RayJob":
        pytest.skip("not a RayJob")
    client, _ = head
    runtime_env = _runtime_env(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]))
    probe = (
        "import os, ray; from pipeline.raysession import init_ray; "
        "init_ray(env_vars={'RAY_DATA_LOG_LEVEL': 'WARNING'}); "
        "env = ray.get(ray.remote(lambda: dict(os.environ)).remote()); "
        "print('PROBE', env['TOKENIZERS_PARALLELISM'], env['RAY_DATA_LOG_LEVEL'], env['PYTHONUNBUFFERED'])"
    )
    logs = _run_job(client, f"python -c {shlex.quote(probe)}", runtime_env)
    assert "PROBE false WARNING 1" in logs, logs[-3000:]

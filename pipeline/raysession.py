"""Connecting to Ray, the same way for every CLI (`pipeline.run`, `training.run`, `tuning.run`).

Each entry point wants a few environment variables on every Ray worker (TOKENIZERS_PARALLELISM=false:
HF tokenizers warn and may deadlock after Ray forks). Inside `ray job submit --runtime-env ...` the
job's runtime env already sets some of them, and Ray refuses a `ray.init(runtime_env=...)` that names a
key the job also sets ("Failed to merge the Job's runtime env"). So the job's value wins: `init_ray`
passes only the keys the job does not set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
"""What every entry point sets on Ray's workers, unless the job's runtime env already sets it."""

JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Where Ray's job supervisor hands a submitted job's config (runtime env included) to its driver."""


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env this driver was submitted with ({} outside a Ray job)."""
    raw = os.environ.get(JOB_CONFIG_VAR)
    if not raw:
        return {}
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def driver_runtime_env(env_vars: dict[str, str] | None = None) -> dict | None:
    """The runtime env for `ray.init`: WORKER_ENV plus `env_vars`, minus the keys the job sets itself."""
    wanted = {**WORKER_ENV, **(env_vars or {})}
    job = job_env_vars()
    own = {k: v for k, v in wanted.items() if k not in job}
    return {"env_vars": own} if own else None


def init_ray(
    address: str | None = None,
    env_vars: dict[str, str] | None = None,
    num_cpus: float | None = None,
    **kwargs,
) -> None:
    """`ray.init` once: the cluster at `address` (or RAY_ADDRESS, which `ray job submit` sets), else a
    local Ray of `num_cpus` (None: all); `kwargs` go to `ray.init` (log_to_driver, ...)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"num_cpus": num_cpus}  # Ray refuses num_cpus when connecting to a cluster
    ray.init(address=address, runtime_env=driver_runtime_env(env_vars), **local, **kwargs)


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` (its working directory is Ray's temporary copy)."""
    return bool(os.environ.get(JOB_CONFIG_VAR))


def where_resolved(spec: str) -> str:
    """For a missing path: which directory a relative `spec` was resolved against, and inside a Ray job
    that it needs an absolute path or a URI ('' for an absolute path or a URI)."""
    if "://" in spec or Path(spec).expanduser().is_absolute():
        return ""
    where = f" (relative: resolved against {Path.cwd()}"
    if in_ray_job():
        where += ", this Ray job's temporary copy of --working-dir: give a job absolute paths or URIs"
    return where + ")"


def recorded_path(given: str) -> str:
    """How an output records the local path `given`: absolute, so it reads the same from anywhere; but as
    given when it lies inside a Ray job's temporary working dir (gone, or another copy, after the job)."""
    if "://" in given or not Path(given).expanduser().exists():
        return given
    resolved = Path(given).expanduser().resolve()
    if in_ray_job() and resolved.is_relative_to(Path.cwd().resolve()):
        return given
    return str(resolved)

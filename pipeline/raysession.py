"""Connecting to Ray, the same way for every CLI (`pipeline.run`, `training.run`, `tuning.run`).

Each entry point wants a few environment variables on every Ray worker (TOKENIZERS_PARALLELISM=false:
HF tokenizers warn and may deadlock after Ray forks). Inside `ray job submit --runtime-env ...` the
job's runtime env already sets some of them, and Ray refuses a `ray.init(runtime_env=...)` that names a
key the job also sets ("Failed to merge the Job's runtime env"). So the job's value wins: `init_ray`
passes only the keys the job does not set.

Paths are explained (`where_resolved`), recorded (`recorded_path`) and, for the models a config names,
checked and made absolute (`check_local_model`) the way a job needs.
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


# Model paths, checked by the driver before any Ray work. Here and not in `models` (which re-exports them): the
# driver then never imports torch (about 1.2 CPU-s before Ray even starts).

LOCAL_DIR = "local-dir:"
"""open_clip's prefix for a model directory on disk (`local-dir:/path`)."""


def is_local_path(spec: str) -> bool:
    """Whether a model spec names a local path rather than a hub id ('org/name') or a URI.

    Local: it exists, starts with '.', '/' or '~', or has other than exactly one '/' (a hub id has one)."""
    if "://" in spec:
        return False
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def check_local_model(field: str, spec: str) -> str:
    """`spec` made absolute if it is a local path (Ray workers may not share the driver's working directory);
    a local path that does not exist raises naming the config field. Hub ids pass through unchanged."""
    if not spec or not is_local_path(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        world = next(  # a shapes world: runs/shapes* as `make shapes` names it, or one with a build record
            (
                p
                for p in path.parents
                if p.name.startswith("shapes") and (p.parent.name == "runs" or (p / "build.json").exists())
            ),
            None,
        )
        build = (
            f"build the shapes world with `python -m shapes.build --out {world}` (`make shapes`: runs/shapes)"
        )
        hint = build if world else "build the tiny model zoo with `python -m pipeline.zoo --out DIR`"
        raise FileNotFoundError(
            f"{field}={spec}: no such file or directory{where_resolved(spec)}; {hint} or point the field at "
            "real weights"
        )
    return str(path.resolve())

"""`pipeline.raysession`: the entry points' ray.init merges with a submitted job's runtime env, and paths
are explained / recorded the way a job needs (the Ray jobs themselves run in tests/cluster/test_jobs.py)."""

from __future__ import annotations

import json

import pytest

from pipeline.raysession import (
    JOB_CONFIG_VAR,
    check_local_model,
    driver_runtime_env,
    recorded_path,
    where_resolved,
)


def _in_job(monkeypatch, env_vars: dict) -> None:
    """What Ray's job supervisor hands the driver of `ray job submit --runtime-env ...`."""
    monkeypatch.setenv(JOB_CONFIG_VAR, json.dumps({"runtime_env": {"env_vars": env_vars}}))


def test_driver_env_leaves_out_what_the_job_sets(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_VAR, raising=False)
    assert driver_runtime_env({"RAY_DATA_LOG_LEVEL": "WARNING"}) == {
        "env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_LOG_LEVEL": "WARNING"}
    }
    _in_job(monkeypatch, {"TOKENIZERS_PARALLELISM": "true", "PYTHONUNBUFFERED": "1"})
    # The job's value wins; Ray would refuse the same key from both ("Failed to merge the Job's runtime env").
    assert driver_runtime_env({"RAY_DATA_LOG_LEVEL": "WARNING"}) == {
        "env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}
    }
    assert driver_runtime_env() is None


def test_ray_merges_the_driver_env_with_the_jobs(monkeypatch):
    """Ray's own merge rule (the one `ray.init` applies inside a job) accepts what driver_runtime_env gives."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    assert _merge_runtime_env(job, {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}) is None  # the old bug
    _in_job(monkeypatch, job["env_vars"])
    merged = _merge_runtime_env(job, driver_runtime_env({"RAY_DATA_LOG_LEVEL": "WARNING"}))
    assert merged["env_vars"] == {**job["env_vars"], "RAY_DATA_LOG_LEVEL": "WARNING"}


def test_missing_relative_paths_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_VAR, raising=False)
    assert where_resolved("/abs/shards") == "" and where_resolved("s3://bucket/shards") == ""
    assert where_resolved("data/shards") == f" (relative: resolved against {tmp_path})"
    _in_job(monkeypatch, {})
    assert "give a job absolute paths or URIs" in where_resolved("data/shards")

    from pipeline.read import list_shards

    with pytest.raises(FileNotFoundError, match=rf"--input 'nowhere'.*resolved against {tmp_path}.*absolute"):
        list_shards("nowhere")


def test_recorded_paths_never_point_into_a_jobs_working_dir(monkeypatch, tmp_path):
    (tmp_path / "job" / "runs" / "zoo").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    monkeypatch.delenv(JOB_CONFIG_VAR, raising=False)
    assert recorded_path("runs/zoo") == str(tmp_path / "job" / "runs" / "zoo")  # outside a job: absolute
    _in_job(monkeypatch, {})
    assert recorded_path("runs/zoo") == "runs/zoo"  # inside: as given, the temp copy is gone after the job
    assert recorded_path("../shared") == str(tmp_path / "shared")  # a path outside the copy stays absolute
    assert recorded_path("hub-org/model") == "hub-org/model"  # not a local path: untouched


def test_a_missing_model_says_what_builds_it(tmp_path):
    """A shapes world's path names `shapes.build` with that world; any other names the tiny zoo."""
    with pytest.raises(
        FileNotFoundError, match=r"model.pretrained=.*shapes.build --out \S*runs/shapes-small`"
    ):
        check_local_model("model.pretrained", str(tmp_path / "runs" / "shapes-small" / "base"))
    for elsewhere in ("weights/sd", "shapes-lab/weights/sd"):  # (a folder merely named shapes* is no world)
        with pytest.raises(FileNotFoundError, match="pipeline.zoo --out DIR") as missing:
            check_local_model("model.pretrained", str(tmp_path / elsewhere))
        assert "shapes.build" not in str(missing.value)
    (tmp_path / "my-world" / "shapes").mkdir(parents=True)
    (tmp_path / "my-world" / "shapes" / "build.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"shapes.build --out \S*my-world/shapes`"):
        check_local_model("model.pretrained", str(tmp_path / "my-world" / "shapes" / "base"))
    assert check_local_model("model.pretrained", "org/name") == "org/name"  # a hub id passes through

"""cluster/runtime_env.yaml is a valid Ray runtime_env and keeps local bulk out of the upload."""

from __future__ import annotations

import zipfile

from ray._private.runtime_env.packaging import create_package
from ray.runtime_env import RuntimeEnv

from tests.cluster.cluster_helpers import CLUSTER, REPO, load_yaml

KEEP = ["pipeline/run.py", "training/configs/a.yaml", "cluster/resources.yaml", "tests/test_a.py"]
DROP = [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/HEAD",
    "runs/demo/checkpoint/model.safetensors",
    "data/shards/00000.tar",
    "pipeline/__pycache__/run.cpython-311.pyc",
    "cluster/kuberay/crds/ray.io_rayjobs.yaml",
    "samples/clip.mp4",
    "latents/part-0.parquet",
]


def test_ray_accepts_runtime_env():
    env = load_yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown fields or bad types
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env var values must be strings"


def test_excludes_drop_local_bulk(tmp_path):
    env = load_yaml(CLUSTER / "runtime_env.yaml")
    checkout = tmp_path / "checkout"
    for rel in KEEP + DROP:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("x")
    # include_gitignore=False: the excludes alone must do it, whatever .gitignore says.
    zip_path = tmp_path / "pkg.zip"
    create_package(str(checkout), zip_path, include_gitignore=False, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    assert names == set(KEEP), f"kept {sorted(names - set(KEEP))}, lost {sorted(set(KEEP) - names)}"


def test_repository_upload_is_small(tmp_path):
    """What `ray job submit --working-dir .` would ship from this checkout right now."""
    env = load_yaml(CLUSTER / "runtime_env.yaml")
    zip_path = tmp_path / "repo.zip"
    create_package(str(REPO), zip_path, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(zip_path).namelist()
    assert not [n for n in names if n.startswith((".venv/", ".git/", "runs/"))]
    assert zip_path.stat().st_size < 50 * 1024 * 1024, (
        f"upload would be {zip_path.stat().st_size / 2**20:.0f} MiB"
    )

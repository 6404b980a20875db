"""Shared fixtures: one local Ray per session, demo shards (good and bad), the tiny model zoo.

Everything is built once per test session under pytest's temp dir, so tests never touch the
user's `runs/` and never need the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import av  # noqa: F401  before any test module imports decord (see below)
import pytest

# decord ships its own FFmpeg libraries; loaded first, they break PyAV's libvpx-vp9 *encoder* in the same
# process ("avcodec_open2(libvpx-vp9) returned 22"), which tests/pipeline/test_decode.py uses to make its
# VP9 video. PyAV loaded first, both work. (Decoding is unaffected either way; pipeline/decode.py's child
# imports PyAV before decord too.)

DEMO_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "demo.yaml"

# Nothing in the suite may reach a hub: fail loudly instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

try:  # the suite runs on GPU-less CI; gpu tests are skipped there
    import torch

    HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_GPU = False


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the whole session; tests that need Ray take this fixture."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny model zoo (`fixtures.zoo.ZooPaths`): SD 1.5 / 2.1 layouts, open_clip, aesthetic head."""
    from fixtures.zoo import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("tiny-zoo"))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Two WebVid-format video shards, 4 good + one of each bad kind per shard; returns the manifest dir."""
    from fixtures.synth import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(out, shards=2, per_shard=4, frames=24, fps=8, height=64, width=64, seed=0, bad=True)
    return out


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory):
    """One image shard (jpg + txt + json) for joint image-video training."""
    from fixtures.synth import write_shards

    out = tmp_path_factory.mktemp("image-shards")
    write_shards(out, shards=1, per_shard=6, kind="image", height=64, width=64, seed=1)
    return out


def zoo_overrides(zoo) -> list[str]:
    """Point the pipeline's demo preset at a zoo built elsewhere than runs/tiny-zoo."""
    return [f"clip.model={zoo.clip}", f"aesthetic.head={zoo.aesthetic}", f"encode.model={zoo.sd}"]


@pytest.fixture(scope="session")
def shapes_clip(tmp_path_factory):
    """(dir, card) of the shapes world's CLIP and aesthetic head, briefly trained, calibrated and saved (the CLI
    trains 300 steps; 50 were too few once a third of each batch became stills with their own captions); its
    text tower is also the reduced world's text encoder (tests/shapes/test_base_learns.py)."""
    import torch

    from shapes import clip

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("shapes-clip")
    card = clip.build(out, steps=100, aesthetic_clips=600, aesthetic_steps=600, heldout=120)
    return out, card


@pytest.fixture(scope="session")
def run_pipeline(ray_local, tiny_zoo):
    """run_pipeline(input, output, *overrides) -> summary, in-process on the session's local Ray."""
    from pipeline.config import PipelineConfig
    from pipeline.configlib import load_config
    from pipeline.run import run

    def _run(input, output, *overrides):
        cfg = load_config(
            PipelineConfig, DEMO_PIPELINE, [*zoo_overrides(tiny_zoo), "ray.progress_bars=false", *overrides]
        )
        cfg.input, cfg.output = str(input), str(output)
        return run(cfg)

    return _run


@pytest.fixture(scope="session")
def demo_latents(run_pipeline, demo_shards, tmp_path_factory):
    """(output dir, summary) of the demo pipeline on `demo_shards`: the training tests' latent store."""
    out = tmp_path_factory.mktemp("demo-latents")
    return out, run_pipeline(demo_shards, out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_zoo, tmp_path_factory):
    """A run dir as `training.run` leaves it (RUN/export/...), from a tiny 4-frame HARIVO model with
    perturbed ("trained") temporal layers; for the sampler, evaluation and sweep tests. Returns RUN."""
    from fixtures.checkpoints import tiny_checkpoint

    return tiny_checkpoint(tiny_zoo.sd, tmp_path_factory.mktemp("tiny-run"))

"""Fixtures for the video-model tests: tiny video UNets built from the session's tiny model zoo."""

from __future__ import annotations

import pytest
import torch

from fixtures import checkpoints
from pipeline.configlib import load_config
from training.config import TrainConfig
from training.model.unet import VideoUNet


def tiny_train_config(zoo, flavor: str = "sd", **overrides) -> TrainConfig:
    """TrainConfig for the tiny zoo: 8x8 latents, the given dotted overrides on top."""
    return checkpoints.tiny_train_config(getattr(zoo, flavor), **overrides)


@pytest.fixture
def make_video_model(tiny_zoo):
    """make_video_model(flavor="sd", **dotted_overrides) -> (VideoUNet, TrainConfig), seeded."""

    def make(flavor: str = "sd", **overrides) -> tuple[VideoUNet, TrainConfig]:
        cfg = tiny_train_config(tiny_zoo, flavor, **overrides)
        torch.manual_seed(0)
        return VideoUNet.from_pretrained(cfg.model, cfg.harivo), cfg

    return make


@pytest.fixture
def perturb_temporal():
    """perturb_temporal(model): give the zero-initialised temporal layers non-zero weights ("trained")."""
    return checkpoints.perturb_temporal


@pytest.fixture(scope="session")
def cascade_latents(ray_local, tiny_zoo, demo_shards, tmp_path_factory):
    """(output dir, summary) of `pipeline/configs/cascade_demo.yaml` on the demo shards: a 16-frame 32 px
    view `main` and the same frames at 64 px in view `sr` (the PYoCo cascade stages' store)."""
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.run import run

    preset = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "cascade_demo.yaml"
    zoo = [
        f"clip.model={tiny_zoo.clip}",
        f"aesthetic.head={tiny_zoo.aesthetic}",
        f"encode.model={tiny_zoo.sd}",
    ]
    cfg = load_config(PipelineConfig, preset, [*zoo, "ray.progress_bars=false"])
    out = tmp_path_factory.mktemp("cascade-latents")
    cfg.input, cfg.output = str(demo_shards), str(out)
    return out, run(cfg)
